"""subgroups.py's groups and operating points, counted by hand."""

import numpy as np
import pandas as pd

from cxr14 import subgroups


def test_ages_on_a_bands_edge_fall_in_the_documented_band():
    rows = pd.DataFrame({"age": [19, 20, 39, 40, 59, 60, 79, 80, 95]})
    found = {group: int(mask.sum()) for (attribute, group), mask in subgroups.groups(rows).items()}
    # AGE_BANDS: 0-19, 20-39, 40-59, 60-79, 80+, both ends included
    assert found == {"0-19": 1, "20-39": 2, "40-59": 2, "60-79": 2, "80+": 2}
    masks = subgroups.groups(rows)
    assert list(rows.age[masks[("age", "20-39")]]) == [20, 39] and list(rows.age[masks[("age", "40-59")]]) == [40, 59]


def test_first_films_and_follow_ups_are_counted_apart():
    rows = pd.DataFrame({"follow_up": [0, 0, 0, 1, 2, 7]})
    masks = subgroups.groups(rows)
    assert masks[("film", "first")].sum() == 3 and masks[("film", "follow-up")].sum() == 3
    assert not (masks[("film", "first")] & masks[("film", "follow-up")]).any()


def test_a_film_scored_exactly_at_its_threshold_is_called_positive():
    targets = np.array([[1], [1], [1], [1], [0], [0], [0], [0]], dtype=float)
    probabilities = np.array([[0.5], [0.5], [0.7], [0.2], [0.5], [0.1], [0.2], [0.3]])
    figures = subgroups.group_figures(["A"], targets, probabilities, np.arange(8), np.array([0.5]), replicates=5)
    # at >= 0.5: positives 0.5, 0.5, 0.7 called (3 of 4); negatives: the 0.5 (1 of 4)
    assert figures[0]["sensitivity"] == 0.75 and figures[0]["false_positive_rate"] == 0.25
    # underdiagnosis: of the 4 sick films, only the one at 0.2 is called clear of everything
    assert figures[-1]["underdiagnosis_rate"] == 0.25


def test_the_whole_splits_intervals_from_the_main_report_are_not_drawn_again(monkeypatch):
    from cxr14.report import build_report

    rng = np.random.default_rng(0)
    films = 240
    rows = pd.DataFrame({"patient_id": rng.integers(0, 120, films), "sex": rng.choice(["F", "M"], films)})
    targets = (rng.random((films, 2)) < 0.3).astype(float)
    probabilities = np.clip(targets * 0.3 + rng.random((films, 2)) * 0.7, 0, 1)
    thresholds = np.array([0.5, 0.5])
    table, summary = build_report(["A", "B"], targets, probabilities, rows.patient_id.to_numpy(), thresholds, 50)
    drawn, bootstrap = [], subgroups.bootstrap_auroc_ci
    monkeypatch.setattr(subgroups, "bootstrap_auroc_ci", lambda *args, **kw: drawn.append(1) or bootstrap(*args, **kw))
    alone, _ = subgroups.subgroup_report(rows, ["A", "B"], targets, probabilities, thresholds, 50)
    assert len(drawn) == 3  # the whole split, F and M
    whole = (table.auroc_ci_low.to_numpy(), table.auroc_ci_high.to_numpy(), summary["mean_auroc_ci"])
    reused, _ = subgroups.subgroup_report(rows, ["A", "B"], targets, probabilities, thresholds, 50, whole)
    assert len(drawn) == 3 + 2  # F and M only
    pd.testing.assert_frame_equal(reused, alone)
