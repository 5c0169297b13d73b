"""Films of another dataset that are NIH ChestX-ray14's own films: the RSNA Pneumonia Detection Challenge relabelled
a subset of NIH's films, and RSNA published which NIH film each challenge film is (its mapping file, JSON or CSV:
subset_img_id, the challenge's patientId; img_id, the NIH image name). With the mapping each RSNA film belongs to its
NIH patient: a union with NIH keeps that patient in one part, and evaluate.py leaves out the films of the NIH patients
a run trained or was validated on. Without it nothing can tell, and the report says that RSNA's score of a run that
saw NIH's films is not an external one.
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import DataError
from dataset import find_file, read_table

RSNA_MAPPING_FILES = (  # RSNA's mapping as published (JSON), and as NIH's Clinical Center scripts read it (CSV)
    "pneumonia-challenge-dataset-mappings_2018.json",
    "pneumonia_dataset_mapping.csv",
)
NIH_NAME = re.compile(r"(\d{8})_\d{3}\.png")  # NIH's image names: the patient's 8-digit id, the follow-up number
NIH_COPIES = "films of the NIH patients the run trained or was validated on (RSNA's films are NIH's)"
NOT_EXTERNAL = (
    "RSNA's films are NIH ChestX-ray14 films, and this run trained on NIH: without RSNA's mapping file "
    f"({RSNA_MAPPING_FILES[0]} beside the labels, or --rsna_mapping) the films it trained on cannot be left out, so "
    "this score is not an external one"
)


def nih_patient(image_name):
    """The NIH patient of an NIH image name ("00000013_005.png" -> 13), or None for another name."""
    found = NIH_NAME.fullmatch(Path(str(image_name)).name)
    return None if found is None else int(found.group(1))


def find_rsna_mapping(label_file, data_dir, given=""):
    """The mapping file: the one given (as given or below data_dir), else the first of RSNA_MAPPING_FILES beside the
    label file or in data_dir; None when there is none."""
    if given:
        return find_file(given, data_dir, "RSNA mapping file")
    for folder in dict.fromkeys((Path(label_file).parent, Path(data_dir))):
        for name in RSNA_MAPPING_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def read_rsna_mapping(path):
    """{challenge patientId: NIH image name} from RSNA's JSON (a list of records) or a CSV of the same columns."""
    path = Path(path)
    is_json = path.suffix.lower() == ".json"
    if is_json:
        try:
            table = pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as error:
            raise DataError(f"{path}: not RSNA's mapping (a JSON list of records): {error}") from None
    else:
        table = read_table(path, dtype=str)
    absent = [column for column in ("subset_img_id", "img_id") if column not in table.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {absent}; is this RSNA's {RSNA_MAPPING_FILES[0]}?")
    names = table.img_id.astype(str).str.strip()
    names = names.where(names.str.lower().str.endswith(".png"), names + ".png")
    unknown = names.map(nih_patient).isna().to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{path}, {f'record {row + 1}' if is_json else f'row {row + 2}'}: img_id {table.img_id.iloc[row]!r} "
            "is no NIH image name (such as 00000013_005.png). Use RSNA's file unchanged."
        )
    films = table.subset_img_id.astype(str).str.strip()
    twice = films.duplicated() & ~(films + names).duplicated()
    if twice.any():
        raise DataError(f"{path}: challenge film {films[twice].iloc[0]} is mapped to two NIH films; use RSNA's file")
    return dict(zip(films, names))


def with_nih_patients(rows, film_ids, label_file, data_dir, given=""):
    """RSNA's rows with `nih_image` (the NIH film each is, NaN where the mapping lacks it) and, where known, the NIH
    patient as patient_id ("nih:13"); (the rows, the mapping file or None)."""
    path = find_rsna_mapping(label_file, data_dir, given)
    if path is None:
        return rows, None
    mapping = read_rsna_mapping(path)
    rows["nih_image"] = [mapping.get(str(film), np.nan) for film in film_ids]
    known = rows.nih_image.notna().to_numpy()
    rows.loc[known, "patient_id"] = [f"nih:{nih_patient(name)}" for name in rows.nih_image[known]]
    return rows, path


def run_nih_patients(image_names):
    """The NIH patients among a run's image names, as "nih:13" (an NIH-only run names its films plainly, a union
    "nih:00000013_005.png")."""
    names = (name.removeprefix("nih:") for name in image_names if ":" not in name or name.startswith("nih:"))
    return {f"nih:{patient}" for patient in map(nih_patient, names) if patient is not None}
