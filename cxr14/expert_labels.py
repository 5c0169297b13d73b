"""Google's expert labels of NIH's own films (google2019_nih-chest-xray-labels.csv): four findings read by
radiologists on NIH test and validation films, which evaluate.py --expert_labels scores beside NIH's labels.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import DataError
from cxr14.external import refuse_duplicates
from cxr14.mappings import EXPERT_COLUMNS, EXPERT_MAPPING, EXPERT_UNSCORED
from dataset import read_table


def read_expert_labels(path):
    """Google's expert labels of NIH films (google2019_nih-chest-xray-labels.csv: Image Index, Fracture,
    Pneumothorax, Airspace opacity, Nodule or mass as YES/NO, Set Id) as 1/0 columns; a blank stays NaN."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expert label file not found: {path}")
    table = read_table(path, dtype=str)
    table.columns = [str(column).strip() for column in table.columns]
    absent = [column for column in EXPERT_COLUMNS if column not in table.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {absent}; is this google2019_nih-chest-xray-labels.csv?")
    labels = pd.DataFrame({"image_name": table["Image Index"].str.strip(), "set_id": table["Set Id"].str.strip()})
    refuse_duplicates(labels, ["image_name"], path, "film(s)")
    for name in (*EXPERT_UNSCORED, *EXPERT_MAPPING):
        answer = table[name].str.strip().str.upper()
        unknown = answer.notna() & ~answer.isin(["YES", "NO"])
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise DataError(f"{path}, row {row + 2}: {name} is {table[name][row]!r}, not YES or NO")
        labels[name] = answer.map({"YES": 1.0, "NO": 0.0})
    return labels
