"""Probabilities that mean what they say: a Platt scaling per finding, fitted on the validation split, and how well
calibrated a set of probabilities is (expected calibration error over equal-mass bins, Brier score, reliability
diagrams).

Why it is needed: train.py's default POS_WEIGHT = "ratio" multiplies each finding's positives by negatives/positives
(up to about 490 for Hernia). The weighted loss is lowest when the logit is the true log-odds plus log(pos_weight),
so the sigmoid of the raw output is inflated far above the true rate. Platt scaling, sigmoid(a * logit + b), learns
the intercept b that takes that log(pos_weight) back off, and the slope a that undoes over- or under-confidence.
Temperature scaling alone, sigmoid(logit / T), cannot: it only stretches or squeezes the logits around 0, and a
shifted base rate is a shift, not a stretch. Both a > 0: the order of the films, and so every AUROC, is unchanged.
"""

import numpy as np

BINS = 15  # equal-mass bins of the expected calibration error and the reliability diagrams


def fit_platt(logits, targets):
    """(a, b) per finding: the logistic regression of each finding's labels on its raw logit (NaN labels left out),
    with Platt's own smoothed targets, (positives + 1) / (positives + 2) and 1 / (negatives + 2), which keep a finding
    whose validation films it separates perfectly from an infinite slope. a = 1, b = 0 (no change) for a finding with
    one class only, or one the regression would turn upside down."""
    from sklearn.linear_model import LogisticRegression

    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    slopes, intercepts = np.ones(logits.shape[1]), np.zeros(logits.shape[1])
    for k in range(logits.shape[1]):
        known = ~np.isnan(targets[:, k])
        y, z = targets[known, k], logits[known, k, None]
        positives, negatives = y.sum(), len(y) - y.sum()
        if not positives or not negatives:
            continue
        soft = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
        regression = LogisticRegression(C=1e6, max_iter=1000).fit(
            np.concatenate([z, z]), np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=np.r_[soft, 1 - soft]
        )
        if regression.coef_[0, 0] > 0:
            slopes[k], intercepts[k] = regression.coef_[0, 0], regression.intercept_[0]
    return slopes, intercepts


LEFT_RAW = "left raw: its validation films had one class only, or the fit would have reversed their order"


def left_raw(fitted, names):
    """The names whose Platt scaling is the identity (a = 1, b = 0: fit_platt's fallback; a real fit never gives
    exactly that): their 'calibrated' probabilities are the raw ones, inflated by pos_weight."""
    if fitted is None:
        return list(names)
    slopes, intercepts = (np.asarray(part, dtype=np.float64) for part in fitted)
    return [name for name, a, b in zip(names, slopes, intercepts) if a == 1 and b == 0]


def sigmoid(logits):
    """The network's raw probabilities from its logits (float64 numpy)."""
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))


def calibrated(logits, slopes, intercepts):
    """Calibrated probabilities from raw logits: sigmoid(a * logit + b), per finding."""
    return sigmoid(np.asarray(logits, dtype=np.float64) * slopes + intercepts)


def logit(probabilities):
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(probabilities / (1 - probabilities))


def reliability_bins(targets, probabilities, bins=BINS):
    """[(mean predicted, observed rate, films)] over equal-mass bins of one finding's known labels."""
    known = ~np.isnan(targets)
    order = np.argsort(probabilities[known], kind="stable")
    y, p = targets[known][order], probabilities[known][order]
    parts = [part for part in np.array_split(np.arange(len(y)), bins) if len(part)]
    return [(float(p[part].mean()), float(y[part].mean()), len(part)) for part in parts]


def expected_calibration_error(targets, probabilities, bins=BINS):
    """Per finding: the films-weighted mean gap between predicted and observed rates over equal-mass bins."""
    targets, probabilities = np.asarray(targets, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    errors = []
    for k in range(targets.shape[1]):
        rows = reliability_bins(targets[:, k], probabilities[:, k], bins)
        films = sum(count for _, _, count in rows)
        errors.append(sum(count * abs(p - y) for p, y, count in rows) / films if films else np.nan)
    return np.array(errors)


def brier(targets, probabilities):
    """Per finding: the mean squared difference between probability and label (known labels only)."""
    targets, probabilities = np.asarray(targets, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    return np.nanmean((probabilities - targets) ** 2, axis=0)  # NaN labels: NaN terms, left out


def plot_reliability(names, targets, before, after, path, bins=BINS):
    """reliability.png: a panel per finding, predicted against observed rate over equal-mass bins, before (raw
    sigmoid) and after calibration, with the diagonal of perfect calibration and the films per bin."""
    from cxr14.report import finding_panels, save_panels

    figure, panels = finding_panels(names, 5, (3.2, 3.3))
    for k, (name, panel) in enumerate(panels):
        counts = []
        for probabilities, label, style in ((before, "raw", "o--"), (after, "calibrated", "o-")):
            points = reliability_bins(targets[:, k], probabilities[:, k], bins)
            if points:
                predicted, observed, counts = zip(*points)
                panel.plot(predicted, observed, style, markersize=3, label=label)
        panel.set(title=name, xlim=(0, 1), ylim=(0, 1), xlabel="predicted", ylabel="observed")
        if counts:
            panel.text(0.03, 0.92, f"{len(counts)} bins of ~{int(np.median(counts))} films", fontsize=7)
        panel.legend(loc="lower right", fontsize=7)
    figure.suptitle("Reliability on the evaluated split: the calibrated line should follow the diagonal")
    save_panels(figure, path)


def report_section(names, targets, raw, after, out):
    """The calibration part of an evaluation: per finding and for the mean, the expected calibration error and the
    Brier score before (the raw sigmoid) and after calibration; reliability.png. Returns (entry, text)."""
    figures = {
        "ece_raw": expected_calibration_error(targets, raw),
        "ece_calibrated": expected_calibration_error(targets, after),
        "brier_raw": brier(targets, raw),
        "brier_calibrated": brier(targets, after),
    }
    entry = {
        "method": "Platt scaling per finding, sigmoid(a * logit + b), fitted on the validation split",
        "bins": BINS,
        "findings": {name: {key: float(values[k]) for key, values in figures.items()} for k, name in enumerate(names)},
        "mean": {key: float(np.nanmean(values)) for key, values in figures.items()},
    }
    plot_reliability(names, np.asarray(targets, dtype=np.float64), raw, after, out / "reliability.png")
    mean = entry["mean"]
    text = (
        f"calibration (Platt, fitted on validation), mean over findings: ECE {mean['ece_raw']:.3f} raw -> "
        f"{mean['ece_calibrated']:.3f} calibrated; Brier {mean['brier_raw']:.3f} -> {mean['brier_calibrated']:.3f}"
    )
    return entry, text
