"""Other hospitals' chest X-ray datasets, read by their own conventions into what evaluate.py scores: CheXpert,
MIMIC-CXR-JPG, PadChest, VinDr-CXR and RSNA Pneumonia Detection; and Google's expert labels of NIH's own films.

Each reader keeps frontal films only (PA and AP; laterals and other views are counted and left out) and maps the
dataset's labels onto the findings the NIH-trained model outputs (MAPPINGS: a reported name, the dataset's labels that
make it positive, and the model's findings whose highest probability scores it). A film's label for a name is 1, 0, or
NaN (left out of that name's figures).

- CheXpert and MIMIC-CXR (the CheXpert labeler): 1 positive, 0 negative, -1 uncertain, blank "not mentioned". The
  datasets' authors read blank as negative, and so does this reader under every --uncertain policy; the policy acts
  on -1 alone: "ignore" leaves the film out of that finding, "zeros" counts it negative, "ones" positive.
- PadChest: a list of labels per film, matched exactly (never by substring: "pericardial effusion" is no Effusion,
  "pseudonodule" no Nodule, "subcutaneous emphysema" no Emphysema). Films whose only sign of Infiltration is an
  alveolar, interstitial, reticular, reticulonodular or ground glass pattern are left out of Infiltration (PADCHEST_
  UNCLEAR). Films labelled "exclude" and films with an empty list are left out and counted; "suboptimal study" films
  are kept. --min_age leaves out younger films and those of unknown age.
- VinDr-CXR: three radiologists a film; a film is positive for a finding when any of them marked it (--vindr_rule
  majority: at least two), and every radiologist's box of a positive finding is kept for the localisation report.
- RSNA Pneumonia Detection: Target is Pneumonia; each of a film's rows with Target 1 is a box. Its films are NIH's:
  with RSNA's mapping file each film belongs to its NIH patient (nih_copies.py).
"""

import ast
import re
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cxr14.errors import DataError
from cxr14.films import FRONTAL_VIEWS, LATERAL_VIEWS
from cxr14.mappings import (
    CHEXPERT_MAPPING,
    LABELER_VALUES,
    OWN_CSV_MAPPING,
    PADCHEST_EXCLUDED,
    PADCHEST_MAPPING,
    PADCHEST_UNCLEAR,
    RSNA_MAPPING,
    UNCERTAIN_POLICIES,
    UNCERTAIN_VALUES,
    VINDR_MAPPING,
)
from cxr14.nih_copies import with_nih_patients
from cxr14.pixels import index_images
from dataset import FINDINGS, demographics, find_file, read_table

OWN_CSV_COLUMNS = ("path", "patient_id")  # a hospital's own CSV: these, any of the 14 findings, and OWN_CSV_OPTIONAL
OWN_CSV_OPTIONAL = ("view", "sex", "age")  # optional: the view (frontal films kept) and, for the subgroup report
OWN_CSV_VALUES = "a finding's column holds 1 (positive), 0 (negative), -1 (uncertain) or nothing (unlabelled)."
MIMIC_SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"  # MIMIC's official split, by dicom_id
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}  # its parts, as our split names them
VINDR_TEST_FILE = "test.csv"  # VinDr's test labels (the five radiologists' consensus), its films in DIR/test/


class Read(NamedTuple):
    """What a dataset's reader gives read_external, which keeps the frontal films and checks they are on disk."""

    rows: pd.DataFrame  # path, patient_id, sex/age/view where known, one column per reported name (1, 0 or NaN)
    views: pd.Series  # each row's view as the dataset writes it
    source: Path  # the label file read
    mapping: dict | None = None  # the reported names where they depend on the file (an own CSV's); else the entry's
    left_out: dict | None = None  # other films left out, and why: {reason: count}
    boxes: pd.DataFrame | None = None  # VinDr and RSNA: image_name, name (reported), x, y, w, h
    nih_mapping: Path | None = None  # RSNA: the mapping file that named each film's NIH original (nih_copies.py)


class Entry(NamedTuple):
    """A dataset of the registry (REGISTRY): adding one is an entry and its tests."""

    reader: Callable  # (data_dir, csv_path, options) -> Read
    mapping: dict  # reported name: (the dataset's labels, the model's findings whose maximum scores it)
    patient: str  # where the patient comes from (docs/data.md, "Training on other datasets")
    training_files: tuple  # (label file, the part its films take: "" split by patient) that train.py reads; the first
    # ("": the reader's default) is replaced by --csv, the others are read when present and --csv is not given
    official_split: Callable | None = None  # (rows, data_dir) -> each row's part from the dataset's split file, or None


class External(NamedTuple):
    rows: pd.DataFrame  # image_name, path, patient_id, one column per reported name (1, 0, or NaN: left out)
    mapping: dict  # reported name: the model's findings whose maximum scores it
    laterals: int  # lateral films left out
    other_views: int  # films neither frontal nor lateral (or of unknown view) left out
    source: str  # the label file read
    left_out: dict  # other films left out, and why: {reason: count}
    skipped: dict  # {"missing": [paths]}: films of the label file absent on disk (--drop_missing_images)
    boxes: pd.DataFrame = None  # VinDr and RSNA: image_name, name (reported), x, y, w, h in the film's pixels
    nih_mapping: str | None = None  # RSNA: the mapping file that named each film's NIH original, or None


def read_external(
    dataset, data_dir, csv_path="", uncertain="ignore", drop_missing=False, min_age=None, rule="any", rsna_mapping=""
):
    """The frontal films of a dataset with their mapped labels (see the module's notes for each dataset);
    rsna_mapping: RSNA's mapping to NIH's films, when not beside its labels (nih_copies.py)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain {uncertain!r}: use one of {', '.join(UNCERTAIN_POLICIES)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{dataset} data folder not found: {data_dir}")
    options = {"uncertain": uncertain, "min_age": min_age, "rule": rule, "rsna_mapping": rsna_mapping}
    read = REGISTRY[dataset].reader(data_dir, csv_path, options)
    views = read.views.fillna("").astype(str).str.strip().str.upper()
    frontal = views.isin(FRONTAL_VIEWS).to_numpy()
    laterals = int(views.isin(LATERAL_VIEWS).sum())
    rows = read.rows[frontal].reset_index(drop=True)
    rows.insert(0, "image_name", rows.path)
    rows, skipped = _missing_films(rows, read.source, drop_missing)
    if rows.empty:
        raise DataError(f"no frontal (PA/AP) film in {read.source}")
    boxes = read.boxes
    if boxes is not None:
        boxes = boxes[boxes.image_name.isin(rows.image_name)].reset_index(drop=True)
    mapping = {name: findings for name, (_, findings) in (read.mapping or REGISTRY[dataset].mapping).items()}
    other_views = len(views) - int(frontal.sum()) - laterals
    about = (rows, mapping, laterals, other_views, str(read.source), read.left_out or {}, skipped, boxes)
    return External(*about, None if read.nih_mapping is None else str(read.nih_mapping))


def _missing_films(rows, source, drop_missing):
    """Rows whose film is on disk; the others an error naming the first few, or left out and named when asked."""
    missing = rows.path.map(lambda path: not Path(path).is_file()).to_numpy()
    if not missing.any():
        return rows, {"missing": []}
    named = list(rows.path[missing])
    if not drop_missing:
        raise DataError(
            f"{missing.sum()} of {len(rows)} frontal films in {source} are not where it says (first: "
            f"{', '.join(named[:3])}). Point --data_dir at the dataset's folder, or evaluate the films present with "
            "--drop_missing_images (the report names the films left out)."
        )
    warnings.warn(f"{len(named)} film(s) of {source} are missing and left out (first: {named[0]})", stacklevel=3)
    return rows[~missing].reset_index(drop=True), {"missing": named}


def _uncertain(values, uncertain):
    """CheXpert-labeler values (1, 0, -1, blank) as 1 / 0 / NaN (left out): blank is "not mentioned", a negative
    under every policy; -1 (uncertain) follows the policy: ignore -> NaN, zeros -> 0, ones -> 1."""
    values = pd.to_numeric(values, errors="coerce").fillna(0)
    return values.replace(-1, UNCERTAIN_VALUES[uncertain])


def _check_labeler_values(
    table,
    mapping,
    path,
    advice="the CheXpert labeler writes 1 (positive), 0 (negative), -1 (uncertain) or nothing. Use the file unchanged.",
):
    """CheXpert's labeler writes 1, 0, -1 or nothing in each finding's column; anything else (a 2, a "yes") is an
    error naming the file, the row and the value, not a negative in silence."""
    for column in [column for columns, _ in mapping.values() for column in columns if column in table.columns]:
        text = table[column]
        given = text.notna() & text.astype(str).str.strip().ne("")
        bad = given & ~pd.to_numeric(text, errors="coerce").isin(LABELER_VALUES)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = text.iloc[row]
            shown = f"{value:g}" if isinstance(value, (int, float, np.number)) else repr(str(value))
            raise DataError(f"{path}, row {row + 2}: {column} is {shown}, one of {bad.sum()} such value(s); {advice}")


def refuse_duplicates(table, columns, path, what):
    """Rows that repeat `columns` would count a film (or a box) twice: an error naming the first repeats."""
    twice = table.duplicated(subset=list(columns), keep="first").to_numpy()
    if twice.any():
        rows = ", ".join(str(row + 2) for row in np.flatnonzero(twice)[:3])
        raise DataError(
            f"{path}: {twice.sum()} {what} listed twice (the repeat first at row(s) {rows}); remove the repeated rows"
        )


def _inside(table, column, path):
    """Paths of a label file stay inside the dataset's folder: an absolute or ../ path is an error naming its row."""
    outside = table[column].astype(str).map(lambda value: Path(value).is_absolute() or ".." in Path(value).parts)
    if outside.any():
        row = int(np.flatnonzero(outside.to_numpy())[0])
        raise DataError(
            f"{path}, row {row + 2}: {column} {table[column].iloc[row]!r} points outside the dataset's folder; "
            "paths in the label file are relative to it. Use the file unchanged."
        )


def _labelled(table, mapping, uncertain):
    """One column per reported name from the labeler's columns (names it lacks are an error)."""
    columns = [column for columns, _ in mapping.values() for column in columns]
    absent = [column for column in columns if column not in table.columns]
    if absent:
        raise DataError(f"the label file lacks column(s) {absent}; found {list(table.columns)}")
    return pd.DataFrame({name: _uncertain(table[columns[0]], uncertain) for name, (columns, _) in mapping.items()})


def _read_chexpert(data_dir, csv_path, options):
    """CheXpert-v1.0(-small): valid.csv (or train.csv) with Path relative to the dataset folder's parent."""
    path = find_file(csv_path or "valid.csv", data_dir, "label file")
    table = read_table(path)
    for column in ("Path", "Frontal/Lateral"):
        if column not in table.columns:
            raise DataError(f"{path}: missing column {column!r}; is this CheXpert's valid.csv or train.csv?")
    _inside(table, "Path", path)
    refuse_duplicates(table, ["Path"], path, "film(s)")
    _check_labeler_values(table, CHEXPERT_MAPPING, path)

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
    rows = rows.assign(**demographics(table.get("Sex"), table.get("Age"), table.get("AP/PA")))
    rows = pd.concat([rows, _labelled(table, CHEXPERT_MAPPING, options["uncertain"])], axis=1)
    frontal = table["Frontal/Lateral"].astype(str).str.lower() == "frontal"
    return Read(rows, pd.Series(np.where(frontal, "FRONTAL", "LATERAL")), path)


def _read_mimic(data_dir, csv_path, options):
    """MIMIC-CXR-JPG: the CheXpert labels per study, the views per image, files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg."""
    labels_path = find_file(csv_path or "mimic-cxr-2.0.0-chexpert.csv", data_dir, "label file")
    metadata_path = find_file("mimic-cxr-2.0.0-metadata.csv", data_dir, "label file")
    labels = read_table(labels_path)
    metadata = read_table(metadata_path)
    for table, path, columns in (
        (labels, labels_path, ("subject_id", "study_id")),
        (metadata, metadata_path, ("dicom_id", "subject_id", "study_id", "ViewPosition")),
    ):
        absent = [column for column in columns if column not in table.columns]
        if absent:
            raise DataError(
                f"{path}: missing column(s) {absent}; found {list(table.columns)}. Use MIMIC's file unchanged."
            )
    refuse_duplicates(labels, ["subject_id", "study_id"], labels_path, "stud(ies)")
    refuse_duplicates(metadata, ["dicom_id"], metadata_path, "film(s)")
    _check_labeler_values(labels, CHEXPERT_MAPPING, labels_path)
    metadata = metadata[["dicom_id", "subject_id", "study_id", "ViewPosition"]]
    table = metadata.merge(labels, on=["subject_id", "study_id"], how="inner")
    subject, study = table.subject_id.astype(str), table.study_id.astype(str)
    paths = [
        str(data_dir / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
        for s, t, d in zip(subject, study, table.dicom_id)
    ]
    rows = pd.DataFrame({"path": paths, "patient_id": table.subject_id, **demographics(None, None, table.ViewPosition)})
    rows = pd.concat([rows, _labelled(table, CHEXPERT_MAPPING, options["uncertain"])], axis=1)
    return Read(rows, table.ViewPosition, labels_path)


def _read_padchest(data_dir, csv_path, options):
    """PadChest: its label CSV (Labels as a list of strings per film, Projection), the PNGs anywhere below."""
    if csv_path:
        path = find_file(csv_path, data_dir, "label file")
    else:
        found = sorted(data_dir.glob("PADCHEST*.csv"))
        if not found:
            raise DataError(f"no PADCHEST*.csv in {data_dir}; give the label file with --csv")
        path = found[0]
    table = read_table(path, low_memory=False)
    for column in ("ImageID", "PatientID", "Projection", "Labels"):
        if column not in table.columns:
            raise DataError(f"{path}: missing column {column!r}; is this PadChest's label CSV?")
    _inside(table, "ImageID", path)
    refuse_duplicates(table, ["ImageID"], path, "film(s)")
    labelled = table.Labels.map(_padchest_labels)
    if labelled.isna().any():  # PadChest has a few films whose report was not labelled: they cannot be scored
        row = int(np.flatnonzero(labelled.isna())[0])
        warnings.warn(
            f"{path}: {labelled.isna().sum()} film(s) without a readable Labels list left out (first: row {row + 2}, "
            f"{table.ImageID[row]}: {table.Labels[row]!r})",
            stacklevel=2,
        )
    reasons = {
        "without a readable Labels list": labelled.isna(),
        f"labelled {PADCHEST_EXCLUDED!r} by PadChest": labelled.map(lambda found: PADCHEST_EXCLUDED in (found or ())),
        "with an empty label list": labelled.map(lambda found: found == set()),
    }
    age = _padchest_age(table)
    if options["min_age"] is not None:
        reasons[f"younger than {options['min_age']} or of unknown age"] = ~(age >= options["min_age"])
    keep = ~np.logical_or.reduce([mask.to_numpy(dtype=bool) for mask in reasons.values()])
    left_out, seen = {}, np.zeros(len(table), dtype=bool)
    for reason, mask in reasons.items():  # each film counted once, under its first reason
        mask = mask.to_numpy(dtype=bool) & ~seen
        left_out[reason], seen = int(mask.sum()), seen | mask
    table, labelled, age = (part[keep].reset_index(drop=True) for part in (table, labelled, age))
    images = index_images(data_dir)
    rows = pd.DataFrame(
        {
            "path": [str(images.get(name, data_dir / name)) for name in table.ImageID],
            "patient_id": pd.factorize(table.PatientID)[0],
            **demographics(table.get("PatientSex_DICOM"), age, table.Projection),
        }
    )
    for name, (labels, _) in PADCHEST_MAPPING.items():
        rows[name] = labelled.map(partial(_padchest_value, set(labels), set(PADCHEST_UNCLEAR.get(name, ()))))
    return Read(rows, table.Projection, path, left_out=left_out)


def _padchest_value(positive, unclear, found):
    """1 when a film's labels name the finding, NaN (left out) when they name only an unclear sign of it, else 0."""
    if found & positive:
        return 1.0
    return np.nan if found & unclear else 0.0


def _padchest_age(table):
    """Age in years at the study (StudyDate_DICOM's year less PatientBirth), NaN where either is unknown."""
    if "PatientBirth" not in table.columns or "StudyDate_DICOM" not in table.columns:
        return pd.Series(np.nan, index=table.index)
    study_year = pd.to_numeric(table.StudyDate_DICOM.astype(str).str[:4], errors="coerce")
    return study_year - pd.to_numeric(table.PatientBirth, errors="coerce")


def _padchest_labels(text):
    """ "['pleural effusion', ' cardiomegaly']" -> {'pleural effusion', 'cardiomegaly'}; None when unreadable."""
    if not isinstance(text, str):
        return None
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        values = re.findall(r"'([^']*)'", text)
    if not isinstance(values, (list, tuple, set)):  # "-1", "nan": no list of labels
        return None
    return {str(value).strip().lower() for value in values if str(value).strip()}


def _read_vindr(data_dir, csv_path, options):
    """VinDr-CXR: DIR/train.csv (image_id, class_name, rad_id, x_min, y_min, x_max, y_max: a row per radiologist and
    finding, "No finding" rows without a box) and DIR/train/IMAGE_ID.dicom; or its test labels (DIR/test.csv, the five
    radiologists' consensus: rad_id may be absent, one reading a film) and DIR/test/IMAGE_ID.dicom."""
    path = find_file(csv_path or "train.csv", data_dir, "label file")
    table = read_table(path)
    films_folder = data_dir / ("test" if "test" in path.stem.lower() else "train")
    if "rad_id" not in table.columns:
        table["rad_id"] = "consensus"
    needed = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
    absent = [column for column in needed if column not in table.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {absent}; is this VinDr-CXR's train.csv or test labels?")
    refuse_duplicates(table, needed, path, "reading(s) (the same film, finding, radiologist and box)")
    films = pd.Index(table.image_id.drop_duplicates())
    readers = table.groupby("image_id").rad_id.nunique()
    rows = pd.DataFrame({"path": [str(films_folder / f"{image}.dicom") for image in films]})
    rows["patient_id"] = films.astype(str)  # VinDr names no patients: each film (its image_id) counts as its own
    needed_readers = 1 if options["rule"] == "any" else 2
    boxes = []
    for name, (classes, _) in VINDR_MAPPING.items():
        marked = table[table.class_name.isin(classes)]
        votes = marked.groupby("image_id").rad_id.nunique().reindex(films, fill_value=0)
        positive = votes >= np.minimum(needed_readers, readers.reindex(films).to_numpy())
        rows[name] = (positive & (votes > 0)).to_numpy(dtype=float)
        on_positive = marked[marked.image_id.isin(films[rows[name].to_numpy() == 1])].dropna(subset=["x_min"])
        boxes.append(
            pd.DataFrame(
                {
                    "image_name": [str(films_folder / f"{image}.dicom") for image in on_positive.image_id],
                    "name": name,
                    "x": on_positive.x_min.to_numpy(),
                    "y": on_positive.y_min.to_numpy(),
                    "w": (on_positive.x_max - on_positive.x_min).to_numpy(),
                    "h": (on_positive.y_max - on_positive.y_min).to_numpy(),
                }
            )
        )
    views = pd.Series("FRONTAL", index=rows.index)  # VinDr-CXR holds frontal films only
    return Read(rows, views, path, boxes=pd.concat(boxes, ignore_index=True))


def _read_rsna(data_dir, csv_path, options):
    """RSNA Pneumonia Detection: DIR/stage_2_train_labels.csv (patientId, x, y, width, height, Target; a row per box
    of a film with Target 1) and DIR/stage_2_train_images/PATIENT_ID.dcm."""
    path = find_file(csv_path or "stage_2_train_labels.csv", data_dir, "label file")
    table = read_table(path)
    absent = [column for column in ("patientId", "x", "y", "width", "height", "Target") if column not in table.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {absent}; is this RSNA's stage_2_train_labels.csv?")
    refuse_duplicates(table, ["patientId", "x", "y", "width", "height"], path, "box(es) or film(s)")
    target = pd.to_numeric(table.Target, errors="coerce")
    if not target.isin([0, 1]).all():
        row = int(np.flatnonzero(~target.isin([0, 1]).to_numpy())[0])
        raise DataError(
            f"{path}, row {row + 2}: Target is {table.Target.iloc[row]!r}, not 0 or 1. Use the file unchanged."
        )
    films = table.groupby("patientId", sort=False).Target.max()
    images = data_dir / "stage_2_train_images"
    rows = pd.DataFrame({"path": [str(images / f"{film}.dcm") for film in films.index]})
    rows["patient_id"] = films.index.astype(str)  # one film per patientId, its NIH patient where the mapping says
    rows, nih_mapping = with_nih_patients(rows, films.index, path, data_dir, options["rsna_mapping"])
    rows["Pneumonia"] = films.to_numpy(dtype=float)
    marked = table[table.Target == 1].dropna(subset=["x"])
    boxes = pd.DataFrame(
        {
            "image_name": [str(images / f"{film}.dcm") for film in marked.patientId],
            "name": "Pneumonia",
            "x": marked.x.to_numpy(),
            "y": marked.y.to_numpy(),
            "w": marked.width.to_numpy(),
            "h": marked.height.to_numpy(),
        }
    )
    return Read(rows, pd.Series("FRONTAL", index=rows.index), path, boxes=boxes, nih_mapping=nih_mapping)


def _read_own_csv(data_dir, csv_path, options):
    """A hospital's own films: a CSV with path (relative to the data folder; PNG, JPEG or DICOM), patient_id, any of
    the 14 findings' columns (1 positive, 0 negative, -1 uncertain, blank unlabelled), and optionally view, sex and
    age. Without a view column every film is taken as frontal. A finding the file has no column for is unlabelled."""
    if not csv_path:
        raise DataError("--dataset csv needs the file: --csv my_films.csv (its paths relative to --data_dir)")
    path = find_file(csv_path, data_dir, "label file")
    table = read_table(path, dtype=str, keep_default_na=False)
    table.columns = [str(column).strip() for column in table.columns]
    absent = [column for column in OWN_CSV_COLUMNS if column not in table.columns]
    if absent:
        raise DataError(
            f"{path}: missing column(s) {absent}; a film list needs path and patient_id, and any of the 14 findings"
        )
    unknown = [column for column in table.columns if column not in (*OWN_CSV_COLUMNS, *OWN_CSV_OPTIONAL, *FINDINGS)]
    if unknown:
        raise DataError(
            f"{path}: column {unknown[0]!r} is no finding this model reads; use the 14 names as written: "
            f"{', '.join(FINDINGS)} (and path, patient_id, view, sex, age)"
        )
    findings = [finding for finding in FINDINGS if finding in table.columns]
    if not findings:
        raise DataError(f"{path}: no finding column; add one or more of {', '.join(FINDINGS)}")
    blank = table[OWN_CSV_COLUMNS[1]].str.strip() == ""
    if blank.any():
        raise DataError(f"{path}, row {int(np.flatnonzero(blank.to_numpy())[0]) + 2}: patient_id is empty")
    mapping = {finding: OWN_CSV_MAPPING[finding] for finding in findings}
    values = table[findings].apply(lambda column: column.str.strip()).replace("", np.nan)
    _check_labeler_values(values, mapping, path, OWN_CSV_VALUES)
    _inside(table, "path", path)
    refuse_duplicates(table, ["path"], path, "film(s)")
    labels = values.apply(pd.to_numeric).replace(-1, UNCERTAIN_VALUES[options["uncertain"]])
    rows = pd.DataFrame({"path": [str(Path(data_dir) / name) for name in table.path], "patient_id": table.patient_id})
    rows = rows.assign(**demographics(table.get("sex"), table.get("age"), table.get("view")))
    rows = pd.concat([rows, labels], axis=1)
    views = table["view"] if "view" in table.columns else pd.Series("FRONTAL", index=table.index)
    return Read(rows, views, path, mapping=mapping)


def _mimic_split(rows, data_dir):
    """MIMIC's own split by dicom_id (the film's file name), when mimic-cxr-2.0.0-split.csv lies in its folder."""
    path = Path(data_dir) / MIMIC_SPLIT_FILE
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


REGISTRY = {  # the datasets besides NIH (dataset.py), for evaluate.py and train.py alike
    "chexpert": Entry(
        _read_chexpert, CHEXPERT_MAPPING, "Path's patientNNNNN folder", (("train.csv", ""), ("valid.csv", "test"))
    ),
    "mimic": Entry(_read_mimic, CHEXPERT_MAPPING, "subject_id", (("", ""),), _mimic_split),
    "padchest": Entry(_read_padchest, PADCHEST_MAPPING, "PatientID", (("", ""),)),
    "vindr": Entry(
        _read_vindr, VINDR_MAPPING, "none: each film its own", (("train.csv", ""), (VINDR_TEST_FILE, "test"))
    ),
    "rsna": Entry(_read_rsna, RSNA_MAPPING, "none: each film (patientId) its own", (("", ""),)),
    "csv": Entry(_read_own_csv, OWN_CSV_MAPPING, "patient_id", (("", ""),)),
}
DATASETS = tuple(REGISTRY)
MAPPINGS = {name: entry.mapping for name, entry in REGISTRY.items()}
