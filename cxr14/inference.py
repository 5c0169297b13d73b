"""A trained model in PyTorch: rebuilt from a checkpoint alone (model_from_checkpoint), on a device in evaluation
mode, and its outputs over evaluation crops or loaders: logits, the out-of-distribution features and, where
Grad-CAM has a closed form, each finding's class activation map from the same pass; and the graph export.py exports.
What those outputs mean (thresholds, calibration, OOD) is cxr14/statistics.py's, in numpy.
"""

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr14 import calibration, ood
from cxr14.checkpoints import load_checkpoint
from cxr14.devices import autocast_dtype, select_device, use_channels_last
from cxr14.errors import DataError
from cxr14.loaders import evaluation_loader
from cxr14.pixels import FilmImages, evaluation_images
from cxr14.settings import DataSettings, ModelSettings, record_from_config
from cxr14.statistics import (
    BATCH_SIZE,
    checkpoint_sha256,
    predictions,
    read_thresholds_file,
    shown_thresholds,
    statistics_of,
    thresholds_owner,
    thresholds_path,
)
from dataset import FINDINGS
from model import build_model, cam_layer, cam_weights, cast_frozen, ood_features_and_logits
from transforms import normalize

TTA_CROPS = 5  # films.five_views: four corners and the centre


# ----------------------------------------------------------------------------- thresholds and statistics


# ----------------------------------------------------------------------------- PyTorch


class TorchModel:
    """A checkpoint's model on a device, in evaluation mode, with the precision and layout training used there, and
    its statistics (thresholds.json beside it first, for the thresholds and the calibration)."""

    def __init__(self, checkpoint_path, device="auto", amp=True, thresholds=None, calibrated=True):

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
        self.statistics = statistics_of(self.checkpoint)
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


def crop_outputs(net, crops, device, dtype=None, channels_last=False, maps=False):
    """uint8 [N, S, S] evaluation crops -> (float64 logits [N, findings], OOD features [N, F]), numpy: in batches,
    under inference_mode and autocast, one forward pass each. With maps, also each finding's class activation map
    [N, findings, h, w] (float32, from the last block's activations of the same pass, computed in fp32) where Grad-CAM
    has a closed form (model.cam_weights; heat_maps.finding_masks draws them), else None."""

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


def outputs_over(model, loader, crops=1, progress=None):
    """(logits [N, findings], readable [N] bool, OOD features [N, F]), float64 numpy, of a TorchModel over an
    evaluation loader (loaders.evaluation_loader); with crops > 1 (five views a film) each the mean of a film's."""

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
    reads the files; or `images`, the rows' images as pixels.dataset_images gives them), batched under
    inference_mode (AMP as in training), five crops each with tta (their mean)."""

    if images is None and data_dir is not None:
        images = evaluation_images(rows, data_dir, model.load_size, cache)
    elif images is None:
        images = FilmImages(rows["path"], model.load_size)
    loader = evaluation_loader(images, model.image_size, batch_size, workers, model.device, five=tta)

    def bar(batches):
        return tqdm(batches, desc=f"predicting {len(rows):,} images", disable=not progress)

    return outputs_over(model, loader, TTA_CROPS if tta else 1, bar)


# ----------------------------------------------------------------------------- ONNX Runtime


def model_from_checkpoint(checkpoint):
    """The trained model, rebuilt from the checkpoint's own config, backbone and timm arguments (no constants here to
    drift): torchvision's built on the meta device (no 25M random numbers drawn only to be overwritten), timm's on the
    CPU (their rotary embeddings are buffers made when built, which no state dict holds), then given the checkpoint's
    tensors."""
    built = {**checkpoint["config"], "BACKBONE": checkpoint["backbone"], "PRETRAINED": "none"}
    settings = record_from_config(ModelSettings, built, "the checkpoint")
    timm = checkpoint.get("timm")
    with torch.device("meta" if timm is None else "cpu"):
        net = build_model(
            len(checkpoint["findings"]),
            settings.pretrained,
            settings.trainable_layers,
            settings.dropout,
            settings.backbone,
            timm=timm,  # a timm network's image size, drop path and pooling, as it was built
        )
    net.load_state_dict(checkpoint["model"], assign=timm is None)
    return net
