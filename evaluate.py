"""The report of a trained checkpoint: the numbers the field judges a chest X-ray classifier by.

    python evaluate.py --checkpoint checkpoints/resnet50/best.pth [--split test] [--out DIR] [--tta] [--boxes FILE]
    python evaluate.py --checkpoint C --expert_labels google2019_nih-chest-xray-labels.csv
    python evaluate.py --checkpoint C --dataset chexpert|mimic|padchest|vindr|rsna --data_dir DIR [--uncertain ignore]

By default it evaluates on exactly the split the training run used (carried in the checkpoint, and in split.csv
beside it), never on images the model trained or was selected on: NIH's, or that of the datasets the run trained on
(a union's report has a section per dataset and a pooled one). Per finding: AUROC with a 95% bootstrap confidence
interval (resampling patients), average precision, prevalence, positives and negatives, and an operating point
(threshold chosen on the validation split: Youden's J as the checkpoint carries it, fitted again with --refit, or
--sensitivity) with sensitivity, specificity, PPV and F1 on the evaluated split. With NIH's boxes
(BBox_List_2017.csv beside the label file, or --boxes): heat-map localisation as Wang et al. scored it. With
Google's expert labels: their four findings scored against NIH's labels and the experts' on the same test films,
side by side. Other datasets: the same figures on their frontal films, for the findings that map onto ours
(external.py), and for VinDr-CXR and RSNA the localisation on their radiologists' boxes. RSNA's films are NIH's:
with RSNA's mapping file (--rsna_mapping, or beside its labels) the films of the NIH patients the run saw are left
out; without it the report says its score is not an external one.
Writes report.json, report.csv, roc_curves.png, predictions.csv (each film's labels and probabilities, which
compare.py reads), thresholds.json (which predict.py uses; the run's own split only),
localisation.png (with boxes) and expert_labels.csv (with expert labels). Films missing or unreadable stop the report,
naming them, unless --drop_missing_images leaves them out (report.json's "skipped" names them).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from cxr14 import calibration, ood, subgroups
from cxr14.configurator import (
    AtLeast,
    Between,
    add_checkpoint_flag,
    add_device_flags,
    add_out_flag,
    check_out_folder,
    flag_type,
)
from cxr14.errors import one_line_errors
from cxr14.expert_labels import read_expert_labels
from cxr14.external import DATASETS
from cxr14.inference import TorchModel
from cxr14.localisation import (
    BOX_THRESHOLD,
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    WANG_IOBB_01,
    format_localisation,
    localise,
    plot_examples,
)
from cxr14.mappings import UNCERTAIN_POLICIES, VINDR_RULES
from cxr14.report import build_report, format_report, plot_roc_curves
from cxr14.scoring import EvaluationSettings, evaluate_external, evaluate_nih, expert_section
from cxr14.statistics import (
    calibrated_thresholds,
    checkpoint_sha256,
    evaluation_folder,
    prediction_table,
    write_thresholds,
)
from dataset import FINDINGS


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flag(parser)
    add_data_flags(parser)
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default: test)")
    parser.add_argument("--test_list", help="evaluate on these images (e.g. NIH's test_list.txt), not the run's split")
    add_out_flag(parser, None, "report folder", "evaluation/<checkpoint stem>/ beside the checkpoint")
    parser.add_argument("--tta", action="store_true", help="average five crops per image (default: off)")
    parser.add_argument(
        "--refit",
        action="store_true",
        help="fit the thresholds and calibration on the validation split again (default: the checkpoint's own, fitted "
        "there at the run's end; fitted here with --sensitivity or --test_list, or when it lacks them)",
    )
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


def add_data_flags(parser):
    """The flags that choose the films and their labels, boxes and expert labels."""
    parser.add_argument("--data_dir", help="dataset folder (default: the one the run trained on)")
    parser.add_argument("--csv", default="", help="label file, as given or below data_dir (default: the dataset's)")
    parser.add_argument(
        "--dataset",
        default="nih",
        choices=("nih", *DATASETS),
        help="nih: the run's own split (whichever datasets it trained on); or another dataset's films (default: nih)",
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
    parser.add_argument(
        "--rsna_mapping",
        default="",
        help="RSNA's mapping of its films to NIH's (default: pneumonia-challenge-dataset-mappings_2018.json or "
        "pneumonia_dataset_mapping.csv beside its labels): leaves out the films of NIH patients the run saw",
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


REPORT_FILES = (  # everything an evaluation may write: a file of an earlier evaluation that this one did not write goes
    "report.json",
    "report.csv",
    "roc_curves.png",
    "predictions.csv",
    "thresholds.json",
    "reliability.png",
    "subgroups.csv",
    "subgroups.png",
    "localisation.png",
    "expert_labels.csv",
)


def evaluate(args):
    """Evaluate a checkpoint as asked; write the report's files and return report.json's content. The files are
    written into a temporary folder beside --out and moved into it once all are there, so an interrupted evaluation
    leaves the previous report whole."""
    request = EvaluationSettings.from_args(args)
    out = Path(args.out) if args.out else evaluation_folder(args.checkpoint)
    if args.dataset != "nih" and not args.out:
        out = out / args.dataset  # never over NIH's report (and its thresholds.json)
    check_out_folder(out)
    experts = read_expert_labels(args.expert_labels) if args.expert_labels else None  # checked before the long work
    print(f"evaluating {args.checkpoint}: reading it, and the labels of the films it is evaluated on")
    model = TorchModel(args.checkpoint, args.device, args.amp)
    evaluated = (evaluate_nih if args.dataset == "nih" else evaluate_external)(model, request)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        report, written = write_report(args, request, model, evaluated, experts, staging)
        out.mkdir(exist_ok=True)
        for name in REPORT_FILES:  # renames within one folder: the report changes all at once
            if (staging / name).is_file():
                os.replace(staging / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)  # an earlier evaluation's, which this one did not make
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {', '.join(written)} to {out}")
    return report


def write_report(args, request, model, evaluated, experts, out):
    """The report's files, written into `out`; (report.json's content, the names of the files)."""
    sha256 = checkpoint_sha256(args.checkpoint)  # after the evaluation: it may have added OOD statistics to the file
    about = {
        "checkpoint": str(args.checkpoint),
        "epoch": model.checkpoint["epoch"],
        "dataset": args.dataset,
        "test_list": str(Path(args.test_list).resolve()) if args.test_list else None,
        **evaluated.about,
        "checkpoint_sha256": sha256,  # which checkpoint predictions.csv and thresholds.json belong to
    }
    print(f"scoring {len(evaluated.rows):,} films: AUROC, its interval from {args.bootstrap:,} resamples of patients")
    table, summary = build_report(
        evaluated.names,
        evaluated.targets,
        evaluated.raw,
        evaluated.rows.patient_id.to_numpy(),
        evaluated.thresholds,
        args.bootstrap,
        evaluated.reference,
    )
    print(format_report(table, summary, "CheXNet" if evaluated.reference else "-"))
    report = {**about, "tta": args.tta, "bootstrap_replicates": args.bootstrap, **summary}
    if "dataset" in evaluated.rows.columns and evaluated.rows.dataset.nunique() > 1:
        report["datasets"] = dataset_sections(evaluated, args.bootstrap)
        report["pooled"] = {"images": len(evaluated.rows), **summary, "findings": records(table)}
    written = ["report.json", "report.csv", "roc_curves.png"]
    written += statistics_sections(args, model, evaluated, table, report, out, sha256)
    whole = (table.auroc_ci_low.to_numpy(), table.auroc_ci_high.to_numpy(), summary["mean_auroc_ci"])
    report["subgroups"], said = subgroups.report_section(
        evaluated.rows,
        evaluated.names,
        evaluated.targets,
        evaluated.raw,
        evaluated.thresholds,
        args.bootstrap,
        out,
        whole,
    )
    print(said)
    written += ["subgroups.csv", "subgroups.png"] if report["subgroups"] else []
    if evaluated.boxes is not None and (evaluated.rows.path == "").any():
        print("localisation skipped: it draws heat maps on the full films, and these are in the cache alone")
    elif evaluated.boxes is not None:
        table = localisation_section(args, model, evaluated.rows, evaluated.boxes, table, report, out)
        written += ["localisation.png"] if "localisation" in report else []
    if experts is not None:
        report["expert_labels"] = expert_section(request, experts, evaluated.rows, evaluated.raw, out)
        written.append("expert_labels.csv")
    table.to_csv(out / "report.csv", index=False)
    report["findings"] = records(table)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_roc_curves(evaluated.names, evaluated.targets, evaluated.raw, table, out / "roc_curves.png")
    return report, written


def records(table):
    return json.loads(table.to_json(orient="records"))


def dataset_sections(evaluated, bootstrap):
    """A union's report per dataset: each one's films alone, with the same thresholds (report.json's "datasets")."""
    sections = {}
    for name in dict.fromkeys(evaluated.rows.dataset):
        mine = (evaluated.rows.dataset == name).to_numpy()
        patients = evaluated.rows.patient_id.to_numpy()[mine]
        table, summary = build_report(
            evaluated.names, evaluated.targets[mine], evaluated.raw[mine], patients, evaluated.thresholds, bootstrap
        )
        low, high = summary["mean_auroc_ci"]
        print(f"{name}: {mine.sum():,} films, mean AUROC {summary['mean_auroc']:.3f} [{low:.3f}, {high:.3f}]")
        sections[name] = {
            "images": int(mine.sum()),
            "patients": len(set(patients)),
            **summary,
            "findings": records(table),
        }
    return sections


def statistics_sections(args, model, evaluated, table, report, out, sha256):
    """The calibration's, thresholds' and out-of-distribution sections of the report, and predictions.csv; the names
    of the files written."""
    written = []
    if evaluated.fitted is not None:
        table["threshold_calibrated"] = calibrated_thresholds(evaluated.thresholds, evaluated.fitted)
    if evaluated.calibrated is not None:
        report["calibration"], said = calibration.report_section(
            evaluated.names, evaluated.targets, evaluated.raw, evaluated.calibrated, out
        )
        fitted = evaluated.fitted if evaluated.fitted is not None else model.statistics.calibration
        report["calibration"]["left_raw"] = calibration.left_raw(fitted, FINDINGS)  # of the model's findings
        if report["calibration"]["left_raw"]:
            said += f"\n{', '.join(report['calibration']['left_raw'])}: {calibration.LEFT_RAW}"
        print(said)
        written.append("reliability.png")
    if args.dataset == "nih":
        policy = f"sensitivity {args.sensitivity}" if args.sensitivity else "youden"
        write_thresholds(out / "thresholds.json", policy, evaluated.thresholds, FINDINGS, evaluated.fitted, sha256)
        report["threshold_policy"] = policy
        written.append("thresholds.json")
    percentiles = np.full(len(evaluated.rows), np.nan)
    fitted_ood = model.statistics.ood
    if fitted_ood is not None:
        what = f"the {args.split} split" if args.dataset == "nih" else f"{args.dataset}'s films"
        distances = ood.distances(fitted_ood, evaluated.features)
        report["ood"], said = ood.report_section(fitted_ood, distances, what)
        print(said)
        percentiles = ood.percentiles(fitted_ood, distances)
    shown = evaluated.raw if evaluated.calibrated is None else evaluated.calibrated  # what predict.py outputs
    print(f"writing predictions.csv: {len(evaluated.rows):,} films, their labels and probabilities")
    predictions = prediction_table(evaluated.rows, evaluated.names, evaluated.targets, shown, percentiles)
    predictions.to_csv(out / "predictions.csv", index=False)
    return [*written, "predictions.csv"]


def localisation_section(args, model, rows, boxes, table, report, out):
    """Heat-map localisation against boxes (NIH's, VinDr's, RSNA's): report entries, table columns, plot."""
    source = boxes.source.iloc[0] if len(boxes) else ""
    results, examples, outside, corrected = localise(model, boxes, rows, args.box_threshold)
    if corrected["clipped"] or corrected["off_film"]:
        print(
            f"boxes of {source}: {corrected['clipped']} clipped to their film, {corrected['off_film']} left out as off "
            f"it{' (first: ' + '; '.join(corrected['first_off_film']) + ')' if corrected['off_film'] else ''}"
        )
    if not results:
        return table
    print(f"localisation against {source} ({outside} boxed films outside the evaluated films left out):")
    print(format_localisation(results, WANG_IOBB_01 if args.dataset == "nih" else {}))
    report["localisation"] = results
    report["localisation_settings"] = {
        "boxes": source,
        "box_threshold": args.box_threshold,
        "left_out": outside,
        "clipped_to_the_film": corrected["clipped"],
        "off_the_film": corrected["off_film"],
    }
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


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with one_line_errors(
        interrupted="no file of this evaluation was written, and an earlier report in its folder is whole"
    ):
        evaluate(args)


if __name__ == "__main__":
    main()
