"""A trained model and what it says about films: loaded from a checkpoint (PyTorch) or from export.py's ONNX file
(ONNX Runtime), its probabilities from evaluation crops, and what inference needs beside the weights, read and
written here only: the operating thresholds, the calibration (calibration.py) and the out-of-distribution statistics
(ood.py).

Where they are kept: train.py fits all three on the validation split (the OOD statistics on a sample of the training
films) when a run ends, and stores them in the run's best checkpoints ("inference"); evaluate.py writes its own
thresholds and calibration to evaluation/<checkpoint stem>/thresholds.json beside the checkpoint (its --sensitivity
policy, for older checkpoints too), which then take precedence unless fitted for another checkpoint (by SHA-256);
and it adds the OOD statistics to a checkpoint that lacks them.
Probabilities are calibrated unless asked otherwise; thresholds are then re-expressed on the calibrated scale, so the
decision at each operating point does not change.

No torch import at the top: the ONNX path (predict.py --onnx) runs where PyTorch is not installed.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

import calibration
import ood
from errors import DataError

BATCH_SIZE = 32  # films per forward pass when predicting
TTA_CROPS = 5  # films.five_views: four corners and the centre


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


# ----------------------------------------------------------------------------- thresholds and statistics


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
        content = json.loads(Path(path).read_text())
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
        return json.loads(Path(path).read_text()).get("checkpoint_sha256")
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
    Path(path).write_text(json.dumps(content, indent=2) + "\n")


def _numbers(findings, values):
    return {name: (float(value) if np.isfinite(value) else None) for name, value in zip(findings, values)}


def calibrated_thresholds(thresholds, fitted):
    """Raw-probability thresholds on the calibrated scale: calibration is monotone, so p >= t exactly when
    calibrated(p) >= calibrated(t)."""
    values = np.asarray(thresholds, dtype=np.float64)
    inside = np.isfinite(values) & (values > 0) & (values < 1)  # 0 marks every film and 1 or more none, either way
    shown = calibration.calibrated(calibration.logit(np.where(inside, values, 0.5)), *fitted)
    return np.where(inside, shown, values)


def fit_statistics(findings, val_logits, val_targets, val_features, train_features, train_patients, sensitivity=None):
    """Statistics fitted on the validation split (thresholds: Youden's J or a sensitivity; a Platt scaling) and on the
    training films' features (the OOD distribution, its percentiles from the validation films)."""
    from metrics import choose_thresholds

    thresholds = choose_thresholds(val_targets, calibration.sigmoid(val_logits), sensitivity)
    fitted = calibration.fit_platt(val_logits, val_targets)
    fitted_ood = ood.fit(train_features, val_features, train_patients) if train_features is not None else None
    return Statistics(dict(zip(findings, thresholds)), fitted, fitted_ood)


def fit_run_statistics(run_dir, data, batch_size, amp, labels, split, device, log):
    """What inference needs beside the weights, fitted at a run's end for best.pth and best_auroc.pth and stored in
    them: thresholds and a calibration on the validation split, the out-of-distribution statistics on a sample of the
    training films (calibration.py, ood.py); `data` is the run's settings.DataSettings. They are rewritten without
    the training state (a resume starts from epoch_NN.pth or interrupted.pth); best_auroc.pth stays a link to
    best.pth when both are the same epoch's."""
    from dataset import FINDINGS
    from datasets import image_groups
    from images import dataset_images
    from model import copy_checkpoint
    from run_folder import TRAINING_STATE

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
                outputs = {}
                for part, rows in parts.items():
                    images = dataset_images(image_groups(rows, data), model.load_size, data.cache)
                    outputs[part] = split_outputs(model, rows, batch_size=batch_size, progress=False, images=images)
                targets = parts["val"][list(FINDINGS)].to_numpy(dtype=float)
                train_patients = parts["train"].patient_id.to_numpy()
                statistics = fit_statistics(
                    FINDINGS, outputs["val"][0], targets, outputs["val"][2], outputs["train"][2], train_patients
                )
                fitted[epoch] = statistics
            store_statistics(path, fitted[epoch], TRAINING_STATE)
        written.append(path.name)
    if written:
        log(
            f"fitted on the validation split, and on {len(parts['train']):,} training films, and stored in "
            f"{' and '.join(written)}: thresholds, calibration, out-of-distribution statistics (inference.py)"
        )


def store_statistics(path, statistics, drop=()):
    """Keep a Statistics in the checkpoint at `path` (rewritten atomically, the keys in `drop` left out): train.py's
    at a run's end, and evaluate.py's OOD statistics for a checkpoint that lacks them."""
    from model import add_to_checkpoint

    add_to_checkpoint(path, drop, inference=statistics_record(statistics))


def statistics_record(statistics):
    """A Statistics as a checkpoint keeps it (tensors and plain numbers: weights_only loading accepts them)."""
    import torch

    record = {"thresholds": {name: float(value) for name, value in statistics.thresholds.items()}}
    if statistics.calibration is not None:
        record["calibration"] = [torch.tensor(part, dtype=torch.float64) for part in statistics.calibration]
    if statistics.ood is not None:
        record["ood"] = {
            key: torch.tensor(value, dtype=torch.float64) if isinstance(value, np.ndarray) else float(value)
            for key, value in statistics.ood.items()
        }
    return record


def statistics_of(checkpoint):
    """The Statistics a checkpoint carries (empty for one from before they were kept)."""
    record = checkpoint.get("inference") or {}
    thresholds = {name: value for name, value in record.get("thresholds", {}).items() if np.isfinite(value)}
    fitted = tuple(part.numpy() for part in record["calibration"]) if "calibration" in record else None
    fitted_ood = None
    if "ood" in record:
        fitted_ood = {key: value.numpy() if hasattr(value, "numpy") else value for key, value in record["ood"].items()}
    return Statistics(thresholds, fitted, fitted_ood)


# ----------------------------------------------------------------------------- PyTorch


class TorchModel:
    """A checkpoint's model on a device, in evaluation mode, with the precision and layout training used there, and
    its statistics (thresholds.json beside it first, for the thresholds and the calibration)."""

    def __init__(self, checkpoint_path, device="auto", amp=True, thresholds=None, calibrated=True):
        import torch

        from dataset import FINDINGS
        from devices import autocast_dtype, select_device, use_channels_last
        from model import cast_frozen, load_checkpoint, model_from_checkpoint
        from settings import DataSettings, record_from_config

        self.path = Path(checkpoint_path)
        self.checkpoint = load_checkpoint(checkpoint_path, FINDINGS)
        self.config = self.checkpoint["config"]  # the plain mapping the checkpoint carries
        self.data = record_from_config(DataSettings, self.config, str(self.path))
        self.device = select_device(device)
        self.dtype, self.channels_last = autocast_dtype(self.device, amp), use_channels_last(self.device, amp)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net = model_from_checkpoint(self.checkpoint).to(self.device, memory_format=layout).eval()
        cast_frozen(self.net, self.dtype or torch.float32)
        self.findings = list(self.checkpoint["findings"])
        self.image_size, self.load_size = self.data.image_size, self.data.load_size
        self.statistics = without_stale_ood(statistics_of(self.checkpoint), self.net, self.path)
        if thresholds and not Path(thresholds).is_file():
            raise DataError(
                f"thresholds file not found: {thresholds}. evaluate.py writes one (evaluation/<checkpoint stem>/"
                "thresholds.json beside the checkpoint, read without --thresholds); leave --thresholds out to use the "
                "checkpoint's own."
            )
        raw, fitted = read_thresholds_file(self._own_thresholds_file(thresholds))
        if thresholds and not raw:
            raise DataError(
                f"{thresholds} holds no usable threshold (every finding's is null: chosen on a split without both "
                "classes, or by an impossible --sensitivity). Evaluate again, or leave --thresholds out."
            )
        if raw:  # evaluate.py's (or the user's) thresholds and calibration first
            fitted = fitted or self.statistics.calibration
            self.statistics = self.statistics._replace(thresholds=raw, calibration=fitted)
        self.calibrated = calibrated and self.statistics.calibration is not None
        self.left_raw = calibration.left_raw(self.statistics.calibration, self.findings) if self.calibrated else []
        self.thresholds = shown_thresholds(self.statistics, self.findings, self.calibrated)

    def _own_thresholds_file(self, given):
        """The thresholds file to read: the one given, or evaluate.py's for this checkpoint; one fitted for another
        checkpoint (by its SHA-256) is refused when given and, found beside a checkpoint replaced since, ignored."""
        path = Path(given) if given else thresholds_path(self.path)
        owner = thresholds_owner(path) if path.is_file() else None
        if owner is None or owner == checkpoint_sha256(self.path):
            return path
        if given:
            raise DataError(
                f"{given} was fitted for another checkpoint (SHA-256 {owner[:12]}..., not {self.path}'s): its "
                f"thresholds and calibration would be wrong here. Use evaluate.py --checkpoint {self.path}'s."
            )
        print(
            f"warning: {path} was fitted for another checkpoint ({self.path} was replaced since): ignored; the "
            f"checkpoint's own thresholds are used. Run evaluate.py --checkpoint {self.path} again to refit them."
        )
        return None

    def predict(self, crops):
        """Predictions for uint8 [N, S, S] evaluation crops."""
        return self.predict_with_maps(crops, maps=False)[0]

    def predict_with_maps(self, crops, maps=True):
        """(Predictions, each finding's class activation map [N, findings, h, w], or None where the backbone's
        Grad-CAM has no closed form: crop_outputs) for uint8 [N, S, S] evaluation crops, from one forward pass."""
        logits, features, *class_maps = crop_outputs(self.net, crops, self.device, self.dtype, self.channels_last, maps)
        return predictions(logits, features, self.statistics, self.calibrated), (class_maps or [None])[0]


def without_stale_ood(statistics, net, path):
    """The statistics without their OOD part where it was fitted on features of another width (a checkpoint from
    before the features held the third block's halves): its distances would be meaningless."""
    from model import ood_features_of

    if statistics.ood is None or len(statistics.ood["mean"]) == ood_features_of(net):
        return statistics
    print(
        f"warning: {path}'s out-of-distribution statistics were fitted on features of an older version of this project "
        f"({len(statistics.ood['mean'])} wide, not {ood_features_of(net)}): no film is flagged. evaluate.py "
        f"--checkpoint {path} fits them again and stores them in the checkpoint."
    )
    return statistics._replace(ood=None)


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


def crop_outputs(net, crops, device, dtype=None, channels_last=False, maps=False):
    """uint8 [N, S, S] evaluation crops -> (float64 logits [N, findings], OOD features [N, F]), numpy: in batches,
    under inference_mode and autocast, one forward pass each. With maps, also each finding's class activation map
    [N, findings, h, w] (float32, from the last block's activations of the same pass, computed in fp32) where Grad-CAM
    has a closed form (model.cam_weights; heatmaps.finding_masks draws them), else None."""
    import torch

    from model import cam_layer, cam_weights, ood_features_and_logits
    from transforms import normalize

    weights = cam_weights(net) if maps else None
    logits, features, class_maps, captured = [], [], [], {}
    handle = None  # the last block's output is captured only when its maps are wanted
    if weights is not None:
        handle = cam_layer(net).register_forward_hook(lambda module, inputs, output: captured.update(maps=output))
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for start in range(0, len(crops), BATCH_SIZE):
                images = torch.from_numpy(np.asarray(crops[start : start + BATCH_SIZE])).unsqueeze(1).to(device)
                film_features, outputs = ood_features_and_logits(net, normalize(images, channels_last))
                logits.append(outputs.double().cpu().numpy())
                features.append(film_features.double().cpu().numpy())
                if weights is not None:
                    class_maps.append(_class_maps(weights, captured["maps"], device))
    finally:
        if handle is not None:
            handle.remove()
    outputs = np.concatenate(logits), np.concatenate(features)
    if not maps:
        return outputs
    return (*outputs, np.concatenate(class_maps) if weights is not None else None)


def _class_maps(weights, activations, device):
    """Each finding's class activation map, sum_c weight_kc * activation_c / cells: [N, findings, h, w] float32, in
    fp32 outside autocast whatever precision the forward pass ran in."""
    import torch

    with torch.autocast(device.type, enabled=False):
        cells = activations.shape[2] * activations.shape[3]
        return (torch.einsum("kc,nchw->nkhw", weights.float(), activations.float()) / cells).cpu().numpy()


def crop_probabilities(net, crops, device, dtype=None, channels_last=False):
    """uint8 [N, S, S] evaluation crops -> raw probabilities [N, findings] of a bare network (no statistics)."""
    logits, _ = crop_outputs(net, crops, device, dtype, channels_last)
    return calibration.sigmoid(logits)


def probability_graph(net, images, statistics=None, channels_last=False):
    """uint8 crops [N, 1, S, S] -> probabilities (calibrated, with a Statistics that has a calibration), and with
    OOD statistics also the Mahalanobis distance and the raw probabilities: normalisation, the network, the
    calibration and the distance in one graph, what export.py exports."""
    import torch

    from model import ood_features_and_logits
    from transforms import normalize

    features, logits = ood_features_and_logits(net, normalize(images, channels_last))
    logits = logits.float()
    raw = torch.sigmoid(logits)
    if statistics is None:
        return raw
    fitted = statistics.calibration or (np.ones(logits.shape[1]), np.zeros(logits.shape[1]))
    slopes, intercepts = (torch.as_tensor(part, dtype=torch.float32) for part in fitted)
    shown = torch.sigmoid(logits * slopes + intercepts)
    if statistics.ood is None:
        return shown, raw
    parts = {key: torch.as_tensor(statistics.ood[key], dtype=torch.float32) for key in ood.GRAPH_KEYS}
    unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
    centred = (unit - parts["mean"]) @ parts["components"].T - parts["location"]
    distance = torch.sqrt(torch.clamp(((centred @ parts["precision"]) * centred).sum(dim=1), min=0))
    return shown, distance, raw


def predict_logits(net, loader, prepare, dtype=None, progress=None, features=False):
    """Run a network over a loader of (uint8 images, companions); float32 logits and the companions (targets,
    or whether each film was readable), on the CPU; with features=True also the OOD features
    (model.ood_features_and_logits), from the same pass.

    prepare: turns a uint8 batch into the network's input on its device (normalised, in its layout)."""
    import torch

    from model import ood_features_and_logits

    net.eval()
    all_logits, all_companions, all_features = [], [], []
    with torch.inference_mode():
        for images, companions in progress(loader) if progress else loader:
            images = prepare(images)
            with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
                if features:
                    film_features, logits = ood_features_and_logits(net, images)
                    all_features.append(film_features.float())
                else:
                    logits = net(images)
            all_logits.append(logits.float())
            all_companions.append(companions)
    result = (torch.cat(all_logits).cpu(), torch.cat(all_companions).cpu())
    return (*result, torch.cat(all_features).cpu()) if features else result


def with_ood_warnings(films, predictions):
    """films.prepare's films with a warning added where the model's features say a film is unlike its training
    films (predictions.ood_flagged)."""
    return [
        film._replace(warnings=(*film.warnings, ood.WARNING.format(percentile=percentile))) if flagged else film
        for film, flagged, percentile in zip(films, predictions.ood_flagged, predictions.ood_percentile)
    ]


def outputs_over(model, loader, crops=1, progress=None):
    """(logits [N, findings], readable [N] bool, OOD features [N, F]), float64 numpy, of a TorchModel over an
    evaluation loader (loaders.evaluation_loader); with crops > 1 (five views a film) each the mean of a film's."""
    from transforms import normalize

    def prepare(batch):  # five views a film: the crops become a larger batch
        batch = batch.flatten(0, 1) if crops > 1 else batch
        return normalize(batch.to(model.device, non_blocking=True), model.channels_last)

    logits, readable, features = predict_logits(model.net, loader, prepare, model.dtype, progress, features=True)
    if crops > 1:
        logits, features = (part.view(-1, crops, part.shape[-1]).mean(dim=1) for part in (logits, features))
    return logits.double().numpy(), readable.numpy() == 1, features.double().numpy()


def split_outputs(
    model, rows, data_dir=None, batch_size=64, workers=0, tta=False, cache="auto", progress=True, images=None
):
    """(logits, readable, OOD features) of a TorchModel for the rows' films (a path column, and image_name for
    NIH's cache: data_dir, the NIH folder whose cache to read when it holds them, as the setting CACHE finds it; None
    reads the files; or `images`, the rows' images as images.dataset_images gives them), batched under
    inference_mode (AMP as in training), five crops each with tta (their mean)."""
    from tqdm import tqdm

    from images import FilmImages, evaluation_images
    from loaders import evaluation_loader

    if images is None and data_dir is not None:
        images = evaluation_images(rows, data_dir, model.load_size, cache)
    elif images is None:
        images = FilmImages(rows["path"], model.load_size)
    loader = evaluation_loader(images, model.image_size, batch_size, workers, model.device, five=tta)

    def bar(batches):
        return tqdm(batches, desc=f"predicting {len(rows):,} images", disable=not progress)

    return outputs_over(model, loader, TTA_CROPS if tta else 1, bar)


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
        report = json.loads(report_path.read_text())
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
    return pd.read_csv(table_path, dtype={"image_name": str, "patient_id": str})


# ----------------------------------------------------------------------------- ONNX Runtime


class OnnxModel:
    """An export.py ONNX file in ONNX Runtime: the same predictions as TorchModel, without PyTorch."""

    def __init__(self, path, calibrated=True):
        try:
            import onnxruntime
        except ImportError as error:
            raise DataError(f"--onnx needs ONNX Runtime: pip install -r requirements-extras.txt ({error})") from None
        path = Path(path)
        if not path.is_file():
            raise DataError(f"ONNX model not found: {path}")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises its own kinds for files that are not models
            message = f"{path} is not an ONNX model that ONNX Runtime can load ({error}); export.py writes them"
            raise DataError(message) from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "findings" not in metadata:
            raise DataError(f"{path} has no cxr14 metadata (findings, image_size): export it with export.py")
        self.findings = json.loads(metadata["findings"])
        self.image_size, self.load_size = int(metadata["image_size"]), int(metadata["load_size"])
        self.outputs = [output.name for output in self.session.get_outputs()]
        self.calibrated = calibrated and "raw_probabilities" in self.outputs
        self.left_raw = json.loads(metadata.get("left_raw", "[]")) if self.calibrated else []
        key = "thresholds" if self.calibrated else "raw_thresholds"
        thresholds = json.loads(metadata.get(key, metadata.get("thresholds", "{}")))
        self.thresholds = {finding: value for finding, value in thresholds.items() if value is not None}
        self.ood = json.loads(metadata["ood"]) if "ood" in metadata else None

    def predict_with_maps(self, crops):
        """(Predictions, None): heat maps need PyTorch (TorchModel.predict_with_maps)."""
        return self.predict(crops), None

    def predict(self, crops):
        images = np.asarray(crops, dtype=np.uint8)[:, None]
        starts = range(0, len(images), BATCH_SIZE)
        batches = [self.session.run(None, {"image": images[start : start + BATCH_SIZE]}) for start in starts]
        named = {name: np.concatenate([batch[k] for batch in batches]) for k, name in enumerate(self.outputs)}
        raw = named.get("raw_probabilities", named["probabilities"])
        shown = named["probabilities"] if self.calibrated else raw
        fitted_ood = None
        if self.ood is not None:
            fitted_ood = {"validation": np.asarray(self.ood["validation"]), "threshold": self.ood["threshold"]}
        return with_distances(shown, raw, fitted_ood, named.get("ood_distance"))


def load_model(checkpoint=None, onnx=None, device="auto", amp=True, thresholds=None, calibrated=True):
    """A TorchModel of a checkpoint, or an OnnxModel of an export."""
    if onnx:
        return OnnxModel(onnx, calibrated)
    return TorchModel(checkpoint, device, amp, thresholds, calibrated)
