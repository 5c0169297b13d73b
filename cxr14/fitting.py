"""The statistics inference needs beside the weights (cxr14/statistics.py), fitted: on the validation split
(thresholds, a calibration) and on a sample of the training films (the out-of-distribution statistics), at a run's
end by train.py and for older checkpoints by evaluate.py, and stored in the checkpoint."""

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr14 import calibration, ood
from cxr14.checkpoints import add_to_checkpoint, copy_checkpoint
from cxr14.inference import TorchModel, split_outputs
from cxr14.metrics import choose_thresholds
from cxr14.pixels import dataset_images
from cxr14.run_folder import TRAINING_STATE
from cxr14.statistics import Statistics
from cxr14.training_films import image_groups
from dataset import FINDINGS


def fit_statistics(
    findings, val_logits, val_targets, val_features, train_features, train_patients, sensitivity=None, progress=None
):
    """Statistics fitted on the validation split (thresholds: Youden's J or a sensitivity; a Platt scaling) and on the
    training films' features (the OOD distribution, its percentiles from the validation films; progress: ood.fit's)."""

    thresholds = choose_thresholds(val_targets, calibration.sigmoid(val_logits), sensitivity)
    fitted = calibration.fit_platt(val_logits, val_targets)
    fitted_ood = None
    if train_features is not None:
        fitted_ood = ood.fit(train_features, val_features, train_patients, progress)
    return Statistics(dict(zip(findings, thresholds)), fitted, fitted_ood)


def fit_run_statistics(run_dir, data, batch_size, amp, labels, split, device, log, kept=None):
    """What inference needs beside the weights, fitted at a run's end for best.pth and best_auroc.pth and stored in
    them: thresholds and a calibration on the validation split, the out-of-distribution statistics on a sample of the
    training films (calibration.py, ood.py); `data` is the run's settings.DataSettings. `kept`: {epoch: the
    loop.Validation of that epoch's pass}, whose logits and features stand for predicting the validation films again
    (a resumed run may lack the epochs before its resume). They are rewritten without the training state (a resume
    starts from epoch_NN.pth or interrupted.pth); best_auroc.pth stays a link to best.pth when both are the same
    epoch's."""
    parts = {"val": labels[split == "val"], "train": ood.fit_sample(labels[split == "train"], data.seed)}
    best, best_auroc = Path(run_dir) / "best.pth", Path(run_dir) / "best_auroc.pth"
    linked = best.is_file() and best_auroc.is_file() and os.path.samefile(best, best_auroc)
    fitted, written = {}, []
    for path in (best, best_auroc):
        if not path.is_file():
            continue
        if path == best_auroc and linked:
            copy_checkpoint(best, best_auroc)
        else:
            model = TorchModel(path, str(device), amp)
            epoch = model.checkpoint["epoch"]
            if epoch not in fitted:
                fitted[epoch] = _fit_epoch(model, parts, data, batch_size, (kept or {}).get(epoch), log)
            store_statistics(path, fitted[epoch], TRAINING_STATE)
        written.append(path.name)
    if written:
        log(
            f"fitted on the validation split, and on {len(parts['train']):,} training films, and stored in "
            f"{' and '.join(written)}: thresholds, calibration, out-of-distribution statistics (cxr14/fitting.py)"
        )


def _fit_epoch(model, parts, data, batch_size, validation, log):
    """The Statistics of one epoch's checkpoint: its validation outputs as kept (else predicted), the training
    sample's features predicted, each pass and the OOD fit with a bar."""
    outputs = {}
    for part, rows in parts.items():
        if part == "val" and validation is not None:
            outputs[part] = (validation.logits, None, validation.features)
            continue
        images = dataset_images(image_groups(rows, data), model.load_size, data.cache)
        log(f"epoch {model.checkpoint['epoch']}'s {'validation' if part == 'val' else 'training'} films, predicted:")
        outputs[part] = split_outputs(model, rows, batch_size=batch_size, images=images)
    targets = parts["val"][list(FINDINGS)].to_numpy(dtype=float)
    with tqdm(total=ood.FOLDS + 1, desc="fitting the out-of-distribution statistics", unit="PCA") as bar:
        return fit_statistics(
            FINDINGS,
            outputs["val"][0],
            targets,
            outputs["val"][2],
            outputs["train"][2],
            parts["train"].patient_id.to_numpy(),
            progress=bar,
        )


def store_statistics(path, statistics, drop=()):
    """Keep a Statistics in the checkpoint at `path` (rewritten atomically, the keys in `drop` left out): train.py's
    at a run's end, and evaluate.py's OOD statistics for a checkpoint that lacks them."""

    add_to_checkpoint(path, drop, inference=statistics_record(statistics))


def statistics_record(statistics):
    """A Statistics as a checkpoint keeps it (tensors and plain numbers: weights_only loading accepts them)."""

    record = {"thresholds": {name: float(value) for name, value in statistics.thresholds.items()}}
    if statistics.calibration is not None:
        record["calibration"] = [torch.tensor(part, dtype=torch.float64) for part in statistics.calibration]
    if statistics.ood is not None:
        record["ood"] = {
            key: torch.tensor(value, dtype=torch.float64) if isinstance(value, np.ndarray) else float(value)
            for key, value in statistics.ood.items()
        }
    return record
