"""Other hospitals' chest X-ray datasets, read into what evaluate.py scores: CheXpert, MIMIC-CXR-JPG and PadChest.

Each reader keeps frontal films only (PA and AP; laterals and other views are counted and left out) and maps the
dataset's labels onto the findings the NIH-trained model outputs (MAPPINGS: a reported name, the dataset's labels
that make it positive, and the model's findings whose highest probability scores it). Uncertain labels (CheXpert and
MIMIC: -1) and unmentioned ones (blank) follow --uncertain: "ignore" leaves those films out of that finding's figures,
"zeros" counts them negative, "ones" counts -1 positive and blank negative.
"""

import ast
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from errors import DataError
from films import FRONTAL_VIEWS, LATERAL_VIEWS
from images import index_images

DATASETS = ("chexpert", "mimic", "padchest")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
CHEXPERT_MAPPING = {  # reported name: (CheXpert labeler columns, the model's findings whose maximum scores it)
    "Atelectasis": (("Atelectasis",), ("Atelectasis",)),
    "Cardiomegaly": (("Cardiomegaly",), ("Cardiomegaly",)),
    "Consolidation": (("Consolidation",), ("Consolidation",)),
    "Edema": (("Edema",), ("Edema",)),
    "Effusion": (("Pleural Effusion",), ("Effusion",)),
    "Pneumonia": (("Pneumonia",), ("Pneumonia",)),
    "Pneumothorax": (("Pneumothorax",), ("Pneumothorax",)),
    "Mass/Nodule": (("Lung Lesion",), ("Mass", "Nodule")),  # one lesion label for both of NIH's
}
PADCHEST_MAPPING = {  # reported name: (PadChest label strings, the model's findings)
    "Atelectasis": (
        ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis", "total atelectasis"),
        ("Atelectasis",),
    ),
    "Cardiomegaly": (("cardiomegaly",), ("Cardiomegaly",)),
    "Effusion": (("pleural effusion",), ("Effusion",)),
    "Infiltration": (("infiltrates",), ("Infiltration",)),
    "Mass": (("mass", "pulmonary mass"), ("Mass",)),
    "Nodule": (("nodule", "multiple nodules"), ("Nodule",)),
    "Pneumonia": (("pneumonia",), ("Pneumonia",)),
    "Pneumothorax": (("pneumothorax",), ("Pneumothorax",)),
    "Consolidation": (("consolidation",), ("Consolidation",)),
    "Edema": (("pulmonary edema",), ("Edema",)),
    "Emphysema": (("emphysema",), ("Emphysema",)),
    "Fibrosis": (("pulmonary fibrosis",), ("Fibrosis",)),
    "Pleural_Thickening": (("pleural thickening", "apical pleural thickening"), ("Pleural_Thickening",)),
    "Hernia": (("hiatal hernia",), ("Hernia",)),
}
MAPPINGS = {"chexpert": CHEXPERT_MAPPING, "mimic": CHEXPERT_MAPPING, "padchest": PADCHEST_MAPPING}


class External(NamedTuple):
    rows: pd.DataFrame  # path, patient_id, one column per reported name (1, 0, or NaN: left out)
    mapping: dict  # reported name: the model's findings whose maximum scores it
    laterals: int  # lateral films left out
    other_views: int  # films neither frontal nor lateral (or of unknown view) left out
    source: str  # the label file read


def read_external(dataset, data_dir, csv_path="", uncertain="ignore"):
    """The frontal films of a dataset with their mapped labels."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain {uncertain!r}: use one of {', '.join(UNCERTAIN_POLICIES)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{dataset} data folder not found: {data_dir}")
    reader = {"chexpert": _read_chexpert, "mimic": _read_mimic, "padchest": _read_padchest}[dataset]
    table, views, source = reader(data_dir, csv_path, uncertain)
    views = views.fillna("").astype(str).str.strip().str.upper()
    frontal = views.isin(FRONTAL_VIEWS).to_numpy()
    laterals = int(views.isin(LATERAL_VIEWS).sum())
    rows = table[frontal].reset_index(drop=True)
    missing = rows.path.map(lambda path: not Path(path).is_file())
    if missing.any():
        raise DataError(
            f"{missing.sum()} of {len(rows)} frontal films in {source} are not where it says (first: "
            f"{rows.path[missing].iloc[0]}). Point --data_dir at the dataset's folder."
        )
    if rows.empty:
        raise DataError(f"no frontal (PA/AP) film in {source}")
    mapping = {name: findings for name, (_, findings) in MAPPINGS[dataset].items()}
    return External(rows, mapping, laterals, len(views) - int(frontal.sum()) - laterals, str(source))


def _label_file(data_dir, csv_path, default):
    path = Path(csv_path) if csv_path else data_dir / default
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    return path


def _uncertain(values, uncertain):
    """CheXpert-style values (1, 0, -1, blank) as 1 / 0 / NaN (left out) under the policy."""
    values = pd.to_numeric(values, errors="coerce")
    if uncertain == "ignore":
        return values.where(values.isin([0, 1]))
    return values.replace(-1, 1 if uncertain == "ones" else 0).fillna(0)


def _labelled(table, mapping, uncertain):
    """One column per reported name from the labeler's columns (names it lacks are an error)."""
    columns = [column for columns, _ in mapping.values() for column in columns]
    absent = [column for column in columns if column not in table.columns]
    if absent:
        raise DataError(f"the label file lacks column(s) {absent}; found {list(table.columns)}")
    return pd.DataFrame({name: _uncertain(table[columns[0]], uncertain) for name, (columns, _) in mapping.items()})


def _read_chexpert(data_dir, csv_path, uncertain):
    """CheXpert-v1.0(-small): valid.csv (or train.csv) with Path relative to the dataset folder's parent."""
    path = _label_file(data_dir, csv_path, "valid.csv")
    table = pd.read_csv(path)
    for column in ("Path", "Frontal/Lateral"):
        if column not in table.columns:
            raise DataError(f"{path}: missing column {column!r}; is this CheXpert's valid.csv or train.csv?")

    def locate(relative):  # "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg": from DIR's parent
        candidates = [data_dir.parent / relative, data_dir / relative, data_dir / Path(*Path(relative).parts[1:])]
        return str(next((path for path in candidates if path.is_file()), candidates[0]))

    patient = table.Path.str.extract(r"patient(\d+)", expand=False)
    if patient.isna().any():
        row = int(np.flatnonzero(patient.isna())[0])
        raise DataError(
            f"{path}, row {row + 2}: Path {table.Path[row]!r} names no patientNNNNN folder; the intervals resample "
            "patients, so each film's patient must be known. Use CheXpert's valid.csv or train.csv unchanged."
        )
    rows = pd.DataFrame({"path": table.Path.map(locate), "patient_id": pd.to_numeric(patient, errors="coerce")})
    rows = pd.concat([rows, _labelled(table, CHEXPERT_MAPPING, uncertain)], axis=1)
    frontal = table["Frontal/Lateral"].astype(str).str.lower() == "frontal"
    return rows, pd.Series(np.where(frontal, "FRONTAL", "LATERAL")), path


def _read_mimic(data_dir, csv_path, uncertain):
    """MIMIC-CXR-JPG: the CheXpert labels per study, the views per image, files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg."""
    labels_path = _label_file(data_dir, csv_path, "mimic-cxr-2.0.0-chexpert.csv")
    metadata_path = _label_file(data_dir, "", "mimic-cxr-2.0.0-metadata.csv")
    labels = pd.read_csv(labels_path)
    metadata = pd.read_csv(metadata_path, usecols=["dicom_id", "subject_id", "study_id", "ViewPosition"])
    table = metadata.merge(labels, on=["subject_id", "study_id"], how="inner")
    subject, study = table.subject_id.astype(str), table.study_id.astype(str)
    paths = [
        str(data_dir / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
        for s, t, d in zip(subject, study, table.dicom_id)
    ]
    rows = pd.DataFrame({"path": paths, "patient_id": table.subject_id})
    rows = pd.concat([rows, _labelled(table, CHEXPERT_MAPPING, uncertain)], axis=1)
    return rows, table.ViewPosition, labels_path


def _read_padchest(data_dir, csv_path, uncertain):
    """PadChest: its label CSV (Labels as a list of strings per film, Projection), the PNGs anywhere below."""
    if csv_path:
        path = _label_file(data_dir, csv_path, "")
    else:
        found = sorted(data_dir.glob("PADCHEST*.csv"))
        if not found:
            raise DataError(f"no PADCHEST*.csv in {data_dir}; give the label file with --csv")
        path = found[0]
    table = pd.read_csv(path, low_memory=False)
    for column in ("ImageID", "PatientID", "Projection", "Labels"):
        if column not in table.columns:
            raise DataError(f"{path}: missing column {column!r}; is this PadChest's label CSV?")
    labelled = table.Labels.map(_padchest_labels)
    if labelled.isna().any():  # PadChest has a few films whose report was not labelled: they cannot be scored
        row = int(np.flatnonzero(labelled.isna())[0])
        warnings.warn(
            f"{path}: {labelled.isna().sum()} film(s) without a readable Labels list left out (first: row {row + 2}, "
            f"{table.ImageID[row]}: {table.Labels[row]!r})",
            stacklevel=2,
        )
    table, labelled = table[labelled.notna()].reset_index(drop=True), labelled[labelled.notna()].reset_index(drop=True)
    images = index_images(data_dir)
    rows = pd.DataFrame(
        {
            "path": [str(images.get(name, data_dir / name)) for name in table.ImageID],
            "patient_id": pd.factorize(table.PatientID)[0],
        }
    )
    for name, (labels, _) in PADCHEST_MAPPING.items():
        rows[name] = labelled.map(lambda found, labels=labels: float(bool(found & set(labels))))
    return rows, table.Projection, path


def _padchest_labels(text):
    """ "['pleural effusion', ' cardiomegaly']" -> {'pleural effusion', 'cardiomegaly'}; None when unreadable."""
    if not isinstance(text, str):
        return None
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        values = re.findall(r"'([^']*)'", text)
    return {str(value).strip().lower() for value in values if str(value).strip()}


def model_scores(probabilities, mapping, findings):
    """[images, reported names]: each name's score is the highest probability among its mapped findings."""
    return np.stack(
        [probabilities[:, [findings.index(f) for f in mapped]].max(axis=1) for mapped in mapping.values()], axis=1
    )
