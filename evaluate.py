"""Test-split report for a trained checkpoint: the numbers the field judges a chest X-ray classifier by.

    python evaluate.py --checkpoint checkpoints/resnet50/best.pth [--split test] [--out DIR] [--tta]

Evaluates on exactly the split the training run saved (split.csv beside the checkpoint), never on images the
model trained or was selected on. Per finding: AUROC with a 95% bootstrap confidence interval (resampling
patients), average precision, prevalence, and an operating point (threshold chosen on the validation split:
Youden's J, or --sensitivity) with sensitivity, specificity, PPV and F1 on the evaluated split.
Writes report.json, report.csv, roc_curves.png and thresholds.json (which predict.py uses).
"""

import argparse
import json
import os
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

from cache import CachedImages, find_cache
from dataset import (
    FINDINGS,
    ChestXrayDataset,
    DataError,
    PngImages,
    attach_image_paths,
    find_label_file,
    read_labels,
    saved_split,
)
from films import eval_view, five_views
from metrics import (
    auroc_per_finding,
    average_precision_per_finding,
    bootstrap_auroc_ci,
    choose_thresholds,
    mean_auroc,
    operating_point,
)
from model import (
    CheckpointError,
    autocast_dtype,
    load_checkpoint,
    model_from_checkpoint,
    predict_logits,
    select_device,
    use_channels_last,
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
TTA_CROPS = 5  # transforms.tta_transform: four corners and the centre


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


def predict_probabilities(model, rows, config, args, device):
    """Sigmoid outputs [images, findings] for the rows, batched under inference_mode (AMP as in training)."""
    view = partial(five_views if args.tta else eval_view, image_size=config["IMAGE_SIZE"])
    images = evaluation_images(rows, args.data_dir or config["DATA_DIR"], config["LOAD_SIZE"])
    dataset = ChestXrayDataset(images, rows[list(FINDINGS)], view)
    workers = args.num_workers if args.num_workers >= 0 else min(8, os.cpu_count() or 1)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    channels_last = use_channels_last(device, args.amp)
    net = AverageOverCrops(model, TTA_CROPS) if args.tta else model

    def prepare(batch):  # with TTA a batch is [N, crops, 1, S, S]: the crops become a larger batch
        return normalize((batch.flatten(0, 1) if args.tta else batch).to(device, non_blocking=True), channels_last)

    def progress(batches):
        return tqdm(batches, desc=f"predicting {len(rows):,} images")

    logits, _ = predict_logits(net, loader, prepare, autocast_dtype(device, args.amp), progress)
    return torch.sigmoid(logits).numpy()


def build_report(targets, probabilities, patient_ids, thresholds, replicates, seed=0):
    """Per-finding table and the mean AUROC with its confidence interval."""
    aurocs = auroc_per_finding(targets, probabilities)

    def progress(chunks):
        return tqdm(chunks, desc=f"bootstrap ({replicates} patient resamples)", unit="chunk", leave=False)

    low, high, mean_ci = bootstrap_auroc_ci(
        targets, probabilities, patient_ids, replicates, seed=seed, progress=progress
    )
    precision = average_precision_per_finding(targets, probabilities)
    table = pd.DataFrame(
        {
            "finding": FINDINGS,
            "auroc": aurocs,
            "auroc_ci_low": low,
            "auroc_ci_high": high,
            "average_precision": precision,
            "prevalence": targets.mean(axis=0),
            "positives": targets.sum(axis=0).astype(int),
            "chexnet_auroc": [CHEXNET_AUROC[finding] for finding in FINDINGS],
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


def format_report(table, summary):
    lines = [
        f"{'finding':<20}{'AUROC':>7}{'95% CI':>15}{'AP':>7}{'prev.':>8}{'CheXNet':>9}   "
        f"{'thresh.':>8}{'sens.':>7}{'spec.':>7}{'PPV':>7}{'F1':>7}"
    ]
    for row in table.itertuples():
        lines.append(
            f"{row.finding:<20}{row.auroc:>7.3f}{f'{row.auroc_ci_low:.3f}-{row.auroc_ci_high:.3f}':>15}"
            f"{row.average_precision:>7.3f}{row.prevalence:>8.1%}{row.chexnet_auroc:>9.3f}   "
            f"{row.threshold:>8.3f}{row.sensitivity:>7.3f}{row.specificity:>7.3f}{row.ppv:>7.3f}{row.f1:>7.3f}"
        )
    low, high = summary["mean_auroc_ci"]
    chexnet_mean = np.mean(list(CHEXNET_AUROC.values()))
    lines.append(f"{'mean':<20}{summary['mean_auroc']:>7.3f}{f'{low:.3f}-{high:.3f}':>15}{'':>15}{chexnet_mean:>9.3f}")
    return "\n".join(lines)


def plot_roc_curves(targets, probabilities, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(4, 4, figsize=(14, 14))
    for k, (finding, panel) in enumerate(zip(FINDINGS, axes.flat)):
        panel.plot([0, 1], [0, 1], ":", color="gray")
        if np.isfinite(table.auroc[k]):
            false_positive_rate, true_positive_rate, _ = roc_curve(targets[:, k], probabilities[:, k])
            panel.plot(false_positive_rate, true_positive_rate, label=f"AUROC {table.auroc[k]:.3f}")
            panel.legend(loc="lower right")
        panel.set(title=finding, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1))
    for panel in axes.flat[len(FINDINGS) :]:
        panel.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (e.g. best.pth)")
    parser.add_argument("--data_dir", help="dataset folder (default: the one the run trained on)")
    parser.add_argument("--csv", default="", help="label file (default: the Data_Entry_2017*.csv in data_dir)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default: test)")
    parser.add_argument("--test_list", help="evaluate on these images (e.g. NIH's test_list.txt), not the run's split")
    parser.add_argument("--out", help="report folder (default: evaluation/ beside the checkpoint)")
    parser.add_argument("--tta", action="store_true", help="average five crops per image (default: off)")
    parser.add_argument("--sensitivity", type=float, help="choose thresholds for this sensitivity, not Youden's J")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default: 1000)")
    parser.add_argument("--batch_size", type=int, default=64, help="default: 64")
    parser.add_argument("--num_workers", type=int, default=-1, help="DataLoader workers; -1: from the CPU count")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), or a torch device")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 and channels_last where training uses them (model.autocast_dtype); --no-amp: fp32 (default: on)",
    )
    return parser.parse_args(argv)


def evaluate(args):
    device = select_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, FINDINGS, map_location="cpu")
    config = checkpoint["config"]
    data_dir = args.data_dir or config["DATA_DIR"]
    layout = torch.channels_last if use_channels_last(device, args.amp) else torch.contiguous_format
    model = model_from_checkpoint(checkpoint).to(device, memory_format=layout)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "evaluation"
    out.mkdir(parents=True, exist_ok=True)

    split, source = run_split(checkpoint, args.checkpoint, args.test_list)
    has_validation = (split.split == "val").any()
    wanted = [args.split, "val"] if has_validation else [args.split]
    parts = split_rows(split, source, data_dir, args.csv or config["CSV"], wanted)
    rows = parts[args.split]
    print(
        f"checkpoint {args.checkpoint} (epoch {checkpoint['epoch']}); the {args.split} split: {len(rows):,} images, "
        f"{rows.patient_id.nunique():,} patients{'; five-crop TTA' if args.tta else ''}"
    )
    if has_validation:
        validation = parts["val"]
        val_probabilities = predict_probabilities(model, validation, config, args, device)
        thresholds = choose_thresholds(validation[list(FINDINGS)].to_numpy(), val_probabilities, args.sensitivity)
    else:
        print("no validation split: no operating thresholds (thresholds.json will hold NaN)")
        thresholds = np.full(len(FINDINGS), np.nan)
    targets = rows[list(FINDINGS)].to_numpy()
    probabilities = predict_probabilities(model, rows, config, args, device)
    table, summary = build_report(targets, probabilities, rows.patient_id.to_numpy(), thresholds, args.bootstrap)
    print(format_report(table, summary))

    policy = f"sensitivity {args.sensitivity}" if args.sensitivity else "youden"
    about = {
        "checkpoint": str(args.checkpoint),
        "epoch": checkpoint["epoch"],
        "split": args.split,
        "split_source": source,
        "images": len(rows),
        "patients": int(rows.patient_id.nunique()),
        "tta": args.tta,
        "bootstrap_replicates": args.bootstrap,
        "threshold_policy": policy,
    }
    table.to_csv(out / "report.csv", index=False)
    report = {**about, **summary, "findings": json.loads(table.to_json(orient="records"))}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    threshold_file = {"policy": policy, "thresholds": dict(zip(FINDINGS, map(float, thresholds)))}
    (out / "thresholds.json").write_text(json.dumps(threshold_file, indent=2) + "\n")
    plot_roc_curves(targets, probabilities, table, out / "roc_curves.png")
    print(f"wrote report.json, report.csv, thresholds.json and roc_curves.png to {out}")
    return report


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        evaluate(args)
    except (DataError, CheckpointError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
