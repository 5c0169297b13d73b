"""Findings (and Grad-CAM heat maps) for chest X-ray films, from a trained checkpoint or its ONNX export.

    python predict.py --checkpoint checkpoints/resnet50/best.pth FILM_OR_DIR... [--cam] [--top K] [--out DIR]
    python predict.py --onnx model.onnx FILM_OR_DIR...            # ONNX Runtime, no PyTorch needed

Accepts PNG, JPEG and DICOM files and folders. Prints each film's 14 findings sorted by probability, calibrated (a
Platt scaling fitted on the validation split: 0.80 means about 80%; --uncalibrated prints the network's raw
outputs); with thresholds (evaluation/<checkpoint stem>/thresholds.json beside the checkpoint, the checkpoint's own,
the ONNX file's metadata, or --thresholds) the findings at or above their operating threshold are marked '*'. Writes
predictions.csv: a row per input path, the calibrated probabilities, the raw ones (raw_ columns), the film's
out-of-distribution percentile and a warnings column: a DICOM header that says the film is not a frontal chest
radiograph, or a film unlike the training films (--strict refuses both). With --cam (PyTorch only): per finding
shown, the Grad-CAM map drawn on the film at 512 px or more, captioned with the finding, its probability and its
threshold, and one sheet per film beside its top maps, named after the film's path (never one film's over
another's). An unreadable file is reported by name and skipped.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14 import calibration
from cxr14.configurator import (
    AtLeast,
    add_checkpoint_flag,
    add_device_flags,
    add_out_flag,
    check_out_folder,
    flag_type,
)
from cxr14.errors import DataError, one_line_errors
from cxr14.films import DICOM_SUFFIXES, IMAGE_SUFFIXES, prepare
from cxr14.onnx_model import load_model
from cxr14.statistics import at_or_above, with_ood_warnings

# No torch import up here, nor in cxr14/statistics.py or cxr14/onnx_model.py: predict.py --onnx runs where only
# onnxruntime is installed.
CAM_FINDINGS = 3  # heat maps for this many top findings per film (--top)


def collect_images(inputs):
    """[(path, name)]: files as given and every film below each folder, in a stable order, each path once; a film's
    name is its path as given, or from the folder given, and unique; a missing path is reported."""
    found, seen = [], set()
    for item in map(Path, inputs):
        if item.is_dir():
            suffixes = IMAGE_SUFFIXES + DICOM_SUFFIXES
            films = sorted(path for path in item.rglob("*") if path.suffix.lower() in suffixes)
            if not films:
                print(f"skipped {item}: no films in this folder or below it ({', '.join(suffixes)})")
            found += [(path, str(Path(item.name) / path.relative_to(item))) for path in films]
        elif item.is_file():
            found.append((item, str(item)))
        else:
            print(f"skipped {item}: no such file or folder")
    unique = []
    for path, name in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((path, name))
    return unique


def file_stems(names):
    """A file-name stem per film name, unique: the file's own stem where that is unique, else with as many of its
    folders as tell it apart (a/00000002_000.png and a/sub/00000002_000.png: a__00000002_000, sub__00000002_000),
    numbered when two are still alike (the same name given twice)."""
    skip = ("/", "\\", ".", "..")
    parts = [[part for part in Path(name).with_suffix("").parts if part not in skip] for name in names]
    depth = [1] * len(names)
    while True:
        stems = ["__".join(part[-level:]).replace(":", "") for part, level in zip(parts, depth)]
        clashing = [k for k, stem in enumerate(stems) if stems.count(stem) > 1 and depth[k] < len(parts[k])]
        if not clashing:
            break
        for k in clashing:
            depth[k] += 1
    seen = {}
    for k, stem in enumerate(stems):
        seen[stem] = seen.get(stem, 0) + 1
        stems[k] = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"
    return stems


def format_prediction(name, probabilities, findings, thresholds, warnings=()):
    lines = [name] + [f"  warning: {warning}" for warning in warnings]
    above = at_or_above(probabilities, findings, thresholds)
    for k in np.argsort(-probabilities):
        finding = findings[k]
        mark = "*" if above[k] else " "
        limit = f"  (threshold {thresholds[finding]:.3f})" if finding in thresholds else ""
        lines.append(f"  {mark} {finding:<20}{probabilities[k]:>7.3f}{limit}")
    return "\n".join(lines)


def predictions_table(films, predictions, findings, thresholds):
    """predictions.csv: a row per film, its probabilities (and the raw ones), the findings above threshold, its
    out-of-distribution percentile and warnings."""
    probabilities = predictions.probabilities
    table = pd.DataFrame(probabilities, columns=findings)
    table.insert(0, "image", [film.name for film in films])
    above = at_or_above(probabilities, findings, thresholds)
    table["above_threshold"] = ["|".join(f for f, marked in zip(findings, row) if marked) for row in above]
    for k, finding in enumerate(findings):
        table[f"raw_{finding}"] = predictions.raw[:, k]
    table["ood_percentile"] = predictions.ood_percentile
    table["warnings"] = ["; ".join(film.warnings) for film in films]
    return table


def write_heat_maps(model, film, stem, probabilities, top, out, class_maps=None):
    """The top findings' overlays of one film (STEM_FINDING_P.png) and its sheet (STEM_sheet.png); class_maps: the
    film's from TorchModel.predict_with_maps, where it has them."""
    from cxr14.heat_maps import film_overlays, sheet  # grad-cam and matplotlib: the PyTorch path only

    drawn = film_overlays(model, film, probabilities, top, class_maps)
    for finding, image in drawn:
        probability = probabilities[model.findings.index(finding)]
        image.save(out / f"{stem}_{finding}_{probability:.2f}.png", pnginfo=image.info["pnginfo"])
    sheet(film.original, film.name, [image for _, image in drawn]).save(out / f"{stem}_sheet.png")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="FILM_OR_DIR", help="films (PNG, JPEG, DICOM) and/or folders")
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_flag(source, required=False)  # the group requires one of the two
    source.add_argument("--onnx", help="a model written by export.py: ONNX Runtime, no PyTorch (no heat maps)")
    parser.add_argument("--cam", action="store_true", help="write Grad-CAM heat maps of the top findings")
    parser.add_argument(
        "--top", type=flag_type(AtLeast(1)), default=CAM_FINDINGS, help="heat maps per film (default: %(default)s)"
    )
    add_out_flag(parser, "predictions", "output folder")
    parser.add_argument(
        "--thresholds",
        help="thresholds.json (default: evaluation/<checkpoint stem>/thresholds.json by it, else its own)",
    )
    parser.add_argument(
        "--uncalibrated", action="store_true", help="print the network's raw outputs and thresholds, not calibrated"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse DICOM files that are not frontal chest films, and films unlike the training films",
    )
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if args.cam and args.onnx:
        parser.error("--cam needs --checkpoint: heat maps are computed in PyTorch (Grad-CAM)")
    if args.thresholds and args.onnx:
        parser.error("--thresholds needs --checkpoint: an ONNX export carries its own (export.py --thresholds)")
    return args


def scale_note(model):
    """What the printed probabilities are: calibrated, raw, or calibrated but for the findings left raw."""
    if not model.calibrated:
        return "raw, uncalibrated"
    if not model.left_raw:
        return "calibrated"
    return f"calibrated, except {', '.join(model.left_raw)} ({calibration.LEFT_RAW})"


def predict(args):
    check_out_folder(args.out)
    inputs = collect_images(args.images)
    if not inputs:
        raise DataError(f"no film found among the inputs ({', '.join(args.images)}): give PNG, JPEG or DICOM files")
    model = load_model(args.checkpoint, args.onnx, args.device, args.amp, args.thresholds, not args.uncalibrated)
    out = Path(args.out)
    films = []
    for path, name in inputs:
        try:
            films.append(prepare(path, model.load_size, model.image_size, args.strict)._replace(name=name))
        except DataError as error:
            print(f"skipped {name}: {error}")
    if not films:
        raise DataError("no readable image among the inputs")
    crops = np.stack([film.crop for film in films])
    # with --cam, the heat maps come from this very forward pass where the backbone allows (heat_maps.finding_masks)
    predictions, class_maps = model.predict_with_maps(crops) if args.cam else (model.predict(crops), None)
    films = with_ood_warnings(films, predictions)
    if args.strict and predictions.ood_flagged.any():
        for film, flagged in zip(films, predictions.ood_flagged):
            if flagged:
                print(f"skipped {film.name}: {film.warnings[-1]} (--strict refuses such films)")
        kept = ~predictions.ood_flagged
        films = [film for film, keep in zip(films, kept) if keep]
        predictions = type(predictions)(*(part[kept] for part in predictions))
        class_maps = None if class_maps is None else class_maps[kept]
        if not films:
            raise DataError("no film among the inputs is like the training films (--strict)")
    print(f"probabilities: {scale_note(model)}; '*': at or above the finding's threshold")
    for film, row in zip(films, predictions.probabilities):
        print(format_prediction(film.name, row, model.findings, model.thresholds, film.warnings))
    out.mkdir(parents=True, exist_ok=True)
    table = predictions_table(films, predictions, model.findings, model.thresholds)
    table.to_csv(out / "predictions.csv", index=False, float_format="%.5f")
    print(f"wrote {out / 'predictions.csv'} ({len(films)} films)")
    if args.cam:
        top = min(args.top, len(model.findings))
        if top < args.top:
            print(f"--top {args.top}: the model has {top} findings; drawing {top} per film")
        stems = file_stems([film.name for film in films])
        for index, (film, stem, row) in enumerate(zip(films, stems, predictions.probabilities)):
            write_heat_maps(model, film, stem, row, top, out, None if class_maps is None else class_maps[index])
        print(f"wrote heat maps of the top {top} findings per film, and a sheet per film, to {out}")
    return table


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with one_line_errors():
        predict(args)


if __name__ == "__main__":
    main()
