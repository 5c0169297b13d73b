"""export.py's ONNX file in ONNX Runtime: the same predictions as inference.TorchModel, without PyTorch, and
load_model, which gives either."""

import json
from pathlib import Path

import numpy as np

from cxr14.errors import DataError
from cxr14.statistics import BATCH_SIZE, with_distances


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
        side = self.session.get_inputs()[0].shape[-1]
        if isinstance(side, int) and side != self.image_size:
            raise DataError(
                f"{path}'s metadata says image_size {self.image_size}, but its graph takes {side}-px images: the file "
                "was changed after export. Export it again with export.py."
            )
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
    from cxr14.inference import TorchModel  # PyTorch only for a checkpoint: an ONNX deployment runs without it

    return TorchModel(checkpoint, device, amp, thresholds, calibrated)
