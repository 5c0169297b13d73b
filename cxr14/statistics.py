"""What a trained model says about films, in numpy alone (no torch: predict.py --onnx and the page run it where
PyTorch is not installed): the statistics inference needs beside the weights, read and written here only (the
operating thresholds, the calibration: calibration.py, the out-of-distribution statistics: ood.py), the predictions
made with them, and where evaluate.py keeps a checkpoint's files.

Where they are kept: train.py fits all three on the validation split (the OOD statistics on a sample of the training
films) when a run ends, and stores them in the run's best checkpoints ("inference"; cxr14/fitting.py); evaluate.py
writes its own thresholds and calibration to evaluation/<checkpoint stem>/thresholds.json beside the checkpoint (its
--sensitivity policy, for older checkpoints too), which then take precedence unless fitted for another checkpoint (by
SHA-256); and it adds the OOD statistics to a checkpoint that lacks them. Probabilities are calibrated unless asked
otherwise; thresholds are then re-expressed on the calibrated scale, so the decision at each operating point does
not change.
"""

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cxr14 import calibration, ood
from cxr14.errors import DataError

BATCH_SIZE = 32  # films per forward pass when predicting (PyTorch and ONNX Runtime alike)


class Statistics(NamedTuple):
    """What inference needs beside the weights."""

    thresholds: dict  # finding: threshold on the raw (uncalibrated) probability
    calibration: tuple = None  # (slopes, intercepts) per finding (calibration.fit_platt), or None
    ood: dict = None  # ood.fit's statistics, or None


class Predictions(NamedTuple):
    probabilities: np.ndarray  # [films, findings]: calibrated (or raw, when asked)
    raw: np.ndarray  # [films, findings]: the network's sigmoid outputs
    ood_percentile: np.ndarray  # [films]: NaN without OOD statistics
    ood_flagged: np.ndarray  # [films] bool


def evaluation_folder(checkpoint_path):
    """Where evaluate.py writes a checkpoint's report: RUN/evaluation/<checkpoint's stem>/, one folder per checkpoint
    (a report of epoch_01.pth never replaces the thresholds that predict.py uses for best.pth)."""
    return Path(checkpoint_path).parent / "evaluation" / Path(checkpoint_path).stem


def thresholds_path(checkpoint_path):
    """Where evaluate.py writes a checkpoint's thresholds, and predict.py, the page and export.py find them."""
    return evaluation_folder(checkpoint_path) / "thresholds.json"


def checkpoint_sha256(path):
    """The SHA-256 of a checkpoint file: which checkpoint an evaluation's files were made for."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_thresholds_file(path):
    """(raw thresholds {finding: value}, calibration or None) from a thresholds.json, or ({}, None) when there is
    none (NaN entries left out)."""
    if path is None or not Path(path).is_file():
        return {}, None
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        thresholds = {name: float(value) for name, value in content["thresholds"].items() if _finite(value)}
        platt = content.get("calibration")
        fitted = None if not platt else tuple(np.array([platt[name][k] for name in platt]) for k in (0, 1))
        return thresholds, fitted
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise DataError(
            f"{path} is not a thresholds file of evaluate.py (a JSON object with a 'thresholds' object of finding: "
            f"number): {error}. Rewrite it with evaluate.py, or leave --thresholds out."
        ) from None


def _finite(value):
    return value is not None and np.isfinite(value)


def thresholds_owner(path):
    """The SHA-256 of the checkpoint a thresholds.json was fitted for (None: a file from before they said so)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("checkpoint_sha256")
    except (ValueError, AttributeError):
        return None


def write_thresholds(path, policy, thresholds, findings, fitted=None, checkpoint_sha256=None):
    """thresholds.json: the checkpoint it was fitted for (its SHA-256), the policy that chose them, {finding: threshold
    on the raw probability (None where none could be chosen)}, and with a calibration its (a, b) per finding and the
    same thresholds on the calibrated scale."""
    content = {"checkpoint_sha256": checkpoint_sha256, "policy": policy, "thresholds": _numbers(findings, thresholds)}
    if fitted is not None:
        content["calibration"] = {name: [float(a), float(b)] for name, a, b in zip(findings, *fitted)}
        content["calibrated_thresholds"] = _numbers(findings, calibrated_thresholds(thresholds, fitted))
    Path(path).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _numbers(findings, values):
    return {name: (float(value) if np.isfinite(value) else None) for name, value in zip(findings, values)}


def calibrated_thresholds(thresholds, fitted):
    """Raw-probability thresholds on the calibrated scale: calibration is monotone, so p >= t exactly when
    calibrated(p) >= calibrated(t)."""
    values = np.asarray(thresholds, dtype=np.float64)
    inside = np.isfinite(values) & (values > 0) & (values < 1)  # 0 marks every film and 1 or more none, either way
    shown = calibration.calibrated(calibration.logit(np.where(inside, values, 0.5)), *fitted)
    return np.where(inside, shown, values)


def statistics_of(checkpoint):
    """The Statistics a checkpoint carries (empty for one from before they were kept)."""
    record = checkpoint.get("inference") or {}
    thresholds = {name: value for name, value in record.get("thresholds", {}).items() if np.isfinite(value)}
    fitted = tuple(part.numpy() for part in record["calibration"]) if "calibration" in record else None
    fitted_ood = None
    if "ood" in record:
        fitted_ood = {key: value.numpy() if hasattr(value, "numpy") else value for key, value in record["ood"].items()}
    return Statistics(thresholds, fitted, fitted_ood)


def shown_thresholds(statistics, findings, calibrated):
    """{finding: threshold} on the scale of the probabilities shown (calibrated or raw)."""
    if not calibrated or not statistics.thresholds:
        return dict(statistics.thresholds)
    raw = np.array([statistics.thresholds.get(name, np.nan) for name in findings])
    shown = calibrated_thresholds(raw, statistics.calibration)
    return {name: float(value) for name, value in zip(findings, shown) if np.isfinite(value)}


def predictions(logits, features, statistics, calibrated=True):
    """Predictions from the network's logits and OOD features (model.ood_features_and_logits), with a model's
    statistics."""
    raw = calibration.sigmoid(logits)
    shown = calibration.calibrated(logits, *statistics.calibration) if calibrated else raw
    distances = None if statistics.ood is None or features is None else ood.distances(statistics.ood, features)
    return with_distances(shown, raw, statistics.ood, distances)


def with_distances(shown, raw, fitted_ood, distances):
    """Predictions, the films' out-of-distribution percentiles and flags read from their distances (NaN and not
    flagged without OOD statistics)."""
    if fitted_ood is None or distances is None:
        return Predictions(shown, raw, np.full(len(raw), np.nan), np.zeros(len(raw), dtype=bool))
    return Predictions(shown, raw, ood.percentiles(fitted_ood, distances), ood.flagged(fitted_ood, distances))


def at_or_above(probabilities, findings, thresholds):
    """Whether each probability ([..., findings]) is at or above its finding's threshold (False where it has none)."""
    limits = np.array([thresholds.get(finding, np.inf) for finding in findings])
    return np.asarray(probabilities) >= limits


def with_ood_warnings(films, predictions):
    """films.prepare's films with a warning added where the model's features say a film is unlike its training
    films (predictions.ood_flagged)."""
    return [
        film._replace(warnings=(*film.warnings, ood.WARNING.format(percentile=percentile))) if flagged else film
        for film, flagged, percentile in zip(films, predictions.ood_flagged, predictions.ood_percentile)
    ]


def prediction_table(rows, names, targets, probabilities, ood_percentile):
    """predictions.csv of an evaluation: a row per film, its image_name and patient_id, label_<finding> (1, 0, or
    empty where not labelled) and prob_<finding> per finding scored, and its out-of-distribution percentile."""
    table = pd.DataFrame({"image_name": rows["image_name"].to_numpy(), "patient_id": rows["patient_id"].to_numpy()})
    targets = np.asarray(targets, dtype=float)
    for k, name in enumerate(names):
        table[f"label_{name}"] = pd.Series(targets[:, k]).astype("Int64")  # NaN: <NA>, written empty
    for k, name in enumerate(names):
        table[f"prob_{name}"] = np.asarray(probabilities)[:, k]
    table["ood_percentile"] = ood_percentile
    return table


def current_predictions(checkpoint_path, split="test", test_list=None):
    """The predictions.csv that evaluate.py wrote for this very checkpoint (by its SHA-256) on this split of its own
    (a report of another dataset's films has no "split"), without TTA, in its evaluation folder; None when there is
    none, or it belongs to another checkpoint or split."""
    folder = evaluation_folder(checkpoint_path)
    report_path, table_path = folder / "report.json", folder / "predictions.csv"
    if not (report_path.is_file() and table_path.is_file()):
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    wanted = {
        "checkpoint_sha256": checkpoint_sha256(checkpoint_path),
        "split": split,
        "tta": False,
        "test_list": str(Path(test_list).resolve()) if test_list else None,
    }
    if any(report.get(key) != value for key, value in wanted.items()):
        return None
    return read_prediction_table(table_path)


def read_prediction_table(path):
    """A predictions.csv evaluate.py wrote, checked: its films, and a probability column (numbers from 0 to 1) per
    finding it scored; a damaged one is an error naming it, not a difference between runs."""
    fix = "evaluate the checkpoint again (python evaluate.py --checkpoint ...), which rewrites it"
    try:
        table = pd.read_csv(path, dtype={"image_name": str, "patient_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{path} is not a predictions table that evaluate.py wrote ({error}): {fix}") from None
    probabilities = [column for column in table.columns if column.startswith("prob_")]
    if "image_name" not in table.columns or not probabilities:
        raise DataError(f"{path} lacks the image_name or prob_<finding> columns: {fix}")
    for column in probabilities:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.index[(values.isna() & table[column].notna()) | (values < 0) | (values > 1)]
        if len(bad):
            row = bad[0] + 2  # the file's line: a header, then rows from 1
            raise DataError(f"{path}, row {row}: {column} is {table[column][bad[0]]!r}, not a probability: {fix}")
        table[column] = values
    return table
