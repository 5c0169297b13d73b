"""Findings (and Grad-CAM heat maps) for chest X-ray films, from a trained checkpoint or its ONNX export.

    python predict.py --checkpoint checkpoints/resnet50/best.pth FILM_OR_DIR... [--cam] [--top K] [--out DIR]
    python predict.py --onnx model.onnx FILM_OR_DIR...            # ONNX Runtime, no PyTorch needed

Accepts PNG, JPEG and DICOM files and folders. Prints each film's 14 findings sorted by probability; with
thresholds (evaluation/thresholds.json beside the checkpoint, the ONNX file's metadata, or --thresholds) the
findings at or above their operating threshold are marked '*'. Writes predictions.csv, with a warnings column for
DICOM headers that say the film is not a frontal chest radiograph (--strict refuses such files). With --cam
(PyTorch only): per finding shown, the Grad-CAM map drawn on the film at 512 px or more, captioned with the
finding, its probability and its threshold, and one sheet per film beside its top maps.
An unreadable file is reported by name and skipped.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from errors import DataError, UserError
from films import DICOM_SUFFIXES, IMAGE_SUFFIXES, prepare

# No torch import up here: predict.py --onnx runs where only onnxruntime is installed; the PyTorch path imports it.
CAM_FINDINGS = 3  # heat maps for this many top findings per film (--top)
BATCH_SIZE = 32  # films per forward pass


def collect_images(inputs):
    """Files as given, and every film below each folder, in a stable order; a missing path is reported."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            suffixes = IMAGE_SUFFIXES + DICOM_SUFFIXES
            found += sorted(path for path in item.rglob("*") if path.suffix.lower() in suffixes)
        elif item.is_file():
            found.append(item)
        else:
            print(f"skipped {item}: no such file or folder")
    return found


class TorchModel:
    """A checkpoint in PyTorch: probabilities, and Grad-CAM heat maps."""

    def __init__(self, checkpoint_path, device="auto", amp=True):
        import torch

        from dataset import FINDINGS
        from devices import autocast_dtype, select_device, use_channels_last
        from model import load_checkpoint, model_from_checkpoint

        checkpoint = load_checkpoint(checkpoint_path, FINDINGS)
        self.device = select_device(device)
        self.dtype, self.channels_last = autocast_dtype(self.device, amp), use_channels_last(self.device, amp)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net = model_from_checkpoint(checkpoint).to(self.device, memory_format=layout).eval()
        self.findings = list(checkpoint["findings"])
        self.image_size, self.load_size = checkpoint["config"]["IMAGE_SIZE"], checkpoint["config"]["LOAD_SIZE"]
        self.thresholds = read_thresholds(Path(checkpoint_path).parent / "evaluation" / "thresholds.json")

    def probabilities(self, crops):
        """uint8 [N, S, S] evaluation crops -> float [N, findings]."""
        import torch

        from transforms import normalize

        batches = []
        with torch.inference_mode(), torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
            for start in range(0, len(crops), BATCH_SIZE):
                images = torch.from_numpy(np.asarray(crops[start : start + BATCH_SIZE])).unsqueeze(1)
                logits = self.net(normalize(images.to(self.device), self.channels_last))
                batches.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(batches)

    def heat_maps(self, crop, finding_indices):
        """Grad-CAM maps (float [S, S] in [0, 1]) of some findings on one uint8 [S, S] crop."""
        from heatmaps import grad_cam, heat_maps

        with grad_cam(self.net) as cam:
            return heat_maps(cam, crop[None], finding_indices, self.device)


class OnnxModel:
    """An export.py ONNX file in ONNX Runtime: the same probabilities as TorchModel, without PyTorch."""

    def __init__(self, path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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


def read_thresholds(path):
    """{finding: threshold} from evaluate.py's thresholds.json, or {} when there is none (NaN entries left out)."""
    if path is None or not Path(path).is_file():
        return {}
    thresholds = json.loads(Path(path).read_text())["thresholds"]
    return {finding: value for finding, value in thresholds.items() if value is not None and np.isfinite(value)}


def format_prediction(name, probabilities, findings, thresholds, warnings=()):
    lines = [name] + [f"  warning: {warning}" for warning in warnings]
    for k in np.argsort(-probabilities):
        finding = findings[k]
        mark = "*" if finding in thresholds and probabilities[k] >= thresholds[finding] else " "
        limit = f"  (threshold {thresholds[finding]:.3f})" if finding in thresholds else ""
        lines.append(f"  {mark} {finding:<20}{probabilities[k]:>7.3f}{limit}")
    return "\n".join(lines)


def predictions_table(films, probabilities, findings, thresholds):
    """predictions.csv: a row per film, its probabilities, the findings above threshold, and warnings."""
    table = pd.DataFrame(probabilities, columns=findings)
    table.insert(0, "image", [film.name for film in films])
    table["above_threshold"] = [
        "|".join(f for f, p in zip(findings, row) if f in thresholds and p >= thresholds[f]) for row in probabilities
    ]
    table["warnings"] = ["; ".join(film.warnings) for film in films]
    return table


def heat_map_overlays(model, film, probabilities, top):
    """[(finding, overlay image)] of the film's top findings: the one heat-map drawing of predict.py and the page."""
    from heatmaps import film_geometry, overlay

    order = [int(k) for k in np.argsort(-probabilities)[:top]]
    geometry = film_geometry(film.original, model.load_size, model.image_size)
    drawn = []
    for k, mask in zip(order, model.heat_maps(film.crop, order)):
        finding = model.findings[k]
        drawn.append(
            (finding, overlay(film.original, mask, geometry, finding, probabilities[k], model.thresholds.get(finding)))
        )
    return drawn


def write_heat_maps(model, film, probabilities, top, out):
    """The top findings' overlays of one film (FILM_FINDING_P.png) and its sheet (FILM_sheet.png)."""
    from heatmaps import sheet

    drawn = heat_map_overlays(model, film, probabilities, top)
    stem = Path(film.name).stem
    for finding, image in drawn:
        probability = probabilities[model.findings.index(finding)]
        image.save(out / f"{stem}_{finding}_{probability:.2f}.png", pnginfo=image.info["pnginfo"])
    sheet(film.original, Path(film.name).name, [image for _, image in drawn]).save(out / f"{stem}_sheet.png")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="FILM_OR_DIR", help="films (PNG, JPEG, DICOM) and/or folders")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by train.py (e.g. best.pth)")
    source.add_argument("--onnx", help="a model written by export.py: ONNX Runtime, no PyTorch (no heat maps)")
    parser.add_argument("--cam", action="store_true", help="write Grad-CAM heat maps of the top findings")
    parser.add_argument("--top", type=int, default=CAM_FINDINGS, help="heat maps per film (default: %(default)s)")
    parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    parser.add_argument("--thresholds", help="thresholds.json (default: evaluation/thresholds.json by the checkpoint)")
    parser.add_argument("--strict", action="store_true", help="refuse DICOM files that are not frontal chest films")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), or a torch device")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 and channels_last where training uses them (model.autocast_dtype); --no-amp: fp32 (default: on)",
    )
    args = parser.parse_args(argv)
    if args.cam and args.onnx:
        parser.error("--cam needs --checkpoint: heat maps are computed in PyTorch (Grad-CAM)")
    return args


def predict(args):
    model = OnnxModel(args.onnx) if args.onnx else TorchModel(args.checkpoint, args.device, args.amp)
    if args.thresholds:
        model.thresholds = read_thresholds(args.thresholds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    films = []
    for path in collect_images(args.images):
        try:
            films.append(prepare(path, model.load_size, model.image_size, args.strict))
        except DataError as error:
            print(f"skipped {path}: {error}")
    if not films:
        raise DataError("no readable image among the inputs")
    probabilities = model.probabilities(np.stack([film.crop for film in films]))
    for film, row in zip(films, probabilities):
        print(format_prediction(film.name, row, model.findings, model.thresholds, film.warnings))
    table = predictions_table(films, probabilities, model.findings, model.thresholds)
    table.to_csv(out / "predictions.csv", index=False, float_format="%.5f")
    print(f"wrote {out / 'predictions.csv'} ({len(films)} films)")
    if args.cam:
        for film, row in zip(films, probabilities):
            write_heat_maps(model, film, row, args.top, out)
        print(f"wrote heat maps of the top {args.top} findings per film, and a sheet per film, to {out}")
    return table


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        predict(args)
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
