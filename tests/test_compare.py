import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

import compare
import evaluate
import predict
from cxr14.metrics import compare_aurocs, delong_test, holm, paired_bootstrap_difference
from dataset import FINDINGS


def delong_by_pairs(targets, scores_a, scores_b):
    """DeLong et al. (1988) as written: the kernel psi over every (positive, negative) pair, the structural components
    as its row and column means, their covariances; an O(m n) second implementation of what metrics does by ranks."""
    components = []
    for scores in (scores_a, scores_b):
        x, y = scores[targets == 1], scores[targets == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        components.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = components
    m, n = len(v10_a), len(v01_a)
    s10, s01 = np.cov(np.stack([v10_a, v10_b])), np.cov(np.stack([v01_a, v01_b]))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return auc_a, auc_b, 2 * norm.sf(abs(auc_b - auc_a) / np.sqrt(variance))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_the_pairwise_definition_on_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random(120) < 0.3).astype(float)
    scores_a = np.round(targets * 0.8 + rng.normal(size=120), 1)  # rounded: many ties, within and across classes
    scores_b = np.round(targets * 1.2 + rng.normal(size=120), 1)
    expected = delong_by_pairs(targets, scores_a, scores_b)
    assert delong_test(targets, scores_a, scores_b) == pytest.approx(expected, rel=1e-9)
    # NaN labels are left out, as everywhere else
    with_unknown = np.r_[targets, np.nan, np.nan]
    assert delong_test(with_unknown, np.r_[scores_a, 9, -9], np.r_[scores_b, -9, 9]) == pytest.approx(expected)


def test_holm_on_a_hand_worked_family():
    # sorted 0.01, 0.02, 0.03, 0.5 times 4, 3, 2, 1: 0.04, 0.06, 0.06 (monotone), 0.5; NaN stays out of the family
    adjusted = holm([0.03, 0.5, np.nan, 0.01, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, 0.5, np.nan, 0.04, 0.06])
    np.testing.assert_allclose(holm([0.4, 0.6]), [0.8, 0.8])  # 0.6 x 1 < 0.8: never below a smaller p's
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])  # capped at 1


def test_a_model_against_itself_differs_by_nothing():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 3)) < 0.3).astype(float)
    scores = rng.random((200, 3)) + targets * 0.5
    patients = np.repeat(np.arange(100), 2)
    figures = compare_aurocs(targets, scores, scores.copy(), patients, replicates=200)
    np.testing.assert_array_equal(figures["difference"], 0)
    np.testing.assert_array_equal(figures["ci_low"], 0)
    np.testing.assert_array_equal(figures["ci_high"], 0)
    np.testing.assert_array_equal(figures["p_bootstrap"], 1)
    np.testing.assert_array_equal(figures["p_delong"][:3], 1)
    np.testing.assert_array_equal(figures["p_holm"][:3], 1)


def test_the_paired_bootstrap_ci_covers_the_true_difference_at_about_the_nominal_rate():
    """Binormal scores: a model's AUROC is Phi(d / sqrt(2)) for positives shifted by d (unit-variance noise), so the
    true difference is known. Two correlated models on 300 films of 150 patients, 300 simulated test sets."""
    rng = np.random.default_rng(7)
    shift_a, shift_b = 1.0, 1.4
    truth = norm.cdf(shift_b / np.sqrt(2)) - norm.cdf(shift_a / np.sqrt(2))
    covered = 0
    simulations = 300
    for seed in range(simulations):
        patient_positive = rng.random(150) < 0.3
        targets = np.repeat(patient_positive, 2).astype(float)[:, None]
        shared = rng.normal(size=(300, 1))  # what both models see alike: the pairing the test must use
        noise_a = np.sqrt(0.5) * shared + np.sqrt(0.5) * rng.normal(size=(300, 1))
        noise_b = np.sqrt(0.5) * shared + np.sqrt(0.5) * rng.normal(size=(300, 1))
        scores_a, scores_b = shift_a * targets + noise_a, shift_b * targets + noise_b
        patients = np.repeat(np.arange(150), 2)
        result = paired_bootstrap_difference(targets, scores_a, scores_b, patients, replicates=200, seed=seed)
        covered += result["low"][0] <= truth <= result["high"][0]
    assert 0.92 <= covered / simulations <= 0.98  # 0.947 here; a 90% interval covers 0.903


def test_on_independent_films_the_bootstrap_p_value_agrees_with_delongs():
    """One film per patient: DeLong's assumption holds, so both two-sided p-values estimate the same thing."""
    rng = np.random.default_rng(11)
    log_ratios = []
    for seed in range(120):
        targets = (rng.random(300) < 0.3).astype(float)[:, None]
        shared = rng.normal(size=(300, 1))
        scores_a = 1.0 * targets + np.sqrt(0.5) * (shared + rng.normal(size=(300, 1)))
        scores_b = 1.25 * targets + np.sqrt(0.5) * (shared + rng.normal(size=(300, 1)))
        p_boot = paired_bootstrap_difference(targets, scores_a, scores_b, np.arange(300), 300, seed=seed)["p"][0]
        p_delong = delong_test(targets[:, 0], scores_a[:, 0], scores_b[:, 0])[2]
        if 0.02 < p_delong < 0.8:  # where 300 replicates resolve the bootstrap's p
            log_ratios.append(np.log(p_boot / p_delong))
    assert len(log_ratios) > 50 and 0.75 < np.exp(np.mean(log_ratios)) < 1.33  # 0.99 here; one-sided: about 0.5


def test_models_are_aligned_film_by_film_and_other_labels_are_refused():
    first = pd.DataFrame(
        {"image_name": ["a", "b", "c"], "patient_id": [1, 1, 2], "label_X": [1, 0, 0], "prob_X": [0.9, 0.2, 0.1]}
    )
    second = first.iloc[[2, 0, 1]].assign(prob_X=[0.3, 0.8, 0.4])  # the same films in another order
    findings, labels, patients, scores = compare.aligned([first, second], ["A", "B"], ["a.pth", "b.pth"])
    assert findings == ["X"] and labels[:, 0].tolist() == [1, 0, 0] and patients.tolist() == ["1", "1", "2"]
    np.testing.assert_array_equal(scores[1][:, 0], [0.8, 0.4, 0.3])
    relabelled = second.assign(label_X=[1, 1, 0])
    with pytest.raises(compare.DataError, match="other labels"):
        compare.aligned([first, relabelled], ["A", "B"], ["a.pth", "b.pth"])


def test_a_union_and_an_nih_only_run_are_compared_on_the_nih_films_both_scored(capsys):
    nih_only = pd.DataFrame(
        {"image_name": ["a", "b", "c"], "patient_id": [1, 1, 2], "label_X": [1, 0, 0], "prob_X": [0.9, 0.2, 0.1]}
    )
    union = pd.DataFrame(
        {
            "image_name": ["chexpert:x", "nih:c", "nih:a", "nih:b"],
            "patient_id": ["chexpert:7", "nih:2", "nih:1", "nih:1"],
            "label_X": [1, 0, 1, 0],
            "prob_X": [0.5, 0.3, 0.8, 0.4],
        }
    )
    findings, labels, patients, scores = compare.aligned([nih_only, union], ["nih", "union"], ["a.pth", "b.pth"])
    assert labels[:, 0].tolist() == [1, 0, 0] and patients.tolist() == ["1", "1", "2"]
    np.testing.assert_array_equal(scores[1][:, 0], [0.8, 0.4, 0.3])
    assert "union: compared on the 3 films every model scored; 1 left out" in capsys.readouterr().out
    other = union.assign(image_name=["chexpert:x", "nih:c", "nih:a", "nih:d"])  # another NIH split
    with pytest.raises(compare.DataError, match="1 films differ between the films of nih") as refused:
        compare.aligned([nih_only, other], ["nih", "union"], ["a.pth", "b.pth"])
    assert "a union's split is its own" in str(refused.value)


def test_a_finding_without_positives_is_reported_as_such(tmp_path):
    targets = np.zeros((40, 2))
    targets[:10, 0] = 1  # the second finding has no positives
    scores = np.random.default_rng(0).random((40, 2))
    table = compare.pair_table(["A", "B"], targets, np.arange(40), [scores, scores[::-1].copy()], ("a", "b"), 50)
    row = table.set_index("finding").loc["B"]
    assert row.note == "no positives among the 40 films" and np.isnan(row.auroc_a) and np.isnan(row.p_delong)
    assert np.isfinite(table.set_index("finding").loc["A"].p_delong)


# ----------------------------------------------------------------------------- on the demo model


def worse_copy(checkpoint_path, out):
    """The checkpoint with noise added to its head's weights: the same split and settings, a clearly worse model."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for value in checkpoint["model"].values():
        if value.ndim == 2 and value.shape[0] == len(FINDINGS):  # the head's Linear
            value += 10 * value.std() * torch.randn(value.shape, generator=generator)
    out.mkdir()
    torch.save(checkpoint, out / "worse.pth")
    (out / "split.csv").write_bytes((checkpoint_path.parent / "split.csv").read_bytes())
    return out / "worse.pth"


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """best.pth evaluated as evaluate.py does (its predictions.csv in a copy of the run folder)."""
    run = tmp_path_factory.mktemp("compared")
    for name in ("best.pth", "split.csv"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    arguments = ["--bootstrap", "20", "--num_workers", "0", "--no-amp", "--boxes", "none"]  # predictions alone
    evaluate.main(["--checkpoint", str(run / "best.pth"), *arguments])
    return run


def test_predictions_csv_holds_what_predict_py_outputs_for_the_same_films(evaluated, learn_dir, tmp_path):
    table = pd.read_csv(evaluated / "evaluation" / "best" / "predictions.csv")
    split = pd.read_csv(evaluated / "split.csv")
    assert list(table.image_name) == list(split.image_name[split.split == "test"])
    assert [c for c in table.columns if c.startswith("label_")] == [f"label_{f}" for f in FINDINGS]
    films = table.image_name[:12]
    paths = [str(next(learn_dir.rglob(name))) for name in films]
    predict.main(["--checkpoint", str(evaluated / "best.pth"), *paths, "--out", str(tmp_path), "--no-amp"])
    predicted = pd.read_csv(tmp_path / "predictions.csv")
    ours = table.set_index("image_name").loc[films]
    for finding in FINDINGS:
        np.testing.assert_allclose(ours[f"prob_{finding}"], predicted[finding], atol=2e-5)
    np.testing.assert_allclose(ours.ood_percentile, predicted.ood_percentile, atol=1e-4)  # predict.py: 5 decimals
    label_file = next(learn_dir.glob("Data_Entry_2017*.csv"))
    labels = pd.read_csv(label_file).set_index("Image Index").loc[films, "Finding Labels"]
    for name, text in labels.items():
        marked = {finding for finding in FINDINGS if ours.loc[name, f"label_{finding}"] == 1}
        assert marked == set(text.split("|")) - {"No Finding"}


def test_a_clearly_worse_model_is_told_apart_and_a_model_from_itself_is_not(evaluated, tmp_path, capsys):
    worse = worse_copy(evaluated / "best.pth", tmp_path / "worse")
    stale = tmp_path / "worse" / "evaluation" / "worse"  # best.pth's files, as if worse.pth replaced it since
    shutil.copytree(evaluated / "evaluation" / "best", stale)
    (stale / "report.json").write_text(
        (stale / "report.json").read_text(encoding="utf-8").replace("best.pth", "worse.pth"), encoding="utf-8"
    )
    out = tmp_path / "out"
    compare.main(
        [str(worse), str(evaluated / "best.pth"), "--reps", "200", "--num_workers", "0", "--no-amp"]
        + ["--out", str(out), "--names", "worse,best"]
    )
    printed = capsys.readouterr().out
    assert printed.count("read the predictions evaluate.py wrote") == 1  # best.pth's own; worse.pth's are stale
    table = pd.read_csv(out / "compare.csv")
    assert list(table.columns) == list(compare.COLUMNS)
    mean = table.set_index("finding").loc["mean"]
    assert mean.difference > 0 and mean.p_bootstrap < 0.05 and mean.ci_low > 0
    per_finding = table[table.finding != "mean"]
    assert (per_finding.p_holm < 0.05).sum() >= 3
    saved = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert saved["models"] == {"worse": str(worse), "best": str(evaluated / "best.pth")}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG" and "| **mean** |" in (out / "compare.md").read_text(
        encoding="utf-8"
    )

    same = tmp_path / "same"
    compare.main([str(evaluated / "best.pth")] * 2 + ["--reps", "50", "--out", str(same), "--num_workers", "0"])
    itself = pd.read_csv(same / "compare.csv")
    defined = itself[np.isfinite(itself.auroc_a)]
    assert (defined.difference == 0).all() and (defined.p_bootstrap == 1).all() and (defined.ci_low == 0).all()
    assert (defined.ci_high == 0).all()


def test_checkpoints_scored_on_different_films_are_refused(evaluated, tmp_path):
    other = worse_copy(evaluated / "best.pth", tmp_path / "other")
    split = pd.read_csv(other.parent / "split.csv")
    split.loc[split.index[split.split == "test"][:3], "split"] = "train"  # another run's split
    split.to_csv(other.parent / "split.csv", index=False)
    checkpoint = torch.load(other, map_location="cpu", weights_only=True)
    del checkpoint["split"], checkpoint["format"]  # format 1's oldest: split.csv alone says which films it never saw
    torch.save(checkpoint, other)
    with pytest.raises(SystemExit) as stopped:
        compare.main([str(evaluated / "best.pth"), str(other), "--reps", "10", "--num_workers", "0"])
    message = str(stopped.value.code)
    assert "3 films differ" in message and "--test_list" in message


@pytest.mark.parametrize("damage", ["text", "empty"])
def test_a_damaged_predictions_csv_is_named_not_blamed_on_the_split(evaluated, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    table_path = run / "evaluation" / "best" / "predictions.csv"
    if damage == "empty":
        table_path.write_bytes(b"")
    else:
        table = pd.read_csv(table_path)
        table[f"prob_{FINDINGS[0]}"] = table[f"prob_{FINDINGS[0]}"].astype(object)
        table.loc[3, f"prob_{FINDINGS[0]}"] = "high"
        table.to_csv(table_path, index=False)
    with pytest.raises(SystemExit) as stopped:
        compare.main([str(run / "best.pth"), str(evaluated / "best.pth"), "--reps", "10", "--num_workers", "0"])
    message = str(stopped.value.code)
    assert str(table_path) in message and "evaluate the checkpoint again" in message, message
    assert "split" not in message and ("row 5" in message if damage == "text" else "not a predictions table" in message)


def test_names_with_an_empty_one_and_a_missing_second_checkpoint_are_refused_before_any_prediction(
    evaluated, tmp_path, capsys
):
    first = str(evaluated / "best.pth")
    with pytest.raises(SystemExit) as stopped:
        compare.main([first, first, "--names", "a,", "--out", str(tmp_path / "a")])
    assert "--names needs 2 different names" in str(stopped.value.code)
    with pytest.raises(SystemExit) as stopped:
        compare.main([first, str(tmp_path / "missing.pth"), "--out", str(tmp_path / "b")])
    assert f"checkpoint(s) not found: {tmp_path / 'missing.pth'}" in str(stopped.value.code)
    assert "read the predictions" not in capsys.readouterr().out  # the first was not predicted, nor read


def test_a_comparison_of_other_checkpoints_is_not_replaced_without_overwrite(evaluated, tmp_path):
    first, out = str(evaluated / "best.pth"), tmp_path / "out"
    arguments = ["--reps", "10", "--num_workers", "0", "--out", str(out), "--names", "base,new"]
    compare.main([first, first, *arguments])
    before = (out / "compare.json").read_bytes()
    compare.main([first, first, *arguments])  # the same comparison again: rewritten
    other = worse_copy(evaluated / "best.pth", tmp_path / "other")
    with pytest.raises(SystemExit) as stopped:
        compare.main([first, str(other), *arguments])
    assert f"{out} holds another comparison" in str(stopped.value.code) and "--overwrite" in str(stopped.value.code)
    assert (out / "compare.json").read_bytes() == before
    compare.main([first, str(other), *arguments, "--overwrite"])
    assert json.loads((out / "compare.json").read_text(encoding="utf-8"))["models"]["new"] == str(other)
