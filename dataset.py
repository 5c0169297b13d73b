"""NIH ChestX-ray14's labels: the label CSV read and checked (findings, patients, demographics), which films are on
disk (or in the cache), patient-level splits (NIH's official lists or a seeded one) and the split a run keeps, and the
pos_weight counts. Every user CSV is read through read_table.

Data flows one way: this file knows nothing of models or training; the pixels are pixels.py's and loaders.py's.
"""

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import DataError
from cxr14.pixels import cached_names, index_images

# The 14 findings in the order of the NIH paper and CheXNet; model outputs follow this order.
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"  # the label NIH uses for "all 14 negative"
IMAGE_COLUMN = "Image Index"
LABELS_COLUMN = "Finding Labels"
PATIENT_COLUMN = "Patient ID"
DEMOGRAPHICS = ("Patient Gender", "Patient Age", "View Position")  # sex, age, view: for the subgroup report
FOLLOW_UP_COLUMN = "Follow-up #"
OFFICIAL_LISTS = ("train_val_list.txt", "test_list.txt")  # NIH's patient-disjoint split, beside the CSV
SPLITS = ("train", "val", "test")
POS_WEIGHT_POLICIES = ("ratio", "sqrt", "none")


# ----------------------------------------------------------------------------- labels


def demographics(sex, age, view):
    """sex (F/M), age (years) and view (PA/AP) columns of whichever of the three a dataset has (None: it has not),
    for the subgroup report: each dataset's spellings ("Female", " m", "AP Supine") reduced to these; an age that is
    not a number is NaN."""
    columns = {}
    if sex is not None:
        columns["sex"] = sex.astype(str).str.strip().str.upper().str[:1].where(lambda s: s.isin(["F", "M"]))
    if age is not None:
        columns["age"] = pd.to_numeric(age, errors="coerce")
    if view is not None:
        text = view.astype(str).str.strip().str.upper()
        columns["view"] = text.where(text.isin(["PA", "AP"]), np.where(text.str.startswith("AP"), "AP", None))
    return columns


def read_table(path, fix="download or export it again", **options):
    """A user's CSV file (a label, box or split file) as pandas reads it, with what can be wrong said in one line
    naming the file (and `fix`, what to do about an empty one): empty, not UTF-8 (the line where it is found), or not
    a table."""
    path = Path(path)
    try:
        return pd.read_csv(path, encoding="utf-8-sig", **options)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty (0 bytes): {fix}") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (saved as Latin-1 or another encoding?). Save it as UTF-8 CSV."
        ) from None
    except pd.errors.ParserError as error:
        raise DataError(f"{path} is not a CSV table pandas can read ({str(error).strip()})") from None


def read_labels(csv_path):
    """Read Data_Entry_2017.csv (2017 or 2020 form) into image_name, patient_id, one 0/1 column per finding, and the
    sex (F/M), age, view (PA/AP) and follow_up number where the file has them."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"label file not found: {csv_path}")
    # dtype=str: no silent float conversion of ids; the 2017 header's trailing comma only adds an unused column.
    table = read_table(csv_path, "download NIH's Data_Entry_2017_v2020.csv again", dtype=str, keep_default_na=False)
    table.columns = [str(column).strip() for column in table.columns]
    missing = [c for c in (IMAGE_COLUMN, LABELS_COLUMN, PATIENT_COLUMN) if c not in table.columns]
    if missing:
        raise DataError(
            f"{csv_path}: missing column(s) {missing}; found {list(table.columns)}. "
            "Use the NIH file Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv) unchanged."
        )
    if table.empty:
        raise DataError(f"{csv_path} has its header but no rows: download NIH's Data_Entry_2017_v2020.csv again")
    labels = pd.DataFrame({"image_name": table[IMAGE_COLUMN].str.strip()})
    labels["patient_id"] = _parse_patient_ids(table[PATIENT_COLUMN], labels["image_name"], csv_path)
    labels[list(FINDINGS)] = _parse_findings(table[LABELS_COLUMN], labels["image_name"], csv_path)
    labels = labels.assign(**demographics(*(table.get(column) for column in DEMOGRAPHICS)))  # absent: left out
    if FOLLOW_UP_COLUMN in table.columns:
        labels["follow_up"] = pd.to_numeric(table[FOLLOW_UP_COLUMN], errors="coerce")
    duplicated = labels["image_name"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise DataError(f"{csv_path}, row {row + 2}: image {labels['image_name'][row]} is listed twice.")
    return labels


def _parse_patient_ids(column, image_names, csv_path):
    patient_ids = pd.to_numeric(column.str.strip(), errors="coerce")
    bad = patient_ids.isna() | (patient_ids % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{csv_path}, row {row + 2} (image {image_names[row]}): patient id {column[row]!r} is not a whole number."
        )
    return patient_ids.astype(np.int64)


def _parse_findings(column, image_names, csv_path):
    """Pipe-separated labels to a uint8 matrix; any label outside FINDINGS + 'No Finding' is an error."""
    dummies = column.str.replace(r"\s*\|\s*", "|", regex=True).str.strip().str.get_dummies(sep="|")
    known = set(FINDINGS) | {NO_FINDING}
    for label in dummies.columns:
        if label not in known:
            row = int(np.flatnonzero(dummies[label].to_numpy())[0])
            raise DataError(
                f"{csv_path}, row {row + 2} (image {image_names[row]}): unknown finding {label!r} in "
                f"{column[row]!r}. Valid labels: {', '.join(FINDINGS)}, {NO_FINDING} (joined with '|')."
            )
    empty = dummies.sum(axis=1).to_numpy() == 0
    no_finding = dummies.get(NO_FINDING, pd.Series(0, index=dummies.index)).to_numpy() == 1
    matrix = dummies.reindex(columns=list(FINDINGS), fill_value=0).to_numpy(dtype=np.uint8)
    contradictory = no_finding & (matrix.sum(axis=1) > 0)
    for problem, what in ((empty, "has no label"), (contradictory, "mixes 'No Finding' with findings")):
        if problem.any():
            row = int(np.flatnonzero(problem)[0])
            raise DataError(f"{csv_path}, row {row + 2} (image {image_names[row]}): {what}: {column[row]!r}.")
    return matrix


# ----------------------------------------------------------------------------- splits


def split_by_patient(patient_ids, fractions, seed):
    """Assign each patient (never an image) to one of len(fractions) parts; returns the part number per row."""
    patients = np.unique(np.asarray(patient_ids))
    shuffled = np.random.default_rng(seed).permutation(patients)
    bounds = np.round(np.cumsum(fractions) / np.sum(fractions) * len(patients)).astype(int)
    part_of_patient = np.searchsorted(bounds, np.arange(len(patients)), side="right")
    part = pd.Series(part_of_patient, index=shuffled)
    return part.loc[np.asarray(patient_ids)].to_numpy()


def make_split(labels, csv_path, val_fraction, test_fraction, seed):
    """One split name per row of `labels`: NIH's official lists when they sit beside the CSV, else by patient.

    With the lists, test = test_list.txt and val is `val_fraction` of the train_val patients. Without them,
    patients are split train/val/test by 1 - val - test, val, test. Either way no patient is in two splits.
    """
    list_paths = [Path(csv_path).parent / name for name in OFFICIAL_LISTS]
    if all(path.is_file() for path in list_paths):
        split = _split_from_official_lists(labels, *list_paths)
        train_val = (split == "train").to_numpy()
        part = split_by_patient(labels["patient_id"][train_val], [1 - val_fraction, val_fraction], seed)
        split[train_val] = np.where(part == 1, "val", "train")
    else:
        fractions = [1 - val_fraction - test_fraction, val_fraction, test_fraction]
        if min(fractions) < 0:
            raise DataError(f"val_fraction {val_fraction} + test_fraction {test_fraction} exceed 1.")
        part = split_by_patient(labels["patient_id"], fractions, seed)
        split = pd.Series(np.array(SPLITS)[part], index=labels.index)
    check_patients_disjoint(labels["patient_id"], split)
    return split


def _split_from_official_lists(labels, train_val_path, test_path):
    names = {path: set(path.read_text(encoding="utf-8").split()) for path in (train_val_path, test_path)}
    in_train_val = labels["image_name"].isin(names[train_val_path])
    in_test = labels["image_name"].isin(names[test_path])
    neither = ~(in_train_val | in_test)
    if neither.any():
        raise DataError(
            f"{neither.sum()} image(s) of the CSV are in neither {train_val_path.name} nor {test_path.name} "
            f"(first: {', '.join(labels['image_name'][neither][:5])}). Use the lists that came with the CSV, "
            "or remove them to split by patient."
        )
    return pd.Series(np.where(in_test, "test", "train"), index=labels.index, dtype=object)


def check_patients_disjoint(patient_ids, split):
    """Raise if any patient has images in two splits (their images are correlated: it would leak)."""
    splits_per_patient = pd.Series(np.asarray(split)).groupby(np.asarray(patient_ids)).nunique()
    shared = splits_per_patient[splits_per_patient > 1]
    if len(shared):
        raise DataError(
            f"{len(shared)} patient(s) appear in two splits (first: patient {shared.index[0]}). "
            "Official lists must be patient-disjoint; fix them or remove them to split by patient."
        )


def save_split(labels, split, path):
    """The split actually used, one row per image: the one truth about which images were seen."""
    table = pd.DataFrame({"image_name": labels["image_name"], "patient_id": labels["patient_id"], "split": split})
    table.to_csv(path, index=False)


def read_split(path):
    """The table written by save_split: image_name, patient_id, split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}. It is written by train.py into the run folder.")
    return read_table(path, dtype={"image_name": str, "split": str})


def split_record(labels, split, label_files):
    """The split in a form a checkpoint can carry (plain types and a tensor: weights_only loading accepts it): the
    image names, one code per image (SPLITS), and the label files' names and SHA-256 (of their bytes in order)."""
    return {
        **names_and_codes(labels["image_name"], split),
        "label_file": " and ".join(Path(path).name for path in label_files),
        "label_sha256": label_sha256(label_files),
    }


def names_and_codes(image_names, split):
    """The image names, joined, and one int8 code per image (SPLITS): a split record's core, also what
    checkpoints.upgrade rebuilds from a split.csv."""
    import torch  # here, not at the top: train.py's --help imports this file before torch

    codes = pd.Categorical(np.asarray(split, dtype=object), categories=SPLITS).codes
    return {"image_names": "\n".join(image_names), "codes": torch.tensor(codes, dtype=torch.int8)}


def label_sha256(label_files):
    """The SHA-256 of the label files' bytes, in order: which labels a run trained on, wherever the files lie."""
    digest = hashlib.sha256()
    for path in label_files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def saved_split(record, split_path):
    """The split a run trained with, as image_name and split columns: the checkpoint's own record, checked against
    split.csv when one lies beside the checkpoint; None for a checkpoint without one (checkpoints.upgrade gives the
    oldest theirs from split.csv)."""
    if record is None:
        return None
    on_disk = read_split(split_path) if Path(split_path).is_file() else None
    names = record["image_names"].split("\n")
    table = pd.DataFrame({"image_name": names, "split": np.array(SPLITS)[record["codes"].numpy()]})
    if on_disk is not None:
        if set(zip(on_disk.image_name, on_disk.split)) != set(zip(table.image_name, table.split)):
            raise DataError(
                f"{split_path} differs from the split saved in the checkpoint beside it: the checkpoint belongs to "
                "another run. Move it to its own run folder, or delete the split.csv that does not belong to it."
            )
    return table


def run_split(checkpoint, checkpoint_path, test_list=None):
    """(image_name/split table, where it came from): the checkpoint's own split (checked against the split.csv
    beside it), or split.csv alone for older checkpoints; with test_list, that file's images as the test part."""
    if test_list:
        names = Path(test_list).read_text(encoding="utf-8").split()
        return pd.DataFrame({"image_name": names, "split": "test"}), str(test_list)
    saved = saved_split(checkpoint.get("split"), Path(checkpoint_path).parent / "split.csv")
    if saved is None:
        official = Path(checkpoint["config"]["DATA_DIR"]) / "test_list.txt"
        raise DataError(
            f"{checkpoint_path} carries no split (written before checkpoints did) and no split.csv lies beside it, "
            f"so which images it never saw is unknown. Evaluate it in its run folder; or, only if the run trained on "
            f"NIH's train_val_list.txt, on the official test list: --test_list {official}"
        )
    return saved, f"the split of {checkpoint_path}"


def split_rows(split, source, data_dir, csv_path, parts, drop_missing=False, cache=None):
    """({part: labels with image paths} for parts of a run's split, the names of the images that are missing: left
    out with drop_missing, else an error). The label file is read and the images indexed once. Films a complete
    cache holds need no file (attach_image_paths)."""
    csv_file = find_label_file(data_dir, csv_path)
    labels = read_labels(csv_file).set_index("image_name")
    wanted = []
    for part in dict.fromkeys(parts):
        names = split.image_name[split.split == part]
        unknown = names[~names.isin(labels.index)]
        if len(unknown):
            raise DataError(f"{len(unknown)} image(s) of {source} are not in {csv_file} (first: {unknown.iloc[0]})")
        if len(names) == 0:
            raise DataError(f"the {part} part of {source} is empty")
        wanted.append(labels.loc[names].reset_index().assign(part=part))
    wanted = pd.concat(wanted, ignore_index=True)
    with warnings.catch_warnings():  # said once below, naming them
        warnings.simplefilter("ignore")
        rows = attach_image_paths(wanted, data_dir, drop_missing, flag="--drop_missing_images", cache=cache)
    missing = sorted(set(wanted.image_name) - set(rows.image_name))
    return {part: rows[rows.part == part].drop(columns="part").reset_index(drop=True) for part in parts}, missing


# ----------------------------------------------------------------------------- pos_weight


def count_positives(targets):
    """Per finding: (positives, negatives) over the labelled entries of a target matrix (1, 0, or NaN: unlabelled,
    counted as neither)."""
    targets = np.asarray(targets, dtype=float)
    return (targets == 1).sum(axis=0).astype(np.int64), (targets == 0).sum(axis=0).astype(np.int64)


def pos_weight_from_counts(positives, negatives, policy="ratio", cap=0.0):
    """BCEWithLogitsLoss pos_weight per finding: negatives / positives ('ratio'), its square root ('sqrt'),
    or 1 ('none'), then capped at `cap` when cap > 0. A finding with no positive gets 1.0 and a warning:
    its loss term has nothing to up-weight, and an infinite weight would poison the others."""
    if policy not in POS_WEIGHT_POLICIES:
        raise ValueError(f"pos_weight policy {policy!r}: choose one of {POS_WEIGHT_POLICIES}")
    positives = np.asarray(positives, dtype=np.float64)
    negatives = np.asarray(negatives, dtype=np.float64)
    ratio = np.divide(negatives, positives, out=np.ones_like(positives), where=positives > 0)
    weight = {"ratio": ratio, "sqrt": np.sqrt(ratio), "none": np.ones_like(ratio)}[policy]
    if cap > 0:
        weight = np.minimum(weight, cap)
    absent = [finding for finding, count in zip(FINDINGS, positives) if count == 0]
    if absent:
        warnings.warn(
            f"no positive example of {', '.join(absent)} in the training rows: pos_weight set to 1.0; "
            "these findings cannot be learned from this split.",
            stacklevel=2,
        )
    return weight


# ----------------------------------------------------------------------------- images


def attach_image_paths(
    labels, data_dir, drop_missing=False, flag="DROP_MISSING_IMAGES (--drop_missing_images true)", cache=None
):
    """Add a `path` column. Missing images are one clear error naming `flag` (the setting that leaves them out), or
    dropped with a warning when asked. An image without a file that a complete cache folder (`cache`) holds is kept
    with an empty path: its pixels come from the cache (download.py --cache_only keeps no PNG)."""
    paths = labels["image_name"].map(index_images(data_dir)).astype(object)
    missing = paths.isna()
    if cache is not None and missing.any():
        cached = labels["image_name"].isin(cached_names(cache))
        paths[missing & cached] = ""
        missing &= ~cached
    if missing.any():
        names = ", ".join(labels["image_name"][missing][:5])
        message = f"{missing.sum()} of {len(labels)} images in the CSV are not below {data_dir} (first: {names})"
        if not drop_missing:
            raise DataError(
                f"{message}. Extract all 12 NIH archives there (see docs/data.md, 'Getting the data'), or set "
                f"{flag} to use the images present."
            )
        warnings.warn(f"{message}; they are left out.", stacklevel=2)
    labels = labels[~missing].copy()
    labels["path"] = paths[~missing].map(str)
    return labels.reset_index(drop=True)


def find_file(path, folder, what="file"):
    """A file named in a setting or flag: as given (absolute, or from the current folder), else below the dataset
    folder (a documented command's --csv train.csv means the dataset's own); an error naming both places otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute() and (Path(folder) / path).is_file():
        return Path(folder) / path
    raise DataError(f"{what} not found: {path} (looked for it as given and in {folder})")


def find_label_file(data_dir, csv_path=""):
    """The label CSV: `csv_path` when given (as given, or below data_dir), else the one Data_Entry_2017*.csv below
    data_dir."""
    if csv_path:
        return find_file(csv_path, data_dir, "label file")
    data_dir = Path(data_dir)
    found = sorted(data_dir.rglob("Data_Entry_2017*.csv")) if data_dir.is_dir() else []
    if not found:
        raise DataError(
            f"no Data_Entry_2017*.csv in {data_dir.resolve()}. Download NIH ChestX-ray14 into it "
            "(docs/data.md, 'Getting the data'), or try the synthetic demo: python demo_data.py --out data/demo, "
            "then python train.py config/demo.py"
        )
    if len(found) > 1:
        raise DataError(f"several label files below {data_dir}: {[str(p) for p in found]}; set CSV to one.")
    return found[0]
