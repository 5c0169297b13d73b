"""calibration.py on hand-made examples: each figure against the value worked out by hand."""

import numpy as np
import pytest

from cxr14 import calibration


def test_unknown_labels_are_left_out_of_the_fit_not_read_as_known():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 1)) < 0.4).astype(float)
    logits = 2.0 * targets + rng.normal(size=(200, 1)) - 1
    unknown = rng.random(200) < 0.3
    with_unknown = targets.copy()
    with_unknown[unknown] = np.nan
    fitted = np.ravel(calibration.fit_platt(logits, with_unknown))
    np.testing.assert_allclose(fitted, np.ravel(calibration.fit_platt(logits[~unknown], targets[~unknown])))
    for guess in (0.0, 1.0):  # the unknown films, read as negatives or positives, would move the fit
        guessed = np.where(np.isnan(with_unknown), guess, with_unknown)
        assert np.abs(np.ravel(calibration.fit_platt(logits, guessed)) - fitted).max() > 0.05


def test_ece_is_the_films_weighted_mean_of_absolute_gaps():
    # two equal-mass bins: (0.1, 0.3) predicts 0.2 where half are positive (under-confident by 0.3), and (0.6, 0.9)
    # predicts 0.75 where none is (over-confident by 0.75): (2 x 0.3 + 2 x 0.75) / 4 = 0.525; signed, they would
    # partly cancel to 0.225
    probabilities = np.array([[0.1], [0.3], [0.6], [0.9]])
    targets = np.array([[1.0], [0.0], [0.0], [0.0]])
    assert calibration.expected_calibration_error(targets, probabilities, bins=2)[0] == pytest.approx(0.525)
    # an unknown label is not a film of any bin
    with_unknown = np.array([[1.0], [0.0], [np.nan], [0.0], [0.0]])
    more = np.array([[0.1], [0.3], [0.99], [0.6], [0.9]])
    assert calibration.expected_calibration_error(with_unknown, more, bins=2)[0] == pytest.approx(0.525)


def test_brier_is_per_finding_over_its_known_labels():
    targets = np.array([[1, 0], [0, np.nan], [1, 1]], dtype=float)
    probabilities = np.array([[0.8, 0.1], [0.4, 0.5], [0.6, 0.7]])
    # finding 1: (0.2^2 + 0.4^2 + 0.4^2) / 3 = 0.12; finding 2: (0.1^2 + 0.3^2) / 2 = 0.05
    np.testing.assert_allclose(calibration.brier(targets, probabilities), [0.12, 0.05])


def test_the_findings_a_fit_leaves_raw_are_named():
    """Platt scaling falls back to the identity for a finding with one class in validation, or whose fit would
    invert the order (25.5); those findings were still called calibrated."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 3))
    targets = (rng.random((300, 3)) < 1 / (1 + np.exp(-2 * logits))).astype(float)  # column 0: a real relation
    targets[:, 1] = 0.0  # no positive
    targets[:, 2] = (logits[:, 2] < 0).astype(float)  # more positives at lower logits: a fit would reverse them
    fitted = calibration.fit_platt(logits, targets)
    assert calibration.left_raw(fitted, ["A", "B", "C"]) == ["B", "C"]
    assert calibration.left_raw(None, ["A", "B"]) == ["A", "B"]  # no calibration at all
