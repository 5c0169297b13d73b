import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr14.metrics import (
    auroc_per_finding,
    average_precision_per_finding,
    bootstrap_auroc_ci,
    choose_thresholds,
    mean_auroc,
    operating_point,
    sensitivity_threshold,
    youden_threshold,
)


def fixture_data(images, findings=3, seed=0, signal=1.0):
    """Targets and scores whose AUROC rises with `signal`; patients of 1-4 images each."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((images, findings)) < 0.3).astype(int)
    scores = targets * signal + rng.normal(0, 1, targets.shape)
    patients = np.repeat(np.arange(images), rng.integers(1, 5, images))[:images]
    return targets, scores, patients


def test_auroc_and_average_precision_match_scikit_learn_per_column():
    targets, scores, _ = fixture_data(300)
    for column in range(3):
        assert auroc_per_finding(targets, scores)[column] == roc_auc_score(targets[:, column], scores[:, column])
        assert average_precision_per_finding(targets, scores)[column] == average_precision_score(
            targets[:, column], scores[:, column]
        )
    targets[:, 1] = 0  # one class only: undefined, not a crash and not a fake 0.5
    aurocs = auroc_per_finding(targets, scores)
    assert np.isnan(aurocs[1]) and mean_auroc(aurocs) == pytest.approx(np.mean(aurocs[[0, 2]]))


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_data():
    small = fixture_data(200, seed=1)
    large = fixture_data(2000, seed=1)
    widths = []
    for targets, scores, patients in (small, large):
        low, high, (mean_low, mean_high) = bootstrap_auroc_ci(targets, scores, patients, replicates=200)
        estimate = auroc_per_finding(targets, scores)
        assert (low <= estimate).all() and (estimate <= high).all()
        assert mean_low <= mean_auroc(estimate) <= mean_high
        widths.append(np.mean(high - low))
    assert widths[1] < widths[0] / 2  # ten times the data: roughly a third of the width


def test_bootstrap_interval_is_the_central_95_percent_of_replicates_rebuilt_by_hand():
    """The replicates redrawn here from the same seed, each resample written out row by row for scikit-learn: the
    interval is their 2.5th and 97.5th percentiles per finding, and the mean's those of each replicate's mean."""
    targets, scores, patients = fixture_data(120, seed=6)
    low, high, mean_interval = bootstrap_auroc_ci(targets, scores, patients, replicates=60, seed=11)
    _, image_patient = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng(11)
    draws = [rng.integers(0, image_patient.max() + 1, image_patient.max() + 1) for _ in range(60)]
    replicates = []
    for draw in draws:
        rows = np.concatenate([np.flatnonzero(image_patient == patient) for patient in draw])
        replicates.append([roc_auc_score(targets[rows, k], scores[rows, k]) for k in range(targets.shape[1])])
    replicates = np.array(replicates)
    np.testing.assert_allclose(low, np.percentile(replicates, 2.5, axis=0), rtol=1e-9)
    np.testing.assert_allclose(high, np.percentile(replicates, 97.5, axis=0), rtol=1e-9)
    np.testing.assert_allclose(mean_interval, np.percentile(replicates.mean(axis=1), [2.5, 97.5]), rtol=1e-9)


def test_bootstrap_resamples_patients_not_images():
    """Ten identical films per patient carry the information of one: the interval must stay as wide."""
    targets, scores, _ = fixture_data(150, seed=2)
    one_each = bootstrap_auroc_ci(targets, scores, np.arange(150), replicates=300, seed=5)
    repeated = [np.repeat(array, 10, axis=0) for array in (targets, scores)]
    by_patient = bootstrap_auroc_ci(*repeated, np.repeat(np.arange(150), 10), replicates=300, seed=5)
    by_image = bootstrap_auroc_ci(*repeated, np.arange(1500), replicates=300, seed=5)
    width = [np.mean(result[1] - result[0]) for result in (one_each, by_patient, by_image)]
    assert width[1] == pytest.approx(width[0], rel=0.25)
    assert width[2] < 0.6 * width[1]  # resampling images would claim a precision that is not there


def test_thresholds_on_known_data():
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert youden_threshold(targets, scores) == 0.7  # J = 0.75, tied with 0.4; the stricter threshold wins
    assert sensitivity_threshold(targets, scores, 1.0) == 0.4  # the highest threshold catching every positive
    point = operating_point(targets, scores, 0.4)
    assert point == {"sensitivity": 1.0, "specificity": 0.75, "ppv": 0.8, "f1": pytest.approx(8 / 9)}
    both = choose_thresholds(np.c_[targets, np.zeros(8)], np.c_[scores, scores])
    assert both[0] == 0.7 and np.isnan(both[1])


def test_the_weighted_auroc_of_a_resample_equals_scikit_learn_on_the_duplicated_rows():
    """The bootstrap's fast AUROC (one sort, patients' images counted as often as the patient was drawn) against
    scikit-learn on the resample written out row by row, ties included (scores rounded to 0.1)."""
    from cxr14.metrics import weighted_auroc

    targets, scores, patients = fixture_data(400, seed=3)
    scores = np.round(scores, 1)
    rng = np.random.default_rng(4)
    _, image_patient = np.unique(patients, return_inverse=True)
    for _ in range(5):
        counts = np.bincount(rng.integers(0, image_patient.max() + 1, image_patient.max() + 1))
        weights = np.zeros(image_patient.max() + 1)
        weights[: len(counts)] = counts
        weights = weights[image_patient]
        rows = np.repeat(np.arange(len(targets)), weights.astype(int))
        for column in range(3):
            expected = roc_auc_score(targets[rows, column], scores[rows, column])
            assert weighted_auroc(targets[:, column], scores[:, column], weights[None])[0] == pytest.approx(expected)
    assert np.isnan(weighted_auroc(np.zeros(10), np.arange(10.0), np.ones((1, 10))))[0]
