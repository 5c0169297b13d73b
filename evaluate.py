"""The report of a trained checkpoint: the numbers the field judges a chest X-ray classifier by.

    python evaluate.py --checkpoint checkpoints/resnet50/best.pth [--split test] [--out DIR] [--tta] [--boxes FILE]
    python evaluate.py --checkpoint C --expert_labels google2019_nih-chest-xray-labels.csv
    python evaluate.py --checkpoint C --dataset chexpert|mimic|padchest|vindr|rsna --data_dir DIR [--uncertain ignore]

NIH: evaluates on exactly the split the training run used (carried in the checkpoint, and in split.csv beside it),
never on images the model trained or was selected on. Per finding: AUROC with a 95% bootstrap confidence interval
(resampling patients), average precision, prevalence, positives and negatives, and an operating point (threshold
chosen on the validation split: Youden's J, or --sensitivity) with sensitivity, specificity, PPV and F1 on the
evaluated split. With NIH's boxes (BBox_List_2017.csv beside the label file, or --boxes): heat-map localisation as
Wang et al. scored it. With Google's expert labels: their four findings scored against NIH's labels and the experts'
on the same test films, side by side. Other datasets: the same figures on their frontal films, for the findings that
map onto ours (external.py), and for VinDr-CXR and RSNA the localisation on their radiologists' boxes.
Writes report.json, report.csv, roc_curves.png, predictions.csv (each film's labels and probabilities, which
compare.py reads), thresholds.json (which predict.py uses; NIH only),
localisation.png (with boxes) and expert_labels.csv (with expert labels). Films missing or unreadable stop the report,
naming them, unless --drop_missing_images leaves them out (report.json's "skipped" names them).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import calibration
import ood
import subgroups
from configurator import AtLeast, Between, add_device_flags, add_out_flag, flag_type
from dataset import FINDINGS, find_label_file, run_split, split_rows
from devices import worker_count
from errors import DataError, UserError
from external import (
    DATASETS,
    EXPERT_MAPPING,
    EXPERT_UNSCORED,
    UNCERTAIN_POLICIES,
    VINDR_RULES,
    model_scores,
    read_expert_labels,
    read_external,
)
from images import find_cache
from inference import (
    TorchModel,
    calibrated_thresholds,
    checkpoint_sha256,
    evaluation_folder,
    fit_statistics,
    prediction_table,
    split_outputs,
    statistics_record,
    write_thresholds,
)
from localisation import (
    BOX_THRESHOLD,
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    WANG_IOBB_01,
    format_localisation,
    localise,
    plot_examples,
    read_boxes,
)
from model import add_to_checkpoint
from report import CHEXNET_AUROC, build_report, format_report, format_two_label_table, plot_roc_curves, two_label_table


def outputs_of(model, rows, args):
    """(logits, readable, pooled features) of the rows' films: NIH's through its cache where one holds them."""
    data_dir = (args.data_dir or model.config["DATA_DIR"]) if args.dataset == "nih" else None
    return split_outputs(model, rows, data_dir, args.batch_size, worker_count(args.num_workers), args.tta)


def readable_only(rows, outputs, args, skipped):
    """(rows, logits, features) of the films that could be read; the others an error naming the first few, or (with
    --drop_missing_images) left out and added to skipped["unreadable"]."""
    logits, readable, features = outputs
    if readable.all():
        return rows, logits, features
    names = list(rows.path[~readable])
    if not args.drop_missing_images:
        raise DataError(
            f"{len(names)} film(s) cannot be read (first: {', '.join(names[:3])}): truncated or not images. "
            "Re-extract or re-download them, or leave them out with --drop_missing_images (the report names them)."
        )
    print(f"warning: {len(names)} unreadable film(s) left out (first: {names[0]})")
    skipped["unreadable"] += names
    return rows[readable].reset_index(drop=True), logits[readable], features[readable]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (e.g. best.pth)")
    parser.add_argument("--data_dir", help="dataset folder (default: the one the run trained on)")
    parser.add_argument("--csv", default="", help="label file, as given or below data_dir (default: the dataset's)")
    parser.add_argument(
        "--dataset", default="nih", choices=("nih", *DATASETS), help="NIH (the run's split) or another (default: nih)"
    )
    parser.add_argument(
        "--uncertain",
        default="ignore",
        choices=UNCERTAIN_POLICIES,
        help="CheXpert and MIMIC's -1 (uncertain) labels: left out, negative or positive; blank is always negative "
        "(default: ignore)",
    )
    parser.add_argument(
        "--vindr_rule",
        default="any",
        choices=VINDR_RULES,
        help="a VinDr finding is positive when marked by any radiologist, or by at least two (default: any)",
    )
    parser.add_argument("--min_age", type=float, help="PadChest: leave out films of younger or unknown-age patients")
    parser.add_argument(
        "--drop_missing_images",
        action="store_true",
        help="leave out films that are missing or unreadable, naming them in the report (default: an error)",
    )
    parser.add_argument(
        "--expert_labels", help="Google's expert labels of NIH films (google2019_nih-chest-xray-labels.csv)"
    )
    parser.add_argument(
        "--boxes",
        help="NIH-format box file (default: BBox_List_2017.csv beside the labels; VinDr's and RSNA's own "
        "boxes; none: no localisation)",
    )
    parser.add_argument(
        "--box_threshold",
        type=float,
        default=BOX_THRESHOLD,
        help="share of a map's maximum cut into boxes (default: %(default)s)",
    )
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default: test)")
    parser.add_argument("--test_list", help="evaluate on these images (e.g. NIH's test_list.txt), not the run's split")
    add_out_flag(parser, None, "report folder", "evaluation/<checkpoint stem>/ beside the checkpoint")
    parser.add_argument("--tta", action="store_true", help="average five crops per image (default: off)")
    parser.add_argument(
        "--sensitivity",
        type=flag_type(Between(0, 1, low_included=False)),
        help="choose thresholds for this sensitivity (above 0, below 1), not Youden's J",
    )
    parser.add_argument(
        "--bootstrap", type=flag_type(AtLeast(1)), default=1000, help="bootstrap replicates (default: 1000)"
    )
    parser.add_argument("--batch_size", type=flag_type(AtLeast(1)), default=64, help="default: 64")
    parser.add_argument("--num_workers", type=int, default=-1, help="DataLoader workers; -1: from the CPU count")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if args.expert_labels and args.dataset != "nih":
        parser.error("--expert_labels scores NIH films: leave --dataset out")
    return args


def evaluate(args):
    model = TorchModel(args.checkpoint, args.device, args.amp)
    out = Path(args.out) if args.out else evaluation_folder(args.checkpoint)
    if args.dataset != "nih" and not args.out:
        out = out / args.dataset  # never over NIH's report (and its thresholds.json)
    about = {
        "checkpoint": str(args.checkpoint),
        "epoch": model.checkpoint["epoch"],
        "dataset": args.dataset,
        "test_list": str(Path(args.test_list).resolve()) if args.test_list else None,
    }
    run = evaluate_nih if args.dataset == "nih" else evaluate_external
    result = run(args, model, about)
    sha256 = checkpoint_sha256(args.checkpoint)  # after run: it may have added OOD statistics to the file
    about["checkpoint_sha256"] = sha256  # which checkpoint predictions.csv and thresholds.json belong to
    names, targets, probabilities, rows = result["names"], result["targets"], result["raw"], result["rows"]
    thresholds = result["thresholds"]
    table, summary = build_report(
        names, targets, probabilities, rows.patient_id.to_numpy(), thresholds, args.bootstrap, result["ref"]
    )
    print(format_report(table, summary, "CheXNet" if args.dataset == "nih" else "-"))
    report = {**about, "tta": args.tta, "bootstrap_replicates": args.bootstrap, **summary}
    out.mkdir(parents=True, exist_ok=True)
    written = ["report.json", "report.csv", "roc_curves.png"]
    if result["fitted"] is not None:
        table["threshold_calibrated"] = calibrated_thresholds(thresholds, result["fitted"])
    if result["after"] is not None:
        report["calibration"], said = calibration.report_section(names, targets, probabilities, result["after"], out)
        print(said)
        written.append("reliability.png")
    if args.dataset == "nih":
        policy = f"sensitivity {args.sensitivity}" if args.sensitivity else "youden"
        write_thresholds(out / "thresholds.json", policy, thresholds, FINDINGS, result["fitted"], sha256)
        report["threshold_policy"] = policy
        written.append("thresholds.json")
    percentiles = np.full(len(rows), np.nan)
    if model.statistics.ood is not None:
        what = f"the {args.split} split" if args.dataset == "nih" else f"{args.dataset}'s films"
        report["ood"], said = ood.report_section(model.statistics.ood, result["features"], what)
        print(said)
        percentiles = ood.percentiles(model.statistics.ood, ood.distances(model.statistics.ood, result["features"]))
    shown = probabilities if result["after"] is None else result["after"]  # what predict.py outputs
    prediction_table(rows, names, targets, shown, percentiles).to_csv(out / "predictions.csv", index=False)
    written.append("predictions.csv")
    report["subgroups"], said = subgroups.report_section(
        rows, names, targets, probabilities, thresholds, args.bootstrap, out
    )
    print(said)
    written += ["subgroups.csv", "subgroups.png"] if report["subgroups"] else []
    if result.get("boxes") is not None and (rows.path == "").any():
        print("localisation skipped: it draws heat maps on the full films, and these are in the cache alone")
    elif result.get("boxes") is not None:
        table = localisation_section(args, model, rows, result["boxes"], table, report, out)
        written += ["localisation.png"] if "localisation" in report else []
    if args.expert_labels:
        report["expert_labels"] = expert_section(args, rows, probabilities, out)
        written.append("expert_labels.csv")
    table.to_csv(out / "report.csv", index=False)
    report["findings"] = json.loads(table.to_json(orient="records"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_roc_curves(names, targets, probabilities, table, out / "roc_curves.png")
    print(f"wrote {', '.join(written)} to {out}")
    return report


def evaluate_nih(args, model, about):
    """The run's test (or validation) split; thresholds and a calibration fitted on its validation split (and the
    out-of-distribution statistics, for a checkpoint that lacks them, on its training films)."""
    checkpoint, config = model.checkpoint, model.config
    split, source = run_split(checkpoint, args.checkpoint, args.test_list)
    has_validation = bool((split.split == "val").any())
    needs_ood = model.statistics.ood is None and has_validation and bool((split.split == "train").any())
    wanted = [args.split] + (["val"] if has_validation else []) + (["train"] if needs_ood else [])
    data_dir = args.data_dir or config["DATA_DIR"]
    cache = find_cache(data_dir, model.load_size)  # a complete cache's films need no PNG (download.py --cache_only)
    parts, missing = split_rows(
        split, source, data_dir, args.csv or config["CSV"], wanted, args.drop_missing_images, cache
    )
    skipped = {"missing": missing, "unreadable": []}
    if missing:
        print(f"warning: {len(missing)} film(s) missing and left out (first: {missing[0]})")
    rows = parts[args.split]
    print(
        f"checkpoint {args.checkpoint} (epoch {checkpoint['epoch']}); the {args.split} split: {len(rows):,} images, "
        f"{rows.patient_id.nunique():,} patients{'; five-crop TTA' if args.tta else ''}"
    )
    thresholds, fitted = np.full(len(FINDINGS), np.nan), None
    if has_validation:
        statistics = fit_on_validation(model, parts, needs_ood, args, skipped)
        thresholds = np.array([statistics.thresholds[finding] for finding in FINDINGS])
        fitted = statistics.calibration
    else:
        print("no validation split: no operating thresholds and no calibration (thresholds.json will hold none)")
    rows, logits, features = readable_only(rows, outputs_of(model, rows, args), args, skipped)
    about |= {
        "split": args.split,
        "split_source": source,
        "images": len(rows),
        "patients": int(rows.patient_id.nunique()),
        "skipped": skipped,
    }
    return {
        "names": list(FINDINGS),
        "targets": rows[list(FINDINGS)].to_numpy(dtype=float),
        "raw": calibration.sigmoid(logits),
        "after": calibration.calibrated(logits, *fitted) if fitted is not None else None,
        "fitted": fitted,
        "features": features,
        "rows": rows,
        "thresholds": thresholds,
        "ref": CHEXNET_AUROC,
        "boxes": nih_boxes(args, config),
    }


def fit_on_validation(model, parts, needs_ood, args, skipped):
    """The statistics of inference.fit_statistics: thresholds (this evaluation's policy) and a calibration on the
    validation split; and for a checkpoint without out-of-distribution statistics (written before they were kept)
    those too, on a sample of its training films, stored in it as train.py does at a run's end."""
    validation, val_logits, val_features = readable_only(
        parts["val"], outputs_of(model, parts["val"], args), args, skipped
    )
    sample = ood.fit_sample(parts["train"]) if needs_ood else None
    train_features = outputs_of(model, sample, args)[2] if needs_ood else None
    statistics = fit_statistics(
        FINDINGS,
        val_logits,
        validation[list(FINDINGS)].to_numpy(dtype=float),
        val_features,
        train_features,
        None if sample is None else sample.patient_id.to_numpy(),
        args.sensitivity,
    )
    if needs_ood:
        add_to_checkpoint(model.path, inference=statistics_record(statistics))
        model.statistics = model.statistics._replace(ood=statistics.ood)
        print(f"{model.path} had no out-of-distribution statistics: fitted on {len(sample):,} training films, added")
    return statistics


def nih_boxes(args, config):
    """NIH's box file (BBox_List_2017.csv beside the label file, or --boxes), or None."""
    if args.boxes == "none":
        return None
    default = find_label_file(args.data_dir or config["DATA_DIR"], args.csv or config["CSV"]).parent
    boxes_path = Path(args.boxes) if args.boxes else default / "BBox_List_2017.csv"
    if not boxes_path.is_file():
        if args.boxes:
            raise DataError(f"box file not found: {boxes_path}")
        return None
    return read_boxes(boxes_path).assign(source=str(boxes_path))


def evaluate_external(args, model, about):
    """Another dataset's frontal films, the findings that map onto ours; thresholds from NIH's validation split
    (evaluation/<checkpoint stem>/thresholds.json beside the checkpoint), where a finding maps to one of ours."""
    if not args.data_dir:
        raise DataError(f"--dataset {args.dataset} needs --data_dir: the dataset's folder")
    data = read_external(
        args.dataset, args.data_dir, args.csv, args.uncertain, args.drop_missing_images, args.min_age, args.vindr_rule
    )
    names = list(data.mapping)
    skipped = {"missing": data.skipped["missing"], "unreadable": []}
    print(
        f"checkpoint {args.checkpoint} (epoch {model.checkpoint['epoch']}); {args.dataset} ({data.source}): "
        f"{len(data.rows):,} frontal films of {data.rows.patient_id.nunique():,} patients; left out "
        f"{data.laterals:,} lateral and {data.other_views:,} other films"
        + "".join(f", {count:,} {reason}" for reason, count in data.left_out.items())
        + f"; uncertain labels: {args.uncertain}"
    )
    rows, logits, features = readable_only(data.rows, outputs_of(model, data.rows, args), args, skipped)
    probabilities = calibration.sigmoid(logits)
    nih = model.statistics.thresholds
    thresholds = np.array([nih.get(found[0], np.nan) if len(found) == 1 else np.nan for found in data.mapping.values()])
    fitted = model.statistics.calibration
    after = None if fitted is None else model_scores(calibration.calibrated(logits, *fitted), data.mapping, FINDINGS)
    about |= {
        "source": data.source,
        "images": len(rows),
        "patients": int(rows.patient_id.nunique()),
        "laterals_left_out": data.laterals,
        "other_views_left_out": data.other_views,
        "left_out": data.left_out,
        "skipped": skipped,
        "uncertain": args.uncertain,
        "mapping": {name: list(mapped) for name, mapped in data.mapping.items()},
        "threshold_source": "NIH's validation split (thresholds.json beside the checkpoint, else the checkpoint's)",
    }
    if args.dataset == "vindr":
        about["vindr_rule"] = args.vindr_rule
    return {
        "names": names,
        "targets": rows[names].to_numpy(dtype=float),
        "raw": model_scores(probabilities, data.mapping, FINDINGS),
        "after": after,  # NIH's calibration, applied as it is: no new fit on another hospital's films
        "fitted": None,
        "features": features,
        "rows": rows,
        "thresholds": thresholds,
        "ref": None,
        "boxes": None if args.boxes == "none" else external_boxes(data, rows, probabilities),
    }


def external_boxes(data, rows, probabilities):
    """A dataset's boxes (VinDr, RSNA) as localise takes them: each box's finding is the model's finding that scores
    its reported name on that film (the most probable of those mapped to it, e.g. Mass or Nodule)."""
    if data.boxes is None or data.boxes.empty:
        return None
    row_of = pd.Series(np.arange(len(rows)), index=rows.image_name)
    boxes = data.boxes[data.boxes.image_name.isin(row_of.index)].reset_index(drop=True)
    chosen = []
    for box in boxes.itertuples():
        mapped = data.mapping[box.name]
        row = probabilities[row_of[box.image_name]]
        chosen.append(max(mapped, key=lambda finding: row[FINDINGS.index(finding)]))
    return boxes.assign(finding=chosen, source=data.source)


def localisation_section(args, model, rows, boxes, table, report, out):
    """Heat-map localisation against boxes (NIH's, VinDr's, RSNA's): report entries, table columns, plot."""
    source = boxes.source.iloc[0] if len(boxes) else ""
    results, examples, outside = localise(model, boxes, rows, args.box_threshold)
    if not results:
        return table
    print(f"localisation against {source} ({outside} boxed films outside the evaluated films left out):")
    print(format_localisation(results, WANG_IOBB_01 if args.dataset == "nih" else {}))
    report["localisation"] = results
    report["localisation_settings"] = {"boxes": source, "box_threshold": args.box_threshold, "left_out": outside}
    columns = {
        "loc_boxes": lambda r: r["boxes"],
        **{f"loc_iobb_{t}": lambda r, t=t: r["iobb"][str(t)] for t in IOBB_THRESHOLDS},
        **{f"loc_iou_{t}": lambda r, t=t: r["iou"][str(t)] for t in IOU_THRESHOLDS},
        "loc_pointing": lambda r: r["pointing"],
    }
    for column, value in columns.items():
        table[column] = [value(results[f]) if f in results else np.nan for f in table.finding]
    if args.dataset == "nih":
        table["wang_iobb_0.1"] = [WANG_IOBB_01.get(f, np.nan) for f in table.finding]
    plot_examples(examples, out / "localisation.png")
    return table


def expert_section(args, rows, probabilities, out):
    """Google's expert labels on the films of the evaluated split: each finding's AUROC against NIH's labels and
    against the experts' on the same films; expert_labels.csv and the report.json entry."""
    experts = read_expert_labels(args.expert_labels).set_index("image_name")
    inside = rows.image_name.isin(experts.index).to_numpy()
    if not inside.any():
        raise DataError(f"none of the {len(experts):,} films of {args.expert_labels} is in the {args.split} split")
    names = list(EXPERT_MAPPING)
    films = rows[inside].reset_index(drop=True)
    nih = np.stack([films[list(mapped)].max(axis=1).to_numpy(dtype=float) for mapped in EXPERT_MAPPING.values()], 1)
    expert = experts.loc[films.image_name, names].to_numpy(dtype=float)
    scores = model_scores(probabilities[inside], EXPERT_MAPPING, FINDINGS)
    table = two_label_table(names, nih, expert, scores, films.patient_id.to_numpy(), args.bootstrap)
    print(
        f"expert labels ({args.expert_labels}): {inside.sum():,} of its {len(experts):,} films are in the "
        f"{args.split} split; the same films against NIH's labels and the experts':"
    )
    print(format_two_label_table(table))
    print(f"not scored (no NIH finding): {', '.join(EXPERT_UNSCORED)}")
    pd.DataFrame(table).to_csv(out / "expert_labels.csv", index=False)
    return {
        "file": str(args.expert_labels),
        "films_in_file": len(experts),
        "films_in_split": int(inside.sum()),
        "mapping": {name: list(mapped) for name, mapped in EXPERT_MAPPING.items()},
        "findings": table,
        "unscored": list(EXPERT_UNSCORED),
    }


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        evaluate(args)
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
