"""ood.py: percentiles at ties, and reference distances of training films from fits that never saw them."""

import numpy as np
import pytest

from cxr14 import ood


def test_a_distance_equal_to_a_reference_value_counts_that_value_as_at_or_below():
    statistics = {"validation": np.array([1.0, 2.0, 2.0, 3.0]), "threshold": 2.5}
    # the share of reference films at or below: 2.0 -> 3 of 4; 1.0 -> 1 of 4; below all -> 0; above all -> 100
    np.testing.assert_allclose(ood.percentiles(statistics, [2.0, 1.0, 0.5, 3.5]), [75.0, 25.0, 0.0, 100.0])
    np.testing.assert_array_equal(ood.flagged(statistics, [2.5, 2.51]), [False, True])  # beyond the threshold


def clusters(rng, patients, films, dimensions=12):
    """Each patient's films around a direction of its own: a fit without a patient has never seen its direction."""
    directions = rng.normal(size=(patients, dimensions)) * 3
    return np.concatenate([directions[p] + 0.3 * rng.normal(size=(films, dimensions)) for p in range(patients)])


def test_training_films_reference_distances_come_from_fits_without_their_patient():
    rng = np.random.default_rng(0)
    patients, films = 10, 12
    train = clusters(np.random.default_rng(1), patients, films)
    validation = clusters(np.random.default_rng(1), patients, 3) + 0.05 * rng.normal(size=(patients * 3, 12))
    statistics = ood.fit(train, validation, np.repeat(np.arange(patients), films))
    reference = statistics["validation"]
    assert len(reference) == len(train) + len(validation)  # the training films' own distances are in it
    val_distances = ood.distances(statistics, validation)
    # held out, a training film's patient is a direction its fit never saw: far beyond the validation films, which
    # the full fit saw (measured by the fit that includes them, they would lie as near as the validation films)
    held_out = np.sort(reference)[-len(train) :]
    assert np.median(held_out) > 3 * np.median(val_distances)
    assert np.sum(reference > val_distances.max()) >= 0.9 * len(train)


def test_the_distance_ignores_how_strongly_a_film_activates_the_features():
    rng = np.random.default_rng(2)
    train, validation = rng.normal(size=(80, 6)) + 2, rng.normal(size=(20, 6)) + 2
    statistics = ood.fit(train, validation)
    films = rng.normal(size=(5, 6)) + 2
    np.testing.assert_allclose(ood.distances(statistics, 7.0 * films), ood.distances(statistics, films))
    scaled = ood.fit(5.0 * train, validation)  # brighter training films: the same fit
    np.testing.assert_allclose(scaled["threshold"], statistics["threshold"], rtol=1e-6)


@pytest.mark.parametrize("films", [60])
def test_the_threshold_is_the_fitted_log_normal_tail_of_the_reference(films):
    from scipy import stats

    rng = np.random.default_rng(3)
    statistics = ood.fit(rng.normal(size=(films, 6)), rng.normal(size=(30, 6)))
    shape, _, scale = stats.lognorm.fit(statistics["validation"], floc=0)
    assert statistics["threshold"] == pytest.approx(stats.lognorm.ppf(ood.FLAG_PERCENTILE / 100, shape, 0, scale))


def test_the_float32_fit_and_the_matrix_product_give_float64s_distances_and_the_bar_counts_every_fit():
    """The PCAs in float32 and the distance as ((c @ P) * c).sum(1): against a float64 fit made here with
    scikit-learn directly and the distance as the three-operand einsum, equal to 1e-4 relative (2e-6 measured at
    5,000 x 4,096)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(4)
    train = np.abs(rng.normal(size=(600, 40)) @ rng.normal(size=(40, 300)) + 0.5 * rng.normal(size=(600, 300)))
    films = np.abs(rng.normal(size=(50, 40)) @ rng.normal(size=(40, 300)))

    class Bar:
        count = 0

        def update(self, steps):
            self.count += steps

    bar = Bar()
    statistics = ood.fit(train, films, progress=bar)
    assert bar.count == ood.FOLDS + 1 and statistics["components"].dtype == np.float64
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    pca = PCA(min(ood.COMPONENTS, len(train) - 1, train.shape[1]), random_state=0).fit(unit(train))
    shrunk = LedoitWolf().fit(pca.transform(unit(train)))
    centred = pca.transform(unit(films)) - shrunk.location_
    expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, shrunk.precision_, centred))
    np.testing.assert_allclose(ood.distances(statistics, films), expected, rtol=1e-4)
