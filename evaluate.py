"""The report of a trained checkpoint: the numbers the field judges a chest X-ray classifier by.

    python evaluate.py --checkpoint checkpoints/resnet50/best.pth [--split test] [--out DIR] [--tta] [--boxes FILE]
    python evaluate.py --checkpoint C --dataset chexpert|mimic|padchest --data_dir DIR [--uncertain ignore]

NIH: evaluates on exactly the split the training run used (carried in the checkpoint, and in split.csv beside it),
never on images the model trained or was selected on. Per finding: AUROC with a 95% bootstrap confidence interval
(resampling patients), average precision, prevalence, and an operating point (threshold chosen on the validation
split: Youden's J, or --sensitivity) with sensitivity, specificity, PPV and F1 on the evaluated split. With
NIH's boxes (BBox_List_2017.csv beside the label file, or --boxes): heat-map localisation as Wang et al. scored it.
Other datasets: the same figures on their frontal films, for the findings that map onto ours (external.py).
Writes report.json, report.csv, roc_curves.png, thresholds.json (which predict.py uses; NIH only) and
localisation.png (with boxes).
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_curve
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from configurator import add_device_flags, add_out_flag
from dataset import FINDINGS, attach_image_paths, find_label_file, read_labels, saved_split
from devices import worker_count
from errors import DataError, UserError
from external import DATASETS, UNCERTAIN_POLICIES, model_scores, read_external
from films import eval_view, five_views
from images import CachedImages, PngImages, find_cache
from inference import TorchModel, predict_logits, read_thresholds, thresholds_path, write_thresholds
from loaders import ChestXrayDataset
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
from metrics import (
    auroc_per_finding,
    average_precision_per_finding,
    bootstrap_auroc_ci,
    choose_thresholds,
    mean_auroc,
    operating_point,
)
from transforms import normalize

CHEXNET_AUROC = {  # Rajpurkar et al. 2017, "CheXNet", Table 1 (a random patient split, not NIH's official one)
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}
TTA_CROPS = 5  # films.five_views: four corners and the centre


class AverageOverCrops(nn.Module):
    """Runs the model on every crop of an image and averages the logits."""

    def __init__(self, model, crops):
        super().__init__()
        self.model, self.crops = model, crops

    def forward(self, images):
        return self.model(images).view(-1, self.crops, len(FINDINGS)).mean(dim=1)


def run_split(checkpoint, checkpoint_path, test_list=None):
    """(image_name/split table, where it came from): the checkpoint's own split (checked against the split.csv
    beside it), or split.csv alone for older checkpoints; with test_list, that file's images as the test part."""
    if test_list:
        names = Path(test_list).read_text().split()
        return pd.DataFrame({"image_name": names, "split": "test"}), str(test_list)
    saved = saved_split(checkpoint.get("split"), Path(checkpoint_path).parent / "split.csv")
    if saved is None:
        official = Path(checkpoint["config"]["DATA_DIR"]) / "test_list.txt"
        raise DataError(
            f"{checkpoint_path} carries no split (written before checkpoints did) and no split.csv lies beside it, "
            f"so which images it never saw is unknown. Evaluate it in its run folder; or, only if the run trained on "
            f"NIH's train_val_list.txt, on the official test list: --test_list {official}"
        )
    return saved, f"the split of {checkpoint_path}"


def split_rows(split, source, data_dir, csv_path, parts):
    """{part: labels with image paths} for parts of a run's split. The label file is read and the images are
    indexed once for all the parts."""
    csv_file = find_label_file(data_dir, csv_path)
    labels = read_labels(csv_file).set_index("image_name")
    wanted = []
    for part in dict.fromkeys(parts):
        names = split.image_name[split.split == part]
        unknown = names[~names.isin(labels.index)]
        if len(unknown):
            raise DataError(f"{len(unknown)} image(s) of {source} are not in {csv_file} (first: {unknown.iloc[0]})")
        if len(names) == 0:
            raise DataError(f"the {part} part of {source} is empty")
        wanted.append(labels.loc[names].reset_index().assign(part=part))
    rows = attach_image_paths(pd.concat(wanted, ignore_index=True), data_dir)
    return {part: rows[rows.part == part].drop(columns="part").reset_index(drop=True) for part in parts}


def evaluation_images(rows, data_dir, load_size):
    """The rows' images from the dataset's cache when one holds them all at this size (no PNG decoding), else PNGs."""
    folder = find_cache(data_dir, load_size)
    if folder is not None:
        try:
            images = CachedImages(folder, rows["image_name"])
            if images.size == load_size:
                return images
        except DataError:  # incomplete, or without some of these images: the PNGs then
            pass
    return PngImages(rows["path"], load_size)


def predict_probabilities(model, rows, args):
    """Sigmoid outputs [images, findings] of an inference.TorchModel for the rows (a path column, and image_name for
    NIH's cache), batched under inference_mode (AMP as in training)."""
    config, device = model.config, model.device
    view = partial(five_views if args.tta else eval_view, image_size=config["IMAGE_SIZE"])
    if args.dataset == "nih":
        images = evaluation_images(rows, args.data_dir or config["DATA_DIR"], config["LOAD_SIZE"])
    else:
        images = PngImages(rows["path"], config["LOAD_SIZE"])
    dataset = ChestXrayDataset(images, np.zeros((len(rows), len(FINDINGS))), view)
    workers = worker_count(args.num_workers)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    net = AverageOverCrops(model.net, TTA_CROPS) if args.tta else model.net

    def prepare(batch):  # with TTA a batch is [N, crops, 1, S, S]: the crops become a larger batch
        batch = batch.flatten(0, 1) if args.tta else batch
        return normalize(batch.to(device, non_blocking=True), model.channels_last)

    def progress(batches):
        return tqdm(batches, desc=f"predicting {len(rows):,} images")

    logits, _ = predict_logits(net, loader, prepare, model.dtype, progress)
    return torch.sigmoid(logits).numpy()


def build_report(names, targets, probabilities, patient_ids, thresholds, replicates, reference=None, seed=0):
    """Per-finding table (targets may hold NaN: left out of that finding) and the mean AUROC with its CI."""
    aurocs = auroc_per_finding(targets, probabilities)

    def progress(chunks):
        return tqdm(chunks, desc=f"bootstrap ({replicates} patient resamples)", unit="chunk", leave=False)

    low, high, mean_ci = bootstrap_auroc_ci(
        targets, probabilities, patient_ids, replicates, seed=seed, progress=progress
    )
    table = pd.DataFrame(
        {
            "finding": names,
            "auroc": aurocs,
            "auroc_ci_low": low,
            "auroc_ci_high": high,
            "average_precision": average_precision_per_finding(targets, probabilities),
            "prevalence": np.nanmean(targets, axis=0),
            "positives": np.nansum(targets, axis=0).astype(int),
            "images": (~np.isnan(targets)).sum(axis=0),
            "chexnet_auroc": [(reference or {}).get(name, np.nan) for name in names],  # NIH only
            "threshold": thresholds,
        }
    )
    points = [
        operating_point(targets[:, k], probabilities[:, k], threshold)
        if np.isfinite(threshold)
        else dict.fromkeys(("sensitivity", "specificity", "ppv", "f1"), np.nan)
        for k, threshold in enumerate(thresholds)
    ]
    table = pd.concat([table, pd.DataFrame(points)], axis=1)
    return table, {"mean_auroc": mean_auroc(aurocs), "mean_auroc_ci": [float(mean_ci[0]), float(mean_ci[1])]}


def format_report(table, summary, reference_name="CheXNet"):
    lines = [
        f"{'finding':<20}{'AUROC':>7}{'95% CI':>15}{'AP':>7}{'prev.':>8}{reference_name:>9}   "
        f"{'thresh.':>8}{'sens.':>7}{'spec.':>7}{'PPV':>7}{'F1':>7}"
    ]
    for row in table.itertuples():
        lines.append(
            f"{row.finding:<20}{row.auroc:>7.3f}{f'{row.auroc_ci_low:.3f}-{row.auroc_ci_high:.3f}':>15}"
            f"{row.average_precision:>7.3f}{row.prevalence:>8.1%}{row.chexnet_auroc:>9.3f}   "
            f"{row.threshold:>8.3f}{row.sensitivity:>7.3f}{row.specificity:>7.3f}{row.ppv:>7.3f}{row.f1:>7.3f}"
        )
    low, high = summary["mean_auroc_ci"]
    reference = np.nanmean(table.chexnet_auroc) if table.chexnet_auroc.notna().any() else np.nan
    lines.append(f"{'mean':<20}{summary['mean_auroc']:>7.3f}{f'{low:.3f}-{high:.3f}':>15}{'':>15}{reference:>9.3f}")
    return "\n".join(lines)


def plot_roc_curves(names, targets, probabilities, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.5 * columns, 3.5 * rows), squeeze=False)
    for k, (name, panel) in enumerate(zip(names, axes.flat)):
        panel.plot([0, 1], [0, 1], ":", color="gray")
        known = ~np.isnan(targets[:, k])
        if np.isfinite(table.auroc[k]):
            false_positive_rate, true_positive_rate, _ = roc_curve(targets[known, k], probabilities[known, k])
            panel.plot(false_positive_rate, true_positive_rate, label=f"AUROC {table.auroc[k]:.3f}")
            panel.legend(loc="lower right")
        panel.set(title=name, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1))
    for panel in axes.flat[len(names) :]:
        panel.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (e.g. best.pth)")
    parser.add_argument("--data_dir", help="dataset folder (default: the one the run trained on)")
    parser.add_argument("--csv", default="", help="label file (default: the Data_Entry_2017*.csv in data_dir)")
    parser.add_argument(
        "--dataset",
        default="nih",
        choices=("nih", *DATASETS),
        help="NIH (the run's split) or another dataset (default: nih)",
    )
    parser.add_argument(
        "--uncertain",
        default="ignore",
        choices=UNCERTAIN_POLICIES,
        help="other datasets' -1 and blank labels (default: ignore)",
    )
    parser.add_argument(
        "--boxes", help="NIH-format box file (default: BBox_List_2017.csv beside the labels; none: skip)"
    )
    parser.add_argument(
        "--box_threshold",
        type=float,
        default=BOX_THRESHOLD,
        help="share of a map's maximum cut into boxes (default: %(default)s)",
    )
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default: test)")
    parser.add_argument("--test_list", help="evaluate on these images (e.g. NIH's test_list.txt), not the run's split")
    add_out_flag(parser, None, "report folder", "evaluation/ beside the checkpoint")
    parser.add_argument("--tta", action="store_true", help="average five crops per image (default: off)")
    parser.add_argument("--sensitivity", type=float, help="choose thresholds for this sensitivity, not Youden's J")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default: 1000)")
    parser.add_argument("--batch_size", type=int, default=64, help="default: 64")
    parser.add_argument("--num_workers", type=int, default=-1, help="DataLoader workers; -1: from the CPU count")
    add_device_flags(parser)
    return parser.parse_args(argv)


def evaluate(args):
    model = TorchModel(args.checkpoint, args.device, args.amp)
    checkpoint = model.checkpoint
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "evaluation"
    if args.dataset != "nih" and not args.out:
        out = out / args.dataset  # never over NIH's report (and its thresholds.json)
    out.mkdir(parents=True, exist_ok=True)
    about = {"checkpoint": str(args.checkpoint), "epoch": checkpoint["epoch"], "dataset": args.dataset}
    run = evaluate_nih if args.dataset == "nih" else evaluate_external
    about, names, targets, probabilities, patients, thresholds, reference = run(args, model, about)
    rows = about.pop("rows", None)
    table, summary = build_report(names, targets, probabilities, patients, thresholds, args.bootstrap, reference)
    print(format_report(table, summary, "CheXNet" if args.dataset == "nih" else "-"))
    report = {**about, "tta": args.tta, "bootstrap_replicates": args.bootstrap, **summary}
    if args.dataset == "nih":
        policy = f"sensitivity {args.sensitivity}" if args.sensitivity else "youden"
        write_thresholds(out / "thresholds.json", policy, dict(zip(FINDINGS, thresholds)))
        report["threshold_policy"] = policy
        table = localisation_section(args, model, rows, table, report, out)
    table.to_csv(out / "report.csv", index=False)
    report["findings"] = json.loads(table.to_json(orient="records"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_roc_curves(names, targets, probabilities, table, out / "roc_curves.png")
    print(f"wrote the report (report.json, report.csv, roc_curves.png) to {out}")
    return report


def evaluate_nih(args, model, about):
    """The run's test (or validation) split; thresholds chosen on its validation split."""
    checkpoint, config = model.checkpoint, model.config
    split, source = run_split(checkpoint, args.checkpoint, args.test_list)
    has_validation = (split.split == "val").any()
    wanted = [args.split, "val"] if has_validation else [args.split]
    parts = split_rows(split, source, args.data_dir or config["DATA_DIR"], args.csv or config["CSV"], wanted)
    rows = parts[args.split]
    print(
        f"checkpoint {args.checkpoint} (epoch {checkpoint['epoch']}); the {args.split} split: {len(rows):,} images, "
        f"{rows.patient_id.nunique():,} patients{'; five-crop TTA' if args.tta else ''}"
    )
    if has_validation:
        validation = parts["val"]
        val_probabilities = predict_probabilities(model, validation, args)
        thresholds = choose_thresholds(validation[list(FINDINGS)].to_numpy(), val_probabilities, args.sensitivity)
    else:
        print("no validation split: no operating thresholds (thresholds.json will hold NaN)")
        thresholds = np.full(len(FINDINGS), np.nan)
    probabilities = predict_probabilities(model, rows, args)
    targets = rows[list(FINDINGS)].to_numpy(dtype=float)
    about |= {
        "split": args.split,
        "split_source": source,
        "images": len(rows),
        "patients": int(rows.patient_id.nunique()),
        "rows": rows,  # for the localisation; not written
    }
    return about, list(FINDINGS), targets, probabilities, rows.patient_id.to_numpy(), thresholds, CHEXNET_AUROC


def evaluate_external(args, model, about):
    """Another dataset's frontal films, the findings that map onto ours; thresholds from NIH's validation split
    (evaluation/thresholds.json beside the checkpoint), where a finding maps to one of ours."""
    if not args.data_dir:
        raise DataError(f"--dataset {args.dataset} needs --data_dir: the dataset's folder")
    data = read_external(args.dataset, args.data_dir, args.csv, args.uncertain)
    names = list(data.mapping)
    print(
        f"checkpoint {args.checkpoint} (epoch {model.checkpoint['epoch']}); {args.dataset} ({data.source}): "
        f"{len(data.rows):,} frontal films of {data.rows.patient_id.nunique():,} patients; left out "
        f"{data.laterals:,} lateral and {data.other_views:,} other films; uncertain labels: {args.uncertain}"
    )
    probabilities = model_scores(predict_probabilities(model, data.rows, args), data.mapping, FINDINGS)
    nih = read_thresholds(thresholds_path(args.checkpoint))
    thresholds = np.array(
        [nih.get(mapped[0], np.nan) if len(mapped) == 1 else np.nan for mapped in data.mapping.values()]
    )
    about |= {
        "source": data.source,
        "images": len(data.rows),
        "patients": int(data.rows.patient_id.nunique()),
        "laterals_left_out": data.laterals,
        "other_views_left_out": data.other_views,
        "uncertain": args.uncertain,
        "mapping": {name: list(mapped) for name, mapped in data.mapping.items()},
        "threshold_source": "NIH validation split (thresholds.json beside the checkpoint)",
    }
    targets = data.rows[names].to_numpy(dtype=float)
    return about, names, targets, probabilities, data.rows.patient_id.to_numpy(), thresholds, None


def localisation_section(args, model, rows, table, report, out):
    """Heat-map localisation against NIH-format boxes, when there are boxes: report entries, table columns, plot."""
    config = model.config
    default = (
        find_label_file(args.data_dir or config["DATA_DIR"], args.csv or config["CSV"]).parent / "BBox_List_2017.csv"
    )
    boxes_path = Path(args.boxes) if args.boxes and args.boxes != "none" else default
    if args.boxes == "none" or not boxes_path.is_file():
        if args.boxes not in (None, "none"):
            raise DataError(f"box file not found: {boxes_path}")
        return table
    results, examples, outside = localise(model, read_boxes(boxes_path), rows, args.box_threshold)
    print(f"localisation against {boxes_path} ({outside} boxed films outside the {args.split} split left out):")
    print(format_localisation(results))
    report["localisation"] = results
    report["localisation_settings"] = {
        "boxes": str(boxes_path),
        "box_threshold": args.box_threshold,
        "left_out": outside,
    }
    columns = {
        "loc_boxes": lambda r: r["boxes"],
        **{f"loc_iobb_{t}": lambda r, t=t: r["iobb"][str(t)] for t in IOBB_THRESHOLDS},
        **{f"loc_iou_{t}": lambda r, t=t: r["iou"][str(t)] for t in IOU_THRESHOLDS},
        "loc_pointing": lambda r: r["pointing"],
    }
    for column, value in columns.items():
        table[column] = [value(results[f]) if f in results else np.nan for f in table.finding]
    table["wang_iobb_0.1"] = [WANG_IOBB_01.get(f, np.nan) for f in table.finding]
    plot_examples(examples, out / "localisation.png")
    return table


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        evaluate(args)
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
