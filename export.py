"""A trained checkpoint as an ONNX model, to deploy without PyTorch (ONNX Runtime; predict.py --onnx uses it).

    python export.py --checkpoint checkpoints/resnet50/best.pth --out model.onnx

The input contract (also in the file's metadata, "input"): input "image", uint8 [N, 1, S, S], N free: each film as
8-bit grayscale (DICOM windowed), letterboxed to LOAD_SIZE x LOAD_SIZE (longer side resized, centred on black),
resized to round(S / 0.875) when that differs from LOAD_SIZE, and centre-cropped to S = IMAGE_SIZE: what
films.eval_view gives. The graph itself scales to [0, 1], makes the three ImageNet-normalised channels, runs the
ResNet-50 and a sigmoid: output "probabilities", float32 [N, 14], in the order of the metadata's "findings".
Metadata: findings, image_size, load_size, eval_crop_fraction, normalisation, thresholds (evaluation/thresholds.json
beside the checkpoint, when there), the training run's config and its SHA-256, the checkpoint's epoch.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from configurator import add_out_flag
from dataset import FINDINGS
from errors import UserError
from films import EVAL_CROP_FRACTION
from inference import probability_graph, read_thresholds, thresholds_path
from model import load_checkpoint, model_from_checkpoint
from transforms import IMAGENET_MEAN, IMAGENET_STD

OPSET = 18  # ONNX Runtime 1.16 and later run it
INPUT_CONTRACT = (
    "uint8 [N, 1, S, S] with S = image_size: the film as 8-bit grayscale, letterboxed to load_size (longer side "
    "resized, centred on black), resized to round(S / eval_crop_fraction) when that differs from load_size, then "
    "centre-cropped to S. Normalisation happens inside the graph."
)


class Deployable(nn.Module):
    """uint8 evaluation crops -> probabilities (inference.probability_graph): the normalisation and the sigmoid
    inside, so a consumer cannot get them wrong."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return probability_graph(self.model, image)


def metadata(checkpoint, thresholds):
    config = checkpoint["config"]
    config_json = json.dumps(config, sort_keys=True)
    return {
        "findings": json.dumps(list(checkpoint["findings"])),
        "image_size": str(config["IMAGE_SIZE"]),
        "load_size": str(config["LOAD_SIZE"]),
        "eval_crop_fraction": str(EVAL_CROP_FRACTION),
        "normalisation": json.dumps({"scale": "1/255", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "in_graph": True}),
        "input": INPUT_CONTRACT,
        "output": "probabilities: float32 [N, findings], sigmoid outputs in the order of 'findings'",
        "thresholds": json.dumps(thresholds),
        "architecture": checkpoint["architecture"],
        "epoch": str(checkpoint["epoch"]),
        "config": config_json,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }


def export(checkpoint_path, out, thresholds_file=None):
    """Write the ONNX file; returns its metadata."""
    import onnx

    checkpoint = load_checkpoint(checkpoint_path, FINDINGS)
    size = checkpoint["config"]["IMAGE_SIZE"]
    net = Deployable(model_from_checkpoint(checkpoint)).eval()
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net,
        (example,),
        str(out),
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    thresholds = read_thresholds(thresholds_file or thresholds_path(checkpoint_path))
    properties = metadata(checkpoint, thresholds)
    proto = onnx.load(str(out))
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return properties


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (e.g. best.pth)")
    add_out_flag(parser, "model.onnx", "the ONNX file to write")
    parser.add_argument("--thresholds", help="thresholds.json (default: evaluation/thresholds.json by the checkpoint)")
    args = parser.parse_args(argv)
    try:
        properties = export(args.checkpoint, args.out, args.thresholds)
    except UserError as error:
        sys.exit(f"error: {error}")
    except ImportError as error:
        sys.exit(f"error: {error}. Install the extras: pip install -r requirements-extras.txt")
    print(f"wrote {args.out}: {properties['input']}")
    print(f"thresholds in its metadata: {len(json.loads(properties['thresholds']))} findings")


if __name__ == "__main__":
    main()
