"""Is this even the kind of film the model was trained on? The Mahalanobis distance of a film's features (the pooled
last-block features and the third block's halves, model.ood_features_and_logits) to the training films' distribution,
in a reduced space (PCA to COMPONENTS dimensions) with a shrinkage covariance (Ledoit-Wolf), as Calli et al. (FRODO,
MIDL 2019) did with a ResNet-50 on chest X-rays. A PNG or JPEG has no DICOM header to say that it is a hand, a
lateral, a photo of a screen or a CT slice; its features say so: they lie far from any chest film's.

A film's distance is reported as a percentile of reference films' distances (the validation films', and the training
films' each from a fit without its patient); above FLAG_PERCENTILE it is flagged.
Fitting needs scikit-learn; scoring is numpy (and the same arithmetic in the ONNX graph, export.py).
"""

import numpy as np

COMPONENTS = 512  # the features are reduced by PCA to this many dimensions (fewer when fewer films)
FLAG_PERCENTILE = 99.0  # a film further than this share of the validation films is flagged
FIT_FILMS = 5000  # at most this many training films (a fixed sample) fit the distribution
FOLDS = 5  # the training films' own reference distances come from fits without their patient
GRAPH_KEYS = ("mean", "components", "location", "precision")  # what the distance is computed from
WARNING = (
    "unlike the films this model was trained on (further from them than {percentile:.1f}% of the films it was checked "
    "on): its findings may mean nothing"
)


def fit_sample(train_rows, seed=0):
    """The training films (rows of a label table) whose features fit the distribution: all, or FIT_FILMS of them."""
    return train_rows.sample(n=min(FIT_FILMS, len(train_rows)), random_state=seed)


def fit(train_features, val_features, train_patients=None, progress=None):
    """The statistics (numpy arrays and numbers) of the training films' feature distribution, and the sorted reference
    distances that percentiles are read from: the validation films' and the training films' own, each training film's
    from a fit without its patient (5 folds by patient), so that no film counts as near itself. (The validation films
    alone are too few for a 99th percentile in a small run: 78 in the test suite's demo.) The PCAs run in float32:
    twice as fast as float64, with distances equal to 1e-4 relative (tested). progress: a bar told of each of the
    FOLDS + 1 fits (update(1)), or None."""
    train_features = _unit(train_features).astype(np.float32)
    patients = np.arange(len(train_features)) if train_patients is None else np.asarray(train_patients)
    statistics = _fit(train_features, progress)
    held_out = []
    for group in np.array_split(np.random.default_rng(0).permutation(np.unique(patients)), FOLDS):
        fold = np.isin(patients, group)
        if fold.any() and (~fold).sum() > 2:
            held_out.append(distances(_fit(train_features[~fold], progress), train_features[fold]))
    reference = np.sort(np.concatenate([distances(statistics, val_features), *held_out]))
    statistics["validation"] = reference
    statistics["threshold"] = tail_percentile(reference, FLAG_PERCENTILE)
    return statistics


def tail_percentile(values, percentile):
    """The percentile of a log-normal fitted to the values: a few hundred films say little about their own 1% tail
    (the empirical 99th percentile of 793 demo films flagged 2.9% of the held-out test films, the fitted one 1.1%)."""
    from scipy import stats

    shape, _, scale = stats.lognorm.fit(values, floc=0)
    return float(stats.lognorm.ppf(percentile / 100, shape, 0, scale))


def _fit(features, progress=None):
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    pca = PCA(min(COMPONENTS, len(features) - 1, features.shape[1]), random_state=0).fit(features)
    shrunk = LedoitWolf().fit(pca.transform(features).astype(np.float64))
    if progress is not None:
        progress.update(1)
    return {
        "mean": pca.mean_.astype(np.float64),
        "components": pca.components_.astype(np.float64),
        "location": shrunk.location_,
        "precision": shrunk.precision_,
    }


def _unit(features):
    """Each film's features scaled to length 1: the distance then measures what the features say, not how strongly
    (a film's exposure and contrast scale them all)."""
    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def distances(statistics, features):
    """The Mahalanobis distance of each film's features to the training films' distribution."""
    centred = (_unit(features) - statistics["mean"]) @ np.asarray(statistics["components"]).T
    centred -= statistics["location"]
    squared = ((centred @ np.asarray(statistics["precision"])) * centred).sum(axis=1)  # 40x einsum's "ij,jk,ik->i"
    return np.sqrt(np.maximum(squared, 0))


def percentiles(statistics, values):
    """Each distance as the share (in %) of validation films at or below it."""
    validation = np.asarray(statistics["validation"])
    return 100.0 * np.searchsorted(validation, np.asarray(values), side="right") / len(validation)


def flagged(statistics, values):
    return np.asarray(values) > statistics["threshold"]


def report_section(statistics, values, what):
    """The out-of-distribution part of an evaluation: the share of the evaluated films (their distances) beyond the
    threshold."""
    share = float(np.mean(flagged(statistics, values)))
    entry = {
        "flagged_share": share,
        "flagged": int(np.sum(flagged(statistics, values))),
        "films": len(values),
        "threshold": float(statistics["threshold"]),
        "flag_percentile": FLAG_PERCENTILE,
    }
    text = (
        f"out of distribution: {share:.1%} of {what} ({entry['flagged']:,} of {len(values):,}) lie further from the "
        f"training films than {FLAG_PERCENTILE:g}% of the validation films"
    )
    return entry, text
