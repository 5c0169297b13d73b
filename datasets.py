"""The films train.py trains on: DATASET names one dataset or a union ("nih,chexpert"), DATA_DIR their folders in the
same order. NIH ChestX-ray14 is read by dataset.py; CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA Pneumonia and
a hospital's own CSV by external.py, whose readers keep frontal films only and know each dataset's conventions (blank,
-1, synonyms, exclusions). Every dataset becomes the same table: a row per film, its 14 findings as 1, 0 or NaN
(unlabelled: the loss, pos_weight and AUROC leave it out), its patient, and its part of the split.

Mapping onto the 14 findings (external.MAPPINGS): a finding the dataset does not label is unlabelled (CheXpert and
MIMIC label 8 of the 14, PadChest all 14, VinDr 10, RSNA Pneumonia alone). A label covering two findings (CheXpert's
Lung Lesion, VinDr's Nodule/Mass) makes both negative when negative, and leaves both unlabelled when positive: a
lesion is a Mass or a Nodule, and the label does not say which. An uncertain CheXpert/MIMIC label (-1) follows
UNCERTAIN: "ignore" (unlabelled, the CheXpert paper's U-Ignore), "zeros" or "ones"; blank is negative there, as the
datasets' authors read it. In a hospital's own CSV blank is unlabelled.

Splits are by patient within each dataset, and patient ids of a union carry their dataset ("chexpert:64541"), so no
patient is in two parts. The official splits are used where a dataset has one (NIH's lists, CheXpert's valid.csv as
the test part, MIMIC's split file; README, "Training on other datasets"); the rest of a dataset is split by
VAL_FRACTION and TEST_FRACTION.
"""

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from dataset import (
    FINDINGS,
    SPLITS,
    attach_image_paths,
    check_patients_disjoint,
    find_label_file,
    make_split,
    read_labels,
    read_table,
    split_by_patient,
)
from errors import DataError
from external import read_external

TRAINING_DATASETS = ("nih", "chexpert", "mimic", "padchest", "vindr", "rsna", "csv")  # train.py's DATASET values
MIMIC_SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}


class TrainingFilms(NamedTuple):
    """The films of a run: `rows` has image_name (unique in the run), path, patient_id, dataset, the 14 FINDINGS
    (1, 0, or NaN: unlabelled) and sex, age and view where known; `split` is each row's part (train, val, test)."""

    rows: pd.DataFrame
    split: pd.Series
    sources: list  # the label files read
    left_out: dict  # {dataset: {"laterals": n, "other views": n, ...}}: films read but not trained on


def dataset_names(data):
    """(the datasets, their folders) of a settings.DataSettings: DATASET and DATA_DIR, comma-separated, paired."""
    names = [name.strip() for name in data.dataset.split(",") if name.strip()]
    folders = [folder.strip() for folder in data.data_dir.split(",") if folder.strip()]
    if len(folders) != len(names):
        raise DataError(
            f"DATASET {data.dataset!r} names {len(names)} dataset(s) but DATA_DIR {data.data_dir!r} {len(folders)} "
            "folder(s): give one folder per dataset, in the same order (--data_dir data/nih,data/CheXpert-v1.0-small)"
        )
    if data.csv and len(names) > 1:
        raise DataError(
            f"CSV {data.csv!r} with a union ({data.dataset}): each dataset's label file is found in its "
            "folder; leave CSV empty"
        )
    return names, folders


def is_nih_only(data):
    return [name.strip() for name in data.dataset.split(",")] == ["nih"]


def read_training_films(data, cache=None, saved_split=None):
    """The TrainingFilms of a settings.DataSettings; with `saved_split` (a resumed run's image_name/split table) that
    split instead of a new one. `cache` (NIH alone): a cache folder whose films need no PNG on disk."""
    names, folders = dataset_names(data)
    parts, sources, left_out = [], [], {}
    for name, folder in zip(names, folders):
        rows, official, label_files, dropped = _read_one(name, folder, data, cache if name == "nih" else None)
        if len(names) > 1 or name != "nih":  # a union's ids and names carry their dataset; NIH alone stays as it is
            rows["patient_id"] = name + ":" + rows["patient_id"].astype(str)
            rows["image_name"] = name + ":" + rows["image_name"].astype(str)
        rows["dataset"] = name
        rows["split"] = "" if saved_split is not None else _split(rows, official, data, name)
        parts.append(rows)
        sources += label_files
        left_out[name] = dropped
    rows = pd.concat(parts, ignore_index=True)
    if rows.image_name.duplicated().any():
        raise DataError(f"image {rows.image_name[rows.image_name.duplicated()].iloc[0]} is listed twice")
    if saved_split is not None:
        return _with_saved_split(rows, saved_split, sources, left_out, data.data_dir)
    check_patients_disjoint(rows.patient_id, rows.split)
    return TrainingFilms(rows.drop(columns="split"), rows.split, sources, left_out)


def _with_saved_split(rows, saved, sources, left_out, data_dir):
    missing = saved.image_name[~saved.image_name.isin(rows.image_name)]
    if len(missing):
        raise DataError(
            f"{len(missing)} image(s) of the run's split are not below {data_dir} (first: {missing.iloc[0]})"
        )
    split = rows.image_name.map(saved.set_index("image_name")["split"])
    keep = split.notna().to_numpy()  # films added to a label file since the run started take no part
    rows = rows[keep].drop(columns="split").reset_index(drop=True)
    return TrainingFilms(rows, split[keep].reset_index(drop=True), sources, left_out)


def _read_one(name, folder, data, cache):
    """(rows with the 14 findings, the official split per row or None, the label files read, films left out) of one
    dataset."""
    if name == "nih":
        csv_path = find_label_file(folder, data.csv)
        rows = attach_image_paths(read_labels(csv_path), folder, data.drop_missing_images, cache=cache)
        rows[list(FINDINGS)] = rows[list(FINDINGS)].astype(float)
        official = make_split(rows, csv_path, data.val_fraction, data.test_fraction, data.seed)
        return rows, official, [csv_path], {}
    if name == "chexpert":
        return _read_chexpert(folder, data)
    external = read_external(name, folder, data.csv, data.uncertain, data.drop_missing_images)
    rows = _training_rows(external, folder)
    official = _mimic_split(rows, folder) if name == "mimic" else None
    return rows, official, [Path(external.source)], _left_out(external)


def _read_chexpert(folder, data):
    """CheXpert: train.csv is training (and validation) films, valid.csv the test films where it is present."""
    train = read_external("chexpert", folder, data.csv or "train.csv", data.uncertain, data.drop_missing_images)
    rows, left_out = [_training_rows(train, folder)], _left_out(train)
    official = [pd.Series("", index=rows[0].index)]
    sources = [Path(train.source)]
    if not data.csv and (Path(folder) / "valid.csv").is_file():
        test = read_external("chexpert", folder, "valid.csv", data.uncertain, data.drop_missing_images)
        rows.append(_training_rows(test, folder))
        official.append(pd.Series("test", index=rows[-1].index))
        sources.append(Path(test.source))
        left_out = {key: left_out.get(key, 0) + value for key, value in _left_out(test).items()}
    return pd.concat(rows, ignore_index=True), pd.concat(official, ignore_index=True), sources, left_out


def _training_rows(external, folder):
    """An external.External's rows with its reported names turned into the 14 findings (see the module's notes)."""
    rows = external.rows
    table = pd.DataFrame(
        {
            "image_name": [Path(os.path.relpath(path, folder)).as_posix() for path in rows.path],
            "path": rows.path,
            "patient_id": rows.patient_id.astype(str),
        }
    )
    for column in ("sex", "age", "view"):
        if column in rows.columns:
            table[column] = rows[column].to_numpy()
    for finding in FINDINGS:
        table[finding] = np.nan
    for name, findings in external.mapping.items():
        values = rows[name].to_numpy(dtype=float)
        shared = np.where(values == 1, np.nan, values) if len(findings) > 1 else values  # which of them: unknown
        for finding in findings:
            table[finding] = shared
    return table


def _left_out(external):
    return {"laterals": external.laterals, "other views": external.other_views, **external.left_out}


def _mimic_split(rows, folder):
    """MIMIC's own split by dicom_id (the film's file name), when mimic-cxr-2.0.0-split.csv lies in its folder."""
    path = Path(folder) / MIMIC_SPLIT_FILE
    if not path.is_file():
        return None
    table = read_table(path, dtype=str)
    if not {"dicom_id", "split"} <= set(table.columns):
        raise DataError(f"{path}: missing column dicom_id or split; use MIMIC's file unchanged")
    unknown = ~table.split.isin(MIMIC_SPLITS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{path}, row {row + 2}: split {table.split.iloc[row]!r} is not train, validate or test")
    part = rows.path.map(lambda value: Path(value).stem).map(table.set_index("dicom_id").split.map(MIMIC_SPLITS))
    if part.isna().any():
        raise DataError(f"{path} lacks {part.isna().sum()} of the films (first: {rows.path[part.isna()].iloc[0]})")
    return part


def _split(rows, official, data, name):
    """Each row's part: the official split where the dataset has one (its parts missing made by patient), else by
    patient with VAL_FRACTION and TEST_FRACTION."""
    if name == "nih":
        return official.to_numpy()
    if official is None:
        official = pd.Series("", index=rows.index)
    split = official.to_numpy(dtype=object).copy()
    rest = split == ""
    if rest.any():
        has_test = (split == "test").any()
        fractions = [1 - data.val_fraction - (0 if has_test else data.test_fraction), data.val_fraction]
        fractions += [] if has_test else [data.test_fraction]
        if min(fractions) < 0:
            raise DataError(f"val_fraction {data.val_fraction} + test_fraction {data.test_fraction} exceed 1.")
        split[rest] = np.array(SPLITS)[split_by_patient(rows.patient_id[rest], fractions, data.seed)]
    if not (split == "val").any() and (split == "train").any():  # an official split without validation films
        train = split == "train"
        part = split_by_patient(rows.patient_id[train], [1 - data.val_fraction, data.val_fraction], data.seed)
        split[train] = np.where(part == 1, "val", "train")
    return split


def describe(films):
    """Lines saying each dataset's films per part and what was left out."""
    lines = []
    for name, rows in films.rows.groupby("dataset", sort=False):
        parts = films.split[rows.index]
        counts = ", ".join(f"{part} {int((parts == part).sum()):,}" for part in SPLITS)
        labelled = rows[list(FINDINGS)].notna().any().sum()
        dropped = {key: value for key, value in films.left_out.get(name, {}).items() if value}
        said = f"; left out: {', '.join(f'{value:,} {key}' for key, value in dropped.items())}" if dropped else ""
        lines.append(f"{name}: {len(rows):,} frontal films ({counts}), {labelled} of 14 findings labelled{said}")
    return lines
