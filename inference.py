"""A trained model and what it says about films: loaded from a checkpoint (PyTorch) or from export.py's ONNX file
(ONNX Runtime), its probabilities from evaluation crops, and what inference needs beside the weights: the operating
thresholds (evaluation/thresholds.json beside the checkpoint), read and written here only.

No torch import at the top: the ONNX path (predict.py --onnx) runs where PyTorch is not installed.
"""

import json
from pathlib import Path

import numpy as np

from errors import DataError

BATCH_SIZE = 32  # films per forward pass when predicting


# ----------------------------------------------------------------------------- thresholds


def thresholds_path(checkpoint_path):
    """Where evaluate.py writes a checkpoint's thresholds, and predict.py, the page and export.py find them."""
    return Path(checkpoint_path).parent / "evaluation" / "thresholds.json"


def read_thresholds(path):
    """{finding: threshold} from a thresholds.json, or {} when there is none (NaN entries left out)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        thresholds = json.loads(Path(path).read_text())["thresholds"]
        return {name: float(value) for name, value in thresholds.items() if value is not None and np.isfinite(value)}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(
            f"{path} is not a thresholds file of evaluate.py (a JSON object with a 'thresholds' object of finding: "
            f"number): {error}. Rewrite it with evaluate.py, or leave --thresholds out."
        ) from None


def write_thresholds(path, policy, thresholds):
    """thresholds.json: the policy that chose them and {finding: threshold (None where none could be chosen)}."""
    entries = {finding: (float(value) if np.isfinite(value) else None) for finding, value in thresholds.items()}
    Path(path).write_text(json.dumps({"policy": policy, "thresholds": entries}, indent=2) + "\n")


# ----------------------------------------------------------------------------- PyTorch


class TorchModel:
    """A checkpoint's model on a device, in evaluation mode, with the precision and layout training used there."""

    def __init__(self, checkpoint_path, device="auto", amp=True):
        import torch

        from dataset import FINDINGS
        from devices import autocast_dtype, select_device, use_channels_last
        from model import load_checkpoint, model_from_checkpoint

        self.checkpoint = load_checkpoint(checkpoint_path, FINDINGS)
        self.config = self.checkpoint["config"]
        self.device = select_device(device)
        self.dtype, self.channels_last = autocast_dtype(self.device, amp), use_channels_last(self.device, amp)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net = model_from_checkpoint(self.checkpoint).to(self.device, memory_format=layout).eval()
        self.findings = list(self.checkpoint["findings"])
        self.image_size, self.load_size = self.config["IMAGE_SIZE"], self.config["LOAD_SIZE"]
        self.thresholds = read_thresholds(thresholds_path(checkpoint_path))

    def probabilities(self, crops):
        """uint8 [N, S, S] evaluation crops -> float [N, findings]."""
        return crop_probabilities(self.net, crops, self.device, self.dtype, self.channels_last)


def crop_probabilities(net, crops, device, dtype=None, channels_last=False):
    """uint8 [N, S, S] evaluation crops -> numpy float32 [N, findings], in batches under inference_mode and autocast."""
    import torch

    batches = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, len(crops), BATCH_SIZE):
            images = torch.from_numpy(np.asarray(crops[start : start + BATCH_SIZE])).unsqueeze(1).to(device)
            batches.append(probability_graph(net, images, channels_last).float().cpu().numpy())
    return np.concatenate(batches)


def probability_graph(net, images, channels_last=False):
    """uint8 crops [N, 1, S, S] -> probabilities: normalisation, the network and the sigmoid. The one computation of
    predictions, the page and the ONNX graph (export.py exports exactly this)."""
    import torch

    from transforms import normalize

    return torch.sigmoid(net(normalize(images, channels_last)).float())


def predict_logits(net, loader, prepare, dtype=None, progress=None):
    """Run a network over a loader of (uint8 images, targets); float32 logits and targets, on the CPU.

    prepare: turns a uint8 batch into the network's input on its device (normalised, in its layout)."""
    import torch

    net.eval()
    all_logits, all_targets = [], []
    with torch.inference_mode():
        for images, targets in progress(loader) if progress else loader:
            images = prepare(images)
            with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
                logits = net(images)
            all_logits.append(logits.float())
            all_targets.append(targets)
    return torch.cat(all_logits).cpu(), torch.cat(all_targets).cpu()


# ----------------------------------------------------------------------------- ONNX Runtime


class OnnxModel:
    """An export.py ONNX file in ONNX Runtime: the same probabilities as TorchModel, without PyTorch."""

    def __init__(self, path):
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
        thresholds = json.loads(metadata.get("thresholds", "{}"))
        self.thresholds = {finding: value for finding, value in thresholds.items() if value is not None}

    def probabilities(self, crops):
        images = np.asarray(crops, dtype=np.uint8)[:, None]
        return np.concatenate(
            [
                self.session.run(None, {"image": images[i : i + BATCH_SIZE]})[0]
                for i in range(0, len(images), BATCH_SIZE)
            ]
        )


def load_model(checkpoint=None, onnx=None, device="auto", amp=True):
    """A TorchModel of a checkpoint, or an OnnxModel of an export."""
    return OnnxModel(onnx) if onnx else TorchModel(checkpoint, device, amp)
