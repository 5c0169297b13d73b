"""The tables, text and pictures of an evaluation (evaluate.py writes them): the per-finding table (AUROC with its
patient-bootstrap CI, average precision, prevalence, positives and negatives, the operating point), its printed
form, the ROC curves, and the side-by-side table of a finding scored against two sets of labels on the same films
(NIH's text-mined labels and radiologists')."""

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr14.metrics import (
    auroc_per_finding,
    average_precision_per_finding,
    bootstrap_auroc_ci,
    mean_auroc,
    operating_point,
)

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


def bootstrap(targets, probabilities, patient_ids, replicates, seed=0):
    """(low, high, mean CI) of bootstrap_auroc_ci, with a progress bar."""

    def progress(chunks):
        return tqdm(chunks, desc=f"bootstrap ({replicates} patient resamples)", unit="chunk", leave=False)

    return bootstrap_auroc_ci(targets, probabilities, patient_ids, replicates, seed=seed, progress=progress)


def build_report(names, targets, probabilities, patient_ids, thresholds, replicates, reference=None, seed=0):
    """Per-finding table (targets may hold NaN: left out of that finding) and the mean AUROC with its CI."""
    aurocs = auroc_per_finding(targets, probabilities)
    low, high, mean_ci = bootstrap(targets, probabilities, patient_ids, replicates, seed)
    known = ~np.isnan(targets)
    positives = np.nansum(targets, axis=0).astype(int)
    table = pd.DataFrame(
        {
            "finding": names,
            "auroc": aurocs,
            "auroc_ci_low": low,
            "auroc_ci_high": high,
            "average_precision": average_precision_per_finding(targets, probabilities),
            "prevalence": positives / np.where(known.any(axis=0), known.sum(axis=0), np.nan),  # NaN: unlabelled
            "positives": positives,
            "negatives": known.sum(axis=0) - positives,
            "images": known.sum(axis=0),
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
        f"{'finding':<20}{'AUROC':>7}{'95% CI':>15}{'AP':>7}{'prev.':>8}{'pos.':>7}{'neg.':>8}{reference_name:>9}   "
        f"{'thresh.':>8}{'sens.':>7}{'spec.':>7}{'PPV':>7}{'F1':>7}"
    ]
    for row in table.itertuples():
        lines.append(
            f"{row.finding:<20}{row.auroc:>7.3f}{f'{row.auroc_ci_low:.3f}-{row.auroc_ci_high:.3f}':>15}"
            f"{row.average_precision:>7.3f}{row.prevalence:>8.1%}{row.positives:>7,}{row.negatives:>8,}"
            f"{row.chexnet_auroc:>9.3f}   {row.threshold:>8.3f}{row.sensitivity:>7.3f}{row.specificity:>7.3f}"
            f"{row.ppv:>7.3f}{row.f1:>7.3f}"
        )
    low, high = summary["mean_auroc_ci"]
    reference = np.nanmean(table.chexnet_auroc) if table.chexnet_auroc.notna().any() else np.nan
    lines.append(f"{'mean':<20}{summary['mean_auroc']:>7.3f}{f'{low:.3f}-{high:.3f}':>15}{'':>30}{reference:>9.3f}")
    return "\n".join(lines)


def finding_panels(names, columns, inches):
    """A headless matplotlib figure with a panel per finding (rows of `columns`, each `inches` (w, h)), the diagonal
    dotted in each (chance on a ROC plot, perfect calibration on a reliability one), the unused panels hidden.
    Returns (figure, [(name, panel)]); save_panels writes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(inches[0] * columns, inches[1] * rows), squeeze=False)
    for panel in axes.flat[len(names) :]:
        panel.axis("off")
    for panel in axes.flat[: len(names)]:
        panel.plot([0, 1], [0, 1], ":", color="gray")
    return figure, list(zip(names, axes.flat))


def save_panels(figure, path):
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_roc_curves(names, targets, probabilities, table, path):
    from sklearn.metrics import roc_curve

    figure, panels = finding_panels(names, 4, (3.5, 3.5))
    for k, (name, panel) in enumerate(panels):
        known = ~np.isnan(targets[:, k])
        if np.isfinite(table.auroc[k]):
            false_positive_rate, true_positive_rate, _ = roc_curve(targets[known, k], probabilities[known, k])
            panel.plot(false_positive_rate, true_positive_rate, label=f"AUROC {table.auroc[k]:.3f}")
            panel.legend(loc="lower right")
        panel.set(title=name, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1))
    save_panels(figure, path)


def two_label_table(names, first, second, scores, patient_ids, replicates, labels=("nih", "expert")):
    """Each finding's AUROC against two sets of labels of the same films (columns of `first` and `second`, NaN: not
    labelled), with their patient-bootstrap CIs and positives: [{finding, images, LABEL_positives, LABEL_auroc,
    LABEL_ci}] for both labels."""
    rows = []
    figures = {}
    for label, targets in zip(labels, (first, second)):
        low, high, _ = bootstrap(targets, scores, patient_ids, replicates)
        figures[label] = (auroc_per_finding(targets, scores), low, high, np.nansum(targets, axis=0).astype(int))
    both = ~(np.isnan(first) | np.isnan(second))
    for k, name in enumerate(names):
        row = {"finding": name, "images": int(both[:, k].sum())}
        for label in labels:
            auroc, low, high, positives = figures[label]
            row |= {f"{label}_positives": int(positives[k]), f"{label}_auroc": float(auroc[k])}
            row |= {f"{label}_ci": [float(low[k]), float(high[k])]}
        rows.append(row)
    return rows


def format_two_label_table(rows, labels=("nih", "expert"), titles=("NIH's labels", "experts' labels")):
    header = f"{'finding':<20}{'films':>7}" + "".join(f"{title:>34}" for title in titles)
    lines = [header, f"{'':<27}" + "".join(f"{'AUROC (95% CI)':>24}{'positives':>10}" for _ in labels)]
    for row in rows:
        cells = "".join(
            f"{row[f'{label}_auroc']:>9.3f} ({row[f'{label}_ci'][0]:.3f}-{row[f'{label}_ci'][1]:.3f})"
            f"{row[f'{label}_positives']:>10,}"
            for label in labels
        )
        lines.append(f"{row['finding']:<20}{row['images']:>7,}{cells}")
    return "\n".join(lines)
