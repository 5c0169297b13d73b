"""A trained checkpoint as an ONNX model, to deploy without PyTorch (ONNX Runtime; predict.py --onnx uses it).

    python export.py --checkpoint checkpoints/resnet50/best.pth --out model.onnx

The input contract (also in the file's metadata, "input"): input "image", uint8 [N, 1, S, S], N free: each film as
8-bit grayscale (DICOM windowed), letterboxed to LOAD_SIZE x LOAD_SIZE (longer side resized, centred on black),
resized to round(S / 0.875) when that differs from LOAD_SIZE, and centre-cropped to S = IMAGE_SIZE: what
films.eval_crop gives. The graph itself scales to [0, 1], makes the three ImageNet-normalised channels, runs the
network and its outputs: "probabilities", float32 [N, 14] in the order of the metadata's "findings", calibrated
(inference.py, calibration.py); "ood_distance", float32 [N], how far the film lies from the training films (ood.py);
"raw_probabilities", the network's own sigmoid outputs. (A checkpoint without those statistics exports
"probabilities" alone, raw.) Metadata: findings, image_size, load_size, eval_crop_fraction, normalisation, whether
the probabilities are calibrated, the thresholds on their scale (and on the raw scale), the calibration, the OOD
threshold and the validation films' distances (for percentiles), the training run's config and its SHA-256, the
checkpoint's epoch.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from configurator import add_checkpoint_flag, add_out_flag
from errors import DataError, one_line_errors
from films import EVAL_CROP_FRACTION
from inference import TorchModel, probability_graph
from ood import FLAG_PERCENTILE
from transforms import IMAGENET_MEAN, IMAGENET_STD

OPSET = 18  # ONNX Runtime 1.16 and later run it
INPUT_CONTRACT = (
    "uint8 [N, 1, S, S] with S = image_size: the film as 8-bit grayscale, letterboxed to load_size (longer side "
    "resized, centred on black), resized to round(S / eval_crop_fraction) when that differs from load_size, then "
    "centre-cropped to S. Normalisation happens inside the graph."
)


class Deployable(nn.Module):
    """uint8 evaluation crops -> the outputs of inference.probability_graph: normalisation, network, calibration and
    the out-of-distribution distance inside the graph, so a consumer cannot get them wrong."""

    def __init__(self, net, statistics=None):
        super().__init__()
        self.net, self.statistics = net, statistics

    def forward(self, image):
        return probability_graph(self.net, image, self.statistics)


def output_names(statistics):
    if statistics is None:
        return ["probabilities"]
    return ["probabilities", "raw_probabilities"] if statistics.ood is None else [*OUTPUTS]


OUTPUTS = {
    "probabilities": "float32 [N, findings]: calibrated probabilities (Platt scaling fitted on the validation split) "
    "in the order of 'findings'; the raw sigmoid outputs where 'calibrated' is false, and for the findings of "
    "'left_raw' (calibration.LEFT_RAW)",
    "ood_distance": "float32 [N]: the Mahalanobis distance of the film's features to the training films'; above "
    "'ood' threshold it is unlike them, and its findings may mean nothing",
    "raw_probabilities": "float32 [N, findings]: the network's own sigmoid outputs (inflated by the training's "
    "pos_weight)",
}


def metadata(model, outputs):
    """What a consumer needs, as text: findings, sizes, normalisation, thresholds on the scale of 'probabilities',
    calibration, the OOD statistics' percentiles, and the training run's config."""
    config, checkpoint, statistics = model.config, model.checkpoint, model.statistics
    config_json = json.dumps(config, sort_keys=True)
    properties = {
        "findings": json.dumps(model.findings),
        "image_size": str(model.image_size),
        "load_size": str(model.load_size),
        "eval_crop_fraction": str(EVAL_CROP_FRACTION),
        "normalisation": json.dumps({"scale": "1/255", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "in_graph": True}),
        "input": INPUT_CONTRACT,
        "output": "; ".join(f"{name}: {OUTPUTS[name]}" for name in outputs),
        "calibrated": json.dumps(model.calibrated),
        "left_raw": json.dumps(model.left_raw),  # findings whose "calibrated" probability is the raw one
        "thresholds": json.dumps(model.thresholds),
        "raw_thresholds": json.dumps(statistics.thresholds),
        "backbone": checkpoint["backbone"],
        "epoch": str(checkpoint["epoch"]),
        "config": config_json,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }
    if statistics.calibration is not None:
        fitted = dict(zip(model.findings, zip(*(part.tolist() for part in statistics.calibration))))
        properties["calibration"] = json.dumps({"method": "platt: sigmoid(a * logit + b)", "a_b": fitted})
    if statistics.ood is not None:
        properties["ood"] = json.dumps(
            {
                "threshold": statistics.ood["threshold"],
                "flag_percentile": FLAG_PERCENTILE,
                "validation": np.asarray(statistics.ood["validation"]).round(5).tolist(),
            }
        )
    return properties


def export(checkpoint_path, out, thresholds_file=None):
    """Write the ONNX file; returns its metadata."""
    import onnx

    model = TorchModel(checkpoint_path, device="cpu", amp=False, thresholds=thresholds_file)
    statistics = model.statistics if model.calibrated else None
    net = Deployable(model.net, statistics).eval()
    example = torch.zeros(2, 1, model.image_size, model.image_size, dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs = output_names(statistics)
    torch.onnx.export(
        net,
        (example,),
        str(out),
        input_names=["image"],
        output_names=outputs,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    properties = metadata(model, outputs)
    proto = onnx.load(str(out))
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return properties


def check_out(out, checkpoint, overwrite):
    """Before any work: --out must be a file that can be written, never the checkpoint itself, and replaced only with
    --overwrite."""
    if out.is_dir():
        raise DataError(f"--out {out} is a folder: name the file to write, e.g. --out {out / 'model.onnx'}")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise DataError(f"--out {out} is the checkpoint being exported: name another file (e.g. model.onnx)")
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists already: name another --out, or add --overwrite to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DataError(f"cannot write {out}: {folder} is not a folder this user may write in")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flag(parser)
    add_out_flag(parser, "model.onnx", "the ONNX file to write")
    parser.add_argument(
        "--thresholds", help="thresholds.json (default: evaluation/<checkpoint stem>/thresholds.json by the checkpoint)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists (default: refuse)")
    args = parser.parse_args(argv)
    try:
        with one_line_errors():
            check_out(Path(args.out), Path(args.checkpoint), args.overwrite)
            properties = export(args.checkpoint, args.out, args.thresholds)
    except ImportError as error:
        sys.exit(f"error: {error}. Install the extras: pip install -r requirements-extras.txt")
    size = properties["image_size"]
    print(f"wrote {args.out}: input uint8 [N, 1, {size}, {size}] (S = image_size = {size}); {properties['input']}")
    print(f"outputs: {properties['output']}")
    print(f"thresholds in its metadata: {len(json.loads(properties['thresholds']))} findings")


if __name__ == "__main__":
    main()
