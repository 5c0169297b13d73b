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
patient is in two parts; RSNA's copies of NIH films carry their NIH patient ("nih:13") and take that patient's part
(nih_copies.py). The official splits are used where a dataset has one (NIH's lists, CheXpert's valid.csv as
the test part, MIMIC's split file, VinDr's test.csv; docs/data.md, "Training on other datasets"); the rest is split by
VAL_FRACTION and TEST_FRACTION.
"""

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cxr14.errors import CheckpointError, DataError, SettingsError
from cxr14.external import DATASETS, REGISTRY, read_external
from cxr14.nih_copies import RSNA_MAPPING_FILES
from cxr14.pixels import find_cache
from dataset import (
    FINDINGS,
    SPLITS,
    attach_image_paths,
    check_patients_disjoint,
    find_label_file,
    label_sha256,
    make_split,
    read_labels,
    saved_split,
    split_by_patient,
)

TRAINING_DATASETS = ("nih", *DATASETS)  # train.py's DATASET values
NOT_KEPT_APART = (
    f"RSNA's films are NIH's, and without RSNA's mapping ({RSNA_MAPPING_FILES[0]} beside its labels) this union "
    "cannot keep an NIH patient in one part: an NIH test film may train through its RSNA copy. Put the mapping there."
)


class TrainingFilms(NamedTuple):
    """The films of a run: `rows` has image_name (unique in the run), path, patient_id, dataset, the 14 FINDINGS
    (1, 0, or NaN: unlabelled) and sex, age and view where known; `split` is each row's part (train, val, test)."""

    rows: pd.DataFrame
    split: pd.Series
    sources: list  # the label files read
    left_out: dict  # {dataset: {"laterals": n, "other views": n, ...}}: films read but not trained on
    missing: pd.DataFrame | None = None  # a saved split's films not on disk (image_name, split), when allowed


def dataset_names(data):
    """(the datasets, their folders) of a settings.DataSettings: DATASET and DATA_DIR, comma-separated, paired."""
    names = [name.strip() for name in data.dataset.split(",") if name.strip()]
    folders = [folder.strip() for folder in data.data_dir.split(",") if folder.strip()]
    if len(folders) != len(names):
        raise SettingsError(
            f"DATASET {data.dataset!r} names {len(names)} dataset(s) but DATA_DIR {data.data_dir!r} {len(folders)} "
            "folder(s): give one folder per dataset, in the same order (--data_dir data/nih,data/CheXpert-v1.0-small)"
        )
    if data.cache not in ("auto", "off") and len(names) > 1:
        raise SettingsError(
            f"CACHE {data.cache!r} with a union ({data.dataset}): each dataset's cache is found in its own folder "
            "(python cache.py --dataset NAME --data_dir FOLDER builds it there); set CACHE to auto or off"
        )
    if data.csv and len(names) > 1 and "csv" not in names:
        raise SettingsError(
            f"CSV {data.csv!r} with a union ({data.dataset}): each dataset's label file is found in its folder, and "
            "CSV names a hospital's own file, for a union with csv (nih,csv). Leave CSV empty"
        )
    return names, folders


def label_file_setting(name, data):
    """CSV as it applies to one dataset of DATASET: alone, its label file; in a union, the csv member's own file
    (every other member reads its own label file from its folder)."""
    return data.csv if name == "csv" or "," not in data.dataset else ""


def dataset_weights(data):
    """DATASET_WEIGHTS as one weight per dataset, or None: each dataset in proportion to its size."""
    if not data.dataset_weights.strip():
        return None
    names, _ = dataset_names(data)
    weights = [float(weight) for weight in data.dataset_weights.split(",")]
    if len(weights) != len(names):
        raise SettingsError(
            f"DATASET_WEIGHTS {data.dataset_weights!r} gives {len(weights)} weight(s) for {len(names)} dataset(s) "
            f"({data.dataset}): one per dataset, in the same order (1,1 for equal shares)"
        )
    return weights


def sampling(data, rows, split):
    """A line saying each dataset's share of a training epoch (a union's: `rows` and `split` of its TrainingFilms),
    and why it is that share."""
    train = rows.dataset[(split == "train").to_numpy()]
    sizes = train.value_counts().reindex(dataset_names(data)[0], fill_value=0).to_numpy()
    weights = dataset_weights(data)
    shares = sizes / max(sizes.sum(), 1) if weights is None else np.asarray(weights) / sum(weights)
    rule = "in proportion to its size" if weights is None else f"by DATASET_WEIGHTS {data.dataset_weights}"
    said = ", ".join(
        f"{name} {share:.0%}" + ("" if size else " (no training film: its validation and test films only)")
        for name, share, size in zip(dataset_names(data)[0], shares, sizes)
    )
    return f"each epoch draws from each dataset {rule}: {said}"


def image_groups(rows, data):
    """The rows' films per dataset, as pixels.dataset_images takes them: (the dataset, its folder, each film's name in
    its cache, their paths, their positions in `rows`). A cache is keyed by the dataset's own names (NIH's image
    name, the others' path below their folder), the run's names without their "dataset:" prefix."""
    folder_of = dict(zip(*dataset_names(data)))
    datasets = rows["dataset"].to_numpy()
    groups = []
    for name in dict.fromkeys(datasets):
        positions = np.flatnonzero(datasets == name)
        part = rows.iloc[positions]
        keys = [image.removeprefix(f"{name}:") for image in part.image_name]
        groups.append((name, folder_of[name], keys, part.path.to_numpy(), positions))
    return groups


def cache_films(name, folder, csv_path="", drop_missing=False):
    """image_name (the dataset's own: the cache's key) and path of every film a run on this dataset may read, for
    cache.py: for NIH every film of its label file, for the others their frontal films of the training files."""
    if name == "nih":
        return attach_image_paths(read_labels(find_label_file(folder, csv_path)), folder, drop_missing)
    return _read_registered(name, folder, csv_path, "ignore", drop_missing)[0]


def is_nih_only(data):
    return [name.strip() for name in data.dataset.split(",")] == ["nih"]


def read_training_films(data, saved_split=None, leave_out_missing=False):
    """The TrainingFilms of a settings.DataSettings; with `saved_split` (a resumed run's image_name/split table) that
    split instead of a new one, its films no longer on disk an error unless leave_out_missing. NIH's films in its
    complete cache need no PNG on disk (download.py --cache_only)."""
    names, folders = dataset_names(data)
    parts, sources, left_out = [], [], {}
    for name, folder in zip(names, folders):
        rows, official, label_files, dropped = _read_one(name, folder, data)
        if len(names) > 1 or name != "nih":  # a union's ids and names carry their dataset; NIH alone stays as it is
            rows["patient_id"] = run_patient_ids(name, rows)
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
        return _with_saved_split(rows, saved_split, sources, left_out, data.data_dir, leave_out_missing)
    rows["split"] = _nih_patients_part(rows)
    check_patients_disjoint(rows.patient_id, rows.split)
    return TrainingFilms(rows.drop(columns="split"), rows.split, sources, left_out)


def run_patient_ids(name, rows):
    """A union's patient ids of one dataset's rows: "dataset:id", or "nih:id" for another dataset's copy of an NIH
    film (nih_copies.py); evaluate.py names another dataset's films as a run that trained on it did."""
    patients = name + ":" + rows["patient_id"].astype(str)
    if "nih_image" not in rows.columns:
        return patients
    return patients.where(rows.nih_image.isna(), rows["patient_id"].astype(str))  # the reader gave them as "nih:13"


def _nih_patients_part(rows):
    """Each row's part, where the films of an NIH patient that another dataset holds (RSNA's) take the part of the
    patient's NIH films: no NIH test patient trains through a copy of their film."""
    nih = rows[rows.dataset == "nih"]
    if nih.empty:
        return rows.split
    if "nih_image" not in rows.columns:
        if "rsna" in set(rows.dataset):
            warnings.warn(NOT_KEPT_APART, stacklevel=3)
        return rows.split
    part_of = nih.groupby("patient_id").split.first()
    copies = (rows.dataset != "nih") & rows.patient_id.isin(part_of.index)
    return rows.split.where(~copies, rows.patient_id.map(part_of))


def _with_saved_split(rows, saved, sources, left_out, data_dir, leave_out_missing):
    """The saved split's films as read now; its films not found are an error (a resume trains on all of them), or
    with leave_out_missing (evaluate.py --drop_missing_images) left out and named in TrainingFilms.missing."""
    missing = saved[~saved.image_name.isin(rows.image_name)]
    if len(missing) and not leave_out_missing:
        raise DataError(
            f"{len(missing)} image(s) of the run's split are not below {data_dir} (first: {missing.image_name.iloc[0]})"
        )
    split = rows.image_name.map(saved.set_index("image_name")["split"])
    keep = split.notna().to_numpy()  # films added to a label file since the run started take no part
    rows = rows[keep].drop(columns="split").reset_index(drop=True)
    return TrainingFilms(rows, split[keep].reset_index(drop=True), sources, left_out, missing)


def _read_one(name, folder, data):
    """(rows with the 14 findings, the official split per row ("" where it has none), the label files read, films
    left out) of one dataset: its registry entry's training files (external.REGISTRY) and official split."""
    if name == "nih":
        cache = find_cache(folder, data.load_size, data.cache)
        csv_path = find_label_file(folder, label_file_setting(name, data))
        rows = attach_image_paths(read_labels(csv_path), folder, data.drop_missing_images, cache=cache)
        rows[list(FINDINGS)] = rows[list(FINDINGS)].astype(float)
        official = make_split(rows, csv_path, data.val_fraction, data.test_fraction, data.seed)
        return rows, official, [csv_path], {}
    return _read_registered(name, folder, label_file_setting(name, data), data.uncertain, data.drop_missing_images)


def _read_registered(name, folder, csv_path, uncertain, drop_missing):
    """_read_one of a dataset of external.REGISTRY."""
    entry = REGISTRY[name]
    (first, first_part), *others = entry.training_files
    files = [(csv_path or first, first_part)]
    files += [] if csv_path else [(file, part) for file, part in others if (Path(folder) / file).is_file()]
    tables, official, sources, left_out = [], [], [], {}
    for file, part in files:
        external = read_external(name, folder, file, uncertain, drop_missing)
        tables.append(_training_rows(external, folder))
        official.append(pd.Series(part, index=tables[-1].index))
        sources.append(Path(external.source))
        left_out = {key: left_out.get(key, 0) + value for key, value in _left_out(external).items()}
    rows = pd.concat(tables, ignore_index=True)
    official = pd.concat(official, ignore_index=True)
    if entry.official_split is not None:
        given = entry.official_split(rows, folder)
        official = official if given is None else given
    return rows, official, sources, left_out


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
    for column in ("sex", "age", "view", "nih_image"):
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


def _split(rows, official, data, name):
    """Each row's part: the official split where the dataset has one (its parts missing made by patient), else by
    patient with VAL_FRACTION and TEST_FRACTION."""
    if name == "nih":
        return official.to_numpy()
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


def load_split_labels(data, checkpoint, checkpoint_path):
    """The training_films.TrainingFilms of a settings.DataSettings: a new split for a new run; for a resumed run the
    checkpoint's own (checked against the split.csv beside it)."""
    if checkpoint is None:
        films = read_training_films(data)
    else:
        saved = saved_split(checkpoint.get("split"), Path(checkpoint_path).parent / "split.csv")
        if saved is None:
            raise CheckpointError(f"{checkpoint_path} carries no split and no split.csv lies beside it: cannot resume.")
        films = read_training_films(data, saved)
        check_same_labels(checkpoint["split"], films.sources, checkpoint_path)
    return films


def check_same_labels(record, label_files, checkpoint_path):
    """A resume reads the label files its run trained on: the same bytes (a moved folder resumes; a relabelled file,
    whose split and pos_weight would no longer be the run's, is refused). Format 1's oldest checkpoints kept no
    hash."""
    if "label_sha256" not in record:
        return
    now = label_sha256(label_files)
    if now != record["label_sha256"]:
        names = " and ".join(str(path) for path in label_files)
        raise CheckpointError(
            f"{checkpoint_path} was trained on other labels: {record['label_file']} then had SHA-256 "
            f"{record['label_sha256'][:12]}..., {names} now has {now[:12]}.... Resume with the label file the run "
            "started with (a moved folder resumes: the bytes are compared, not the path), or train anew in "
            "another OUT_DIR."
        )


def refuse_unlabelled(counts, label_files):
    """A training split with no labelled finding would train to a loss of 0 on nothing: refused, naming the files."""
    positives, negatives = counts
    if not (positives + negatives).any():
        raise DataError(
            f"no film of the training split has a labelled finding in {' and '.join(map(str, label_files))}: every "
            "finding cell is blank (unlabelled). Write 1 (positive) or 0 (negative) for the findings each film was "
            "read for."
        )


def say_films(data, films, log):
    """Say the label files, each dataset's films (a union's shares too) and the split's sizes of a TrainingFilms."""
    labels, split = films.rows, films.split
    log(f"labels: {', '.join(str(path) for path in films.sources)} ({len(labels):,} images)")
    if not is_nih_only(data):
        for line in describe(films):
            log(f"  {line}")
    if len(labels.dataset.unique()) > 1:
        log(f"  {sampling(data, labels, split)}")
    for part in SPLITS:
        rows = labels[split == part]
        log(f"{part:>5}: {len(rows):>7,} images, {rows['patient_id'].nunique():>6,} patients")
