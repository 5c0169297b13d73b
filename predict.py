"""Findings (and Grad-CAM heat maps) for chest X-ray images, from a trained checkpoint.

    python predict.py --checkpoint checkpoints/resnet50/best.pth IMAGE_OR_DIR... [--cam] [--top K] [--out DIR]

Accepts PNG and JPEG files and folders (DICOM too when pydicom is installed). Prints each image's 14 findings
sorted by probability; with thresholds.json (written by evaluate.py, found beside the checkpoint in
evaluation/ or given with --thresholds) the findings at or above their operating threshold are marked '*'.
Writes predictions.csv; with --cam, Grad-CAM overlays (PNG) of the top findings on layer4.
An unreadable image is reported by name and skipped.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from dataset import FINDINGS, IMAGE_SUFFIXES, DataError, load_image
from model import CheckpointError, load_checkpoint, model_from_checkpoint, select_device
from transforms import eval_transform, prepare_batch

SUFFIXES = IMAGE_SUFFIXES + (".dcm",)
CAM_FINDINGS = 3  # heat maps for this many top findings per image (--top)


def collect_images(inputs):
    """Files as given, and every image below each folder, in a stable order; a missing path is reported."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(path for path in item.rglob("*") if path.suffix.lower() in SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            print(f"skipped {item}: no such file or folder")
    return found


def read_thresholds(path):
    """{finding: threshold} from evaluate.py's thresholds.json, or {} when there is none."""
    if path is None or not Path(path).is_file():
        return {}
    thresholds = json.loads(Path(path).read_text())["thresholds"]
    return {finding: value for finding, value in thresholds.items() if value is not None and np.isfinite(value)}


def heat_map(cam, image, finding_index, device):
    """Grad-CAM of one finding for one uint8 [1, S, S] image: float32 [S, S] in [0, 1] (all 0 where no
    location raises the finding's score)."""
    input_tensor = prepare_batch(image.unsqueeze(0), device).requires_grad_(True)  # a gradient even if layer4 froze
    return cam(input_tensor=input_tensor, targets=[ClassifierOutputTarget(finding_index)])[0]


def overlay(image, mask):
    """The heat map over the uint8 [1, S, S] image, as RGB uint8 [S, S, 3]."""
    gray = image[0].numpy().astype(np.float32) / 255
    return show_cam_on_image(np.dstack([gray] * 3), mask, use_rgb=True)


def format_prediction(name, probabilities, thresholds):
    order = np.argsort(-probabilities)
    lines = [name]
    for k in order:
        finding = FINDINGS[k]
        mark = "*" if finding in thresholds and probabilities[k] >= thresholds[finding] else " "
        limit = f"  (threshold {thresholds[finding]:.3f})" if finding in thresholds else ""
        lines.append(f"  {mark} {finding:<20}{probabilities[k]:>7.3f}{limit}")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (e.g. best.pth)")
    parser.add_argument("--cam", action="store_true", help="write Grad-CAM heat maps of the top findings")
    parser.add_argument("--top", type=int, default=CAM_FINDINGS, help="heat maps per image (default: %(default)s)")
    parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    parser.add_argument("--thresholds", help="thresholds.json (default: evaluation/thresholds.json by the checkpoint)")
    parser.add_argument("--batch_size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), or a torch device")
    return parser.parse_args(argv)


def predict(args):
    device = select_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, FINDINGS, map_location="cpu")
    config = checkpoint["config"]
    model = model_from_checkpoint(checkpoint).to(device).eval()
    transform = eval_transform(config["IMAGE_SIZE"])
    thresholds = read_thresholds(args.thresholds or Path(args.checkpoint).parent / "evaluation" / "thresholds.json")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    names, images = [], []
    for path in collect_images(args.images):
        try:
            images.append(transform(Image.fromarray(load_image(path, config["LOAD_SIZE"]))))
            names.append(str(path))
        except DataError as error:
            print(f"skipped {path}: {error}")
    if not images:
        raise DataError("no readable image among the inputs")
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            batch = prepare_batch(torch.stack(images[start : start + args.batch_size]), device)
            probabilities.append(torch.sigmoid(model(batch).float()).cpu())
    probabilities = torch.cat(probabilities).numpy()

    for name, row in zip(names, probabilities):
        print(format_prediction(name, row, thresholds))
    table = pd.DataFrame(probabilities, columns=list(FINDINGS))
    table.insert(0, "image", names)
    table["above_threshold"] = [
        "|".join(f for f, p in zip(FINDINGS, row) if f in thresholds and p >= thresholds[f]) for row in probabilities
    ]
    table.to_csv(out / "predictions.csv", index=False, float_format="%.5f")
    print(f"wrote {out / 'predictions.csv'} ({len(names)} images)")
    if args.cam:
        write_heat_maps(model, names, images, probabilities, args.top, out, device)


def write_heat_maps(model, names, images, probabilities, top, out, device):
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        for name, image, row in zip(names, images, probabilities):
            for k in np.argsort(-row)[:top]:
                mask = heat_map(cam, image, int(k), device)
                Image.fromarray(overlay(image, mask)).save(out / f"{Path(name).stem}_{FINDINGS[k]}_{row[k]:.2f}.png")
    print(f"wrote heat maps of the top {top} findings per image to {out}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        predict(args)
    except (DataError, CheckpointError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
