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
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from configurator import add_device_flags, add_out_flag
from errors import DataError, UserError
from films import DICOM_SUFFIXES, IMAGE_SUFFIXES, prepare
from inference import load_model, read_thresholds

# No torch import up here, nor in inference.py: predict.py --onnx runs where only onnxruntime is installed.
CAM_FINDINGS = 3  # heat maps for this many top findings per film (--top)


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


def write_heat_maps(model, film, probabilities, top, out):
    """The top findings' overlays of one film (FILM_FINDING_P.png) and its sheet (FILM_sheet.png)."""
    from heatmaps import film_overlays, sheet  # grad-cam and matplotlib: the PyTorch path only

    drawn = film_overlays(model, film, probabilities, top)
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
    add_out_flag(parser, "predictions", "output folder")
    parser.add_argument("--thresholds", help="thresholds.json (default: evaluation/thresholds.json by the checkpoint)")
    parser.add_argument("--strict", action="store_true", help="refuse DICOM files that are not frontal chest films")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if args.cam and args.onnx:
        parser.error("--cam needs --checkpoint: heat maps are computed in PyTorch (Grad-CAM)")
    return args


def predict(args):
    model = load_model(args.checkpoint, args.onnx, args.device, args.amp)
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
