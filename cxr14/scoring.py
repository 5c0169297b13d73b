"""What evaluate.py reports on, computed: the films of a run's own split (of NIH, or of the datasets it trained on),
or of another dataset, through a trained model (an Evaluation), with the thresholds and calibration that go with
them; and Google's expert labels scored beside NIH's on the same films. evaluate.py turns them into the report, its
tables and its plots.
"""

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from cxr14 import calibration, ood
from cxr14.errors import DataError
from cxr14.external import read_external
from cxr14.films import eval_crop
from cxr14.fitting import fit_statistics, store_statistics
from cxr14.inference import split_outputs
from cxr14.known_weights import known_weights
from cxr14.localisation import read_boxes, usable_boxes
from cxr14.mappings import EXPERT_MAPPING, EXPERT_UNSCORED, model_scores
from cxr14.nih_copies import NIH_COPIES, NOT_EXTERNAL, run_nih_patients
from cxr14.pixels import FilmImages, dataset_images, evaluation_images, find_cache
from cxr14.processes import worker_count
from cxr14.report import CHEXNET_AUROC, format_two_label_table, two_label_table
from cxr14.statistics import statistics_of
from cxr14.training_films import image_groups, is_nih_only, read_training_films, run_patient_ids
from dataset import FINDINGS, find_label_file, run_split, saved_split, split_rows


@dataclass(frozen=True)
class EvaluationSettings:
    """What evaluate.py was asked (its flags of the same names)."""

    checkpoint: str
    dataset: str  # "nih", or one of external.DATASETS
    split: str  # NIH: "test" or "val"
    data_dir: str | None
    csv: str
    test_list: str | None
    drop_missing_images: bool
    batch_size: int
    num_workers: int
    tta: bool
    sensitivity: float | None
    boxes: str | None
    uncertain: str
    min_age: float | None
    vindr_rule: str
    rsna_mapping: str
    refit: bool
    expert_labels: str | None
    bootstrap: int

    @classmethod
    def from_args(cls, args):
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


@dataclass
class Evaluation:
    """The evaluated films and what the model said of them."""

    names: list  # the findings scored: ours (NIH), or the other dataset's that map onto ours
    targets: np.ndarray  # [films, names]: 1, 0 or NaN (not labelled)
    raw: np.ndarray  # probabilities before calibration
    calibrated: np.ndarray | None  # after the checkpoint's (or this evaluation's) calibration; None without one
    fitted: tuple | None  # the calibration fitted here, on NIH's validation split; None elsewhere
    features: np.ndarray  # the OOD features (model.ood_features_and_logits), for the out-of-distribution percentiles
    rows: pd.DataFrame  # the films: image_name, path, patient_id, demographics
    thresholds: np.ndarray  # per name, on the raw scale; NaN where there is none
    reference: dict | None  # published AUROCs printed beside ours (CheXNet's, for NIH)
    boxes: pd.DataFrame | None  # radiologists' boxes for the localisation, or None
    about: dict  # what was evaluated and what was left out, for report.json


def outputs_of(model, rows, request, data=None):
    """(logits, readable, OOD features) of the rows' films: NIH's through its cache where one holds them, a run's
    other datasets (`data`: its settings.DataSettings) each through its own."""
    workers = worker_count(request.num_workers)
    data_dir = (request.data_dir or model.data.data_dir) if request.dataset == "nih" else None
    images = rows_images(model, rows, data, data_dir)
    return split_outputs(model, rows, None, request.batch_size, workers, request.tta, images=images)


def rows_images(model, rows, data, data_dir):
    """The rows' images as evaluation reads them: a run's other datasets (`data` not NIH alone) each through its own
    cache, NIH's through the cache of data_dir where one holds them, else the files."""
    if data is not None and not is_nih_only(data):
        return dataset_images(image_groups(rows, data), model.load_size)
    return (
        evaluation_images(rows, data_dir, model.load_size)
        if data_dir is not None
        else FilmImages(rows["path"], model.load_size)
    )


def readable_only(rows, outputs, drop_missing_images, skipped):
    """(rows, logits, features) of the films that could be read; the others an error naming the first few, or (with
    --drop_missing_images) left out and added to skipped["unreadable"]."""
    logits, readable, features = outputs
    if readable.all():
        return rows, logits, features
    names = list(rows.path[~readable])
    if not drop_missing_images:
        raise DataError(
            f"{len(names)} film(s) cannot be read (first: {', '.join(names[:3])}): truncated or not images. "
            "Re-extract or re-download them, or leave them out with --drop_missing_images (the report names them)."
        )
    print(f"warning: {len(names)} unreadable film(s) left out (first: {names[0]})")
    skipped["unreadable"] += names
    return rows[readable].reset_index(drop=True), logits[readable], features[readable]


# ----------------------------------------------------------------------------- NIH


def evaluate_nih(model, request):
    """The run's test (or validation) split, of NIH or of the datasets it trained on; thresholds and a calibration
    fitted on its validation split (and the out-of-distribution statistics, for a checkpoint that lacks them, on its
    training films)."""
    split, source = run_split(model.checkpoint, request.checkpoint, request.test_list)
    has_validation = bool((split.split == "val").any())
    needs_ood = model.statistics.ood is None and has_validation and bool((split.split == "train").any())
    own = own_fit(model, request, has_validation, needs_ood)
    refit = has_validation and own is None
    wanted = [request.split] + (["val"] if refit else []) + (["train"] if needs_ood else [])
    data, parts, missing = run_parts(model, request, split, source, wanted)
    skipped = {"missing": missing, "unreadable": []}
    if missing:
        print(f"warning: {len(missing)} film(s) missing and left out (first: {missing[0]})")
    rows = parts[request.split]
    saw = pretrained_saw_test(model) if "nih" in {name.strip() for name in data.dataset.split(",")} else None
    print(
        (f"PRETRAINED SAW THE TEST FILMS: {saw}\n" if saw else "")
        + f"checkpoint {request.checkpoint} (epoch {model.checkpoint['epoch']}); the {request.split} split: "
        f"{len(rows):,} images, {rows.patient_id.nunique():,} patients{'; five-crop TTA' if request.tta else ''}"
    )
    thresholds, fitted = np.full(len(FINDINGS), np.nan), None
    if has_validation:
        statistics = fit_on_validation(model, parts, needs_ood, request, skipped, data) if refit else own
        thresholds = np.array([statistics.thresholds.get(finding, np.nan) for finding in FINDINGS])
        fitted = statistics.calibration
    else:
        print("no validation split: no operating thresholds and no calibration (thresholds.json will hold none)")
    outputs = outputs_of(model, rows, request, data)
    rows, logits, features = readable_only(rows, outputs, request.drop_missing_images, skipped)
    nih = is_nih_only(data)
    about = {
        "dataset": "nih" if nih else data.dataset,
        "split": request.split,
        "split_source": source,
        "images": len(rows),
        "patients": int(rows.patient_id.nunique()),
        "skipped": skipped,
        **({"pretrained_saw_test_films": saw} if saw else {}),
    }
    return Evaluation(
        names=list(FINDINGS),
        targets=rows[list(FINDINGS)].to_numpy(dtype=float),
        raw=calibration.sigmoid(logits),
        calibrated=calibration.calibrated(logits, *fitted) if fitted is not None else None,
        fitted=fitted,
        features=features,
        rows=rows,
        thresholds=thresholds,
        reference=CHEXNET_AUROC if nih else None,
        boxes=nih_boxes(request, model.data) if nih else None,
        about=about,
    )


def own_fit(model, request, has_validation, needs_ood):
    """The thresholds and calibration the checkpoint carries, fitted on its validation split at the run's end, when
    they serve this evaluation as they are (Youden's thresholds, the run's own split): the validation films are then
    not predicted again. None when they must be fitted here: --refit, --sensitivity, --test_list, or a checkpoint
    without them (or without OOD statistics, fitted with them)."""
    own = statistics_of(model.checkpoint)
    asked = request.refit or request.sensitivity is not None or request.test_list
    if not has_validation or needs_ood or asked or not own.thresholds or own.calibration is None:
        return None
    print("thresholds and calibration: the checkpoint's own, fitted on its validation split (--refit fits them again)")
    return own


def pretrained_saw_test(model):
    """Why the weights the run started from (PRETRAINED) saw NIH films of the official test list, or None: from
    known_weights.KNOWN_WEIGHTS. Said, never refused: a user may measure such a start knowingly."""
    known = known_weights(model.checkpoint["config"].get("PRETRAINED", ""))
    if known is None or not known.saw_nih_test:
        return None
    return (
        f"the run started from {known.title}, pretrained on {known.data}: {known.saw_nih_test}. Its NIH test score "
        "is not a score on films its weights never saw"
    )


def run_parts(model, request, split, source, wanted):
    """(the run's settings.DataSettings, {part: rows} of the wanted parts of its split, the films missing): NIH's
    rows from its label file (a complete cache's films need no PNG: download.py --cache_only), the other datasets'
    as train.py read them, with their dataset (training_films.read_training_films)."""
    changes = {"data_dir": request.data_dir} if request.data_dir else {}
    data = replace(model.data, drop_missing_images=request.drop_missing_images, **changes)
    if is_nih_only(data):
        cache = find_cache(data.data_dir, model.load_size)
        csv = request.csv or data.csv
        parts, missing = split_rows(split, source, data.data_dir, csv, wanted, request.drop_missing_images, cache)
        return data, parts, missing
    if request.test_list or request.csv:
        raise DataError(
            f"{request.checkpoint} trained on {data.dataset}: its split is evaluated as it was read; --test_list and "
            "--csv are for NIH runs"
        )
    films = read_training_films(data, saved_split=split, leave_out_missing=request.drop_missing_images)
    parts = {}
    for part in dict.fromkeys(wanted):
        parts[part] = films.rows[(films.split == part).to_numpy()].reset_index(drop=True)
        if parts[part].empty:
            raise DataError(f"the {part} part of {source} is empty")
    missing = [] if films.missing is None else films.missing.image_name[films.missing.split.isin(wanted)]
    return data, parts, sorted(missing)


def part_crops(model, part="val", data_dir=None, drop_missing_images=False):
    """(rows with their findings' labels, uint8 evaluation crops [N, S, S]) of one part of a TorchModel's own split,
    read as evaluate.py reads it (each dataset through its cache where one holds its films; data_dir: the run's
    folder(s) where they lie now): export.py --int8 calibrates on the validation part and checks the model there."""
    request = SimpleNamespace(
        checkpoint=str(model.path), data_dir=data_dir, csv=None, test_list=None, drop_missing_images=drop_missing_images
    )
    split, source = run_split(model.checkpoint, request.checkpoint)
    data, parts, _ = run_parts(model, request, split, source, [part])
    rows = parts[part]
    if rows.empty:
        raise DataError(f"the {part} part of {source} holds no film")
    images = rows_images(model, rows, data, data.data_dir)
    return rows, np.stack([eval_crop(images[index], model.image_size) for index in range(len(rows))])


def fit_on_validation(model, parts, needs_ood, request, skipped, data=None):
    """The statistics of fitting.fit_statistics: thresholds (this evaluation's policy) and a calibration on the
    validation split; and for a checkpoint without out-of-distribution statistics (written before they were kept)
    those too, on a sample of its training films, stored in it as train.py does at a run's end."""
    outputs = outputs_of(model, parts["val"], request, data)
    validation, val_logits, val_features = readable_only(parts["val"], outputs, request.drop_missing_images, skipped)
    sample = ood.fit_sample(parts["train"], model.data.seed) if needs_ood else None
    train_features = outputs_of(model, sample, request, data)[2] if needs_ood else None
    statistics = fit_statistics(
        FINDINGS,
        val_logits,
        validation[list(FINDINGS)].to_numpy(dtype=float),
        val_features,
        train_features,
        None if sample is None else sample.patient_id.to_numpy(),
        request.sensitivity,
    )
    if needs_ood:
        store_statistics(model.path, statistics)
        model.statistics = model.statistics._replace(ood=statistics.ood)
        print(f"{model.path} had no out-of-distribution statistics: fitted on {len(sample):,} training films, added")
    return statistics


def nih_boxes(request, data):
    """NIH's box file (BBox_List_2017.csv beside the label file, or --boxes), or None; `data`: the run's
    settings.DataSettings."""
    if request.boxes == "none":
        return None
    default = find_label_file(request.data_dir or data.data_dir, request.csv or data.csv).parent
    boxes_path = Path(request.boxes) if request.boxes else default / "BBox_List_2017.csv"
    if not boxes_path.is_file():
        if request.boxes:
            raise DataError(f"box file not found: {boxes_path}")
        return None
    return read_boxes(boxes_path).assign(source=str(boxes_path))


# ----------------------------------------------------------------------------- other datasets


def evaluate_external(model, request):
    """Another dataset's frontal films, the findings that map onto ours; thresholds from NIH's validation split
    (evaluation/<checkpoint stem>/thresholds.json beside the checkpoint), where a finding maps to one of ours."""
    if not request.data_dir:
        raise DataError(f"--dataset {request.dataset} needs --data_dir: the dataset's folder")
    data = read_external(
        request.dataset,
        request.data_dir,
        request.csv,
        request.uncertain,
        request.drop_missing_images,
        request.min_age,
        request.vindr_rule,
        request.rsna_mapping,
    )
    names = list(data.mapping)
    skipped = {"missing": data.skipped["missing"], "unreadable": []}
    data = data._replace(rows=outside_the_run(model, data, request))
    caveat = not_external(model, data, request)
    print(
        f"checkpoint {request.checkpoint} (epoch {model.checkpoint['epoch']}); {request.dataset} ({data.source}): "
        f"{len(data.rows):,} frontal films of {data.rows.patient_id.nunique():,} patients; left out "
        f"{data.laterals:,} lateral and {data.other_views:,} other films"
        + "".join(f", {count:,} {reason}" for reason, count in data.left_out.items())
        + f"; uncertain labels: {request.uncertain}"
        + (f"\nNOT EXTERNAL: {caveat}" if caveat else "")
    )
    outputs = outputs_of(model, data.rows, request)
    rows, logits, features = readable_only(data.rows, outputs, request.drop_missing_images, skipped)
    probabilities = calibration.sigmoid(logits)
    nih = model.statistics.thresholds
    thresholds = np.array([nih.get(found[0], np.nan) if len(found) == 1 else np.nan for found in data.mapping.values()])
    fitted = model.statistics.calibration
    after = None if fitted is None else model_scores(calibration.calibrated(logits, *fitted), data.mapping, FINDINGS)
    about = external_about(data, rows, skipped, request, caveat)
    return Evaluation(
        names=names,
        targets=rows[names].to_numpy(dtype=float),
        raw=model_scores(probabilities, data.mapping, FINDINGS),
        calibrated=after,  # NIH's calibration, applied as it is: no new fit on another hospital's films
        fitted=None,
        features=features,
        rows=rows,
        thresholds=thresholds,
        reference=None,
        boxes=None if request.boxes == "none" else external_boxes(data, rows, probabilities),
        about=about,
    )


def external_about(data, rows, skipped, request, caveat):
    """What was evaluated of another dataset and what was left out, for report.json."""
    about = {
        "source": data.source,
        "images": len(rows),
        "patients": int(rows.patient_id.nunique()),
        "laterals_left_out": data.laterals,
        "other_views_left_out": data.other_views,
        "left_out": data.left_out,
        "skipped": skipped,
        "uncertain": request.uncertain,
        "mapping": {name: list(mapped) for name, mapped in data.mapping.items()},
        "threshold_source": "NIH's validation split (thresholds.json beside the checkpoint, else the checkpoint's)",
        **({"nih_mapping": data.nih_mapping} if data.nih_mapping else {}),
        **({"not_external": caveat} if caveat else {}),
    }
    if request.dataset == "vindr":
        about["vindr_rule"] = request.vindr_rule
    return about


TRAINED_ON = "films of the run's training or validation split, or of their patients"


def outside_the_run(model, data, request):
    """Another dataset's rows less the films the run trained or was validated on, and every film of their patients
    (a run that trained on this dataset, alone or in a union, names its films `dataset:path` in its split), and less
    RSNA's copies of the NIH films of the patients it trained or was validated on (nih_copies.py); the counts left
    out are added to data.left_out. A run that never saw the dataset, or NIH, leaves every film in."""
    saved = saved_split(model.checkpoint.get("split"), Path(request.checkpoint).parent / "split.csv")
    if saved is None:  # no split is known: nothing to leave out
        return data.rows
    seen = set(saved.image_name[saved.split.isin(("train", "val"))])
    prefix = f"{request.dataset}:"  # as training_films names a film: its path below the dataset's folder
    names = [prefix + Path(os.path.relpath(path, request.data_dir)).as_posix() for path in data.rows.path]
    patients = run_patient_ids(request.dataset, data.rows)
    trained = pd.Series(names, index=data.rows.index).isin(seen)
    left = trained | patients.isin(set(patients[trained]))
    copies = ~left & patients.isin(run_nih_patients(seen))
    if (left | copies).all():
        raise DataError(
            f"every one of the {len(left):,} films of {data.source} is among the {TRAINED_ON}: scoring them would "
            f"measure what the run learnt, not how it generalises. Evaluate its own test part: python evaluate.py "
            f"--checkpoint {request.checkpoint} (no --dataset)"
        )
    for reason, count in ((TRAINED_ON, int(left.sum())), (NIH_COPIES, int(copies.sum()))):
        if count:
            data.left_out[reason] = count
    return data.rows[~(left | copies).to_numpy()].reset_index(drop=True)


def not_external(model, data, request):
    """Why this score is not an external one, or None: RSNA's films scored by a run that trained on NIH's, without the
    mapping that leaves out the films it saw (nih_copies.NOT_EXTERNAL)."""
    trained_on = str(model.checkpoint.get("config", {}).get("DATASET", "nih")).split(",")
    if request.dataset == "rsna" and data.nih_mapping is None and "nih" in trained_on:
        return NOT_EXTERNAL
    return None


def external_boxes(data, rows, probabilities):
    """A dataset's boxes (VinDr, RSNA) as localise takes them: each box's finding is the model's finding that scores
    its reported name on that film (the most probable of those mapped to it, e.g. Mass or Nodule)."""
    if data.boxes is None or data.boxes.empty:
        return None
    row_of = pd.Series(np.arange(len(rows)), index=rows.image_name)
    boxes = usable_boxes(data.boxes[data.boxes.image_name.isin(row_of.index)], data.source)
    chosen = []
    for box in boxes.itertuples():
        mapped = data.mapping[box.name]
        row = probabilities[row_of[box.image_name]]
        chosen.append(max(mapped, key=lambda finding: row[FINDINGS.index(finding)]))
    return boxes.assign(finding=chosen, source=data.source)


# ----------------------------------------------------------------------------- expert labels


def expert_section(request, experts, rows, probabilities, out):
    """Google's expert labels (expert_labels.py) on the films of the evaluated split: each finding's AUROC
    against NIH's labels and against the experts' on the same films; expert_labels.csv and the report.json entry."""
    experts = experts.set_index("image_name")
    inside = rows.image_name.isin(experts.index).to_numpy()
    if not inside.any():
        raise DataError(
            f"none of the {len(experts):,} films of {request.expert_labels} is in the {request.split} split"
        )
    names = list(EXPERT_MAPPING)
    films = rows[inside].reset_index(drop=True)
    nih = np.stack([films[list(mapped)].max(axis=1).to_numpy(dtype=float) for mapped in EXPERT_MAPPING.values()], 1)
    expert = experts.loc[films.image_name, names].to_numpy(dtype=float)
    scores = model_scores(probabilities[inside], EXPERT_MAPPING, FINDINGS)
    table = two_label_table(names, nih, expert, scores, films.patient_id.to_numpy(), request.bootstrap)
    print(
        f"expert labels ({request.expert_labels}): {inside.sum():,} of its {len(experts):,} films are in the "
        f"{request.split} split; the same films against NIH's labels and the experts':"
    )
    print(format_two_label_table(table))
    print(f"not scored (no NIH finding): {', '.join(EXPERT_UNSCORED)}")
    pd.DataFrame(table).to_csv(out / "expert_labels.csv", index=False)
    return {
        "file": str(request.expert_labels),
        "films_in_file": len(experts),
        "films_in_split": int(inside.sum()),
        "mapping": {name: list(mapped) for name, mapped in EXPERT_MAPPING.items()},
        "findings": table,
        "unscored": list(EXPERT_UNSCORED),
    }
