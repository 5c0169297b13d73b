import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
from cxr14.metrics import auroc_per_finding
from dataset import FINDINGS
from helpers import predict_split


def run(argv):
    return evaluate.evaluate(evaluate.parse_args(argv))


def run_quick(checkpoint, *extra):
    """evaluate.py with a small bootstrap and no worker processes."""
    arguments = ["--checkpoint", str(checkpoint), "--bootstrap", "20", "--num_workers", "0", "--boxes", "none"]
    return run([*arguments, *map(str, extra)])


@pytest.fixture(scope="module")
def report(trained_run):
    return run(
        ["--checkpoint", str(trained_run / "best.pth"), "--bootstrap", "100", "--num_workers", "0", "--boxes", "none"]
    )


def test_report_covers_exactly_the_saved_test_split(report, trained_run, learn_dir):
    split = pd.read_csv(trained_run / "split.csv")
    test = split[split.split == "test"]
    assert report["split"] == "test" and report["images"] == len(test)
    assert report["patients"] == test.patient_id.nunique()
    logits, targets = predict_split(trained_run / "best.pth", learn_dir, "test")
    expected = auroc_per_finding(targets.numpy(), logits.numpy())
    reported = np.array([row["auroc"] if row["auroc"] is not None else np.nan for row in report["findings"]])
    np.testing.assert_allclose(reported, expected, rtol=1e-6)
    assert report["mean_auroc"] == pytest.approx(np.nanmean(expected))


def test_report_files_are_written_and_well_formed(report, trained_run):
    assert "pretrained_saw_test_films" not in report  # random weights (known_weights) saw no film
    out = trained_run / "evaluation" / "best"
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["mean_auroc"] == report["mean_auroc"] and [r["finding"] for r in saved["findings"]] == list(FINDINGS)
    low, high = saved["mean_auroc_ci"]
    assert low <= saved["mean_auroc"] <= high
    table = pd.read_csv(out / "report.csv")
    assert list(table.finding) == list(FINDINGS)
    assert {
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "average_precision",
        "prevalence",
        "chexnet_auroc",
        "threshold",
        "sensitivity",
        "specificity",
        "ppv",
        "f1",
    } <= set(table.columns)
    drawn = table.set_index("finding").loc["Cardiomegaly"]
    assert drawn.auroc_ci_low <= drawn.auroc <= drawn.auroc_ci_high and 0 <= drawn.sensitivity <= 1
    thresholds = json.loads((out / "thresholds.json").read_text(encoding="utf-8"))
    assert thresholds["policy"] == "youden" and set(thresholds["thresholds"]) == set(FINDINGS)
    assert (out / "roc_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sensitivity", [None, 0.9])  # Youden's J, and a sensitivity
def test_thresholds_json_holds_the_thresholds_of_the_validation_splits_own_predictions(
    sensitivity, trained_run, learn_dir, tmp_path
):
    from cxr14.metrics import choose_thresholds

    run_quick(trained_run / "best.pth", *(["--sensitivity", sensitivity] if sensitivity else []), "--out", tmp_path)
    saved = json.loads((tmp_path / "thresholds.json").read_text(encoding="utf-8"))
    assert saved["policy"] == (f"sensitivity {sensitivity}" if sensitivity else "youden")
    logits, targets = predict_split(trained_run / "best.pth", learn_dir, "val")
    expected = choose_thresholds(targets.numpy(), torch.sigmoid(logits).numpy(), sensitivity)
    written = np.array([np.nan if saved["thresholds"][f] is None else saved["thresholds"][f] for f in FINDINGS])
    np.testing.assert_allclose(written, expected, rtol=1e-5)  # every finding, from validation (never the test split)
    test_logits, test_targets = predict_split(trained_run / "best.pth", learn_dir, "test")
    on_test = choose_thresholds(test_targets.numpy(), torch.sigmoid(test_logits).numpy(), sensitivity)
    assert not np.allclose(written, on_test, rtol=1e-3, equal_nan=True)  # the test's own would differ
    if sensitivity:
        k = FINDINGS.index("Cardiomegaly")
        predicted = torch.sigmoid(logits[:, k]).numpy() >= written[k] - 1e-6
        assert predicted[targets[:, k].numpy() == 1].mean() >= sensitivity


@pytest.mark.slow  # kept out of the quick suite for its time (about 10-30 s)
def test_tta_averages_five_crops(report, trained_run, tmp_path):
    plain = report  # the same films without TTA
    (tmp_path / "tta").mkdir()
    (tmp_path / "tta" / "localisation.png").write_bytes(b"an earlier evaluation's, with boxes")
    (tmp_path / "tta" / "notes.txt").write_text("the user's own", encoding="utf-8")
    tta = run_quick(trained_run / "best.pth", "--out", tmp_path / "tta", "--tta")
    assert not (tmp_path / "tta" / "localisation.png").exists()  # not of this report: it would be read as its own
    assert (tmp_path / "tta" / "notes.txt").read_text(encoding="utf-8") == "the user's own"
    assert tta["tta"] and tta["images"] == plain["images"]
    assert tta["mean_auroc"] != plain["mean_auroc"] and abs(tta["mean_auroc"] - plain["mean_auroc"]) < 0.1


def test_a_checkpoint_copied_anywhere_evaluates_on_its_own_split(report, trained_run, tmp_path):
    shutil.copy(trained_run / "best.pth", tmp_path / "model.pth")  # no split.csv beside it
    copied = run_quick(tmp_path / "model.pth")
    assert copied["images"] == report["images"] and copied["split_source"] == f"the split of {tmp_path / 'model.pth'}"
    assert copied["mean_auroc"] == pytest.approx(report["mean_auroc"], abs=1e-9)
    assert all(row["threshold"] is not None for row in copied["findings"])  # its validation part came along too


def test_a_split_csv_of_another_run_is_refused(trained_run, tmp_path):
    shutil.copy(trained_run / "best.pth", tmp_path / "best.pth")
    split = pd.read_csv(trained_run / "split.csv")
    split.loc[split.split == "test", "split"] = "train"  # another run's split.csv
    split.to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(SystemExit, match="differs from the split saved in the checkpoint"):
        evaluate.main(["--checkpoint", str(tmp_path / "best.pth"), "--num_workers", "0"])


def test_without_any_split_the_official_list_is_never_substituted(trained_run, learn_dir, tmp_path):
    checkpoint = torch.load(trained_run / "best.pth", weights_only=True)
    del checkpoint["split"]  # as checkpoints were before they carried their split
    torch.save(checkpoint, tmp_path / "old.pth")
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--checkpoint", str(tmp_path / "old.pth"), "--num_workers", "0"])
    assert str(tmp_path / "old.pth") in str(stopped.value) and "test_list.txt" in str(stopped.value)
    official = learn_dir / "test_list.txt"
    result = run_quick(tmp_path / "old.pth", "--test_list", official, "--out", tmp_path / "official")
    assert result["images"] == len(official.read_text(encoding="utf-8").split()) and result["split_source"] == str(
        official
    )
    assert all(row["threshold"] is None for row in result["findings"])  # no validation part: no thresholds


def test_evaluation_reads_the_image_cache_when_one_holds_the_images(
    report, trained_run, learn_dir, tmp_path, monkeypatch
):
    from cache import build_cache
    from cxr14.pixels import FilmImages

    data = tmp_path / "data"
    shutil.copytree(learn_dir, data)
    build_cache(
        data, size=json.loads((trained_run / "config.json").read_text(encoding="utf-8"))["LOAD_SIZE"], workers=1
    )

    def no_png(*args):
        raise AssertionError("a PNG was decoded although the cache holds every image")

    monkeypatch.setattr(FilmImages, "__getitem__", no_png)
    cached = run_quick(trained_run / "best.pth", "--data_dir", data, "--out", tmp_path / "out")
    assert cached["mean_auroc"] == pytest.approx(report["mean_auroc"], abs=1e-9)  # the same pixels


def test_an_interrupted_evaluation_leaves_the_previous_report_whole(report, trained_run, monkeypatch):
    """Ctrl-C during evaluate.py left new thresholds.json, reliability.png and subgroups.* beside the previous
    report.json, and a traceback (25.8). The report is now written aside and moved into place when complete."""
    import evaluate

    folder = trained_run / "evaluation" / "best"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def interrupted(*args):  # Ctrl-C at the report's last file
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "plot_roc_curves", interrupted)
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--checkpoint", str(trained_run / "best.pth"), "--bootstrap", "20", "--boxes", "none"])
    assert str(stopped.value.code).startswith("interrupted: no file of this evaluation was written")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert not list(folder.parent.glob(".*.partial"))  # the temporary folder is gone too


def test_the_checkpoints_own_thresholds_serve_and_the_validation_films_are_predicted_again_only_when_asked(
    trained_run, tmp_path, monkeypatch, capsys
):
    from cxr14 import scoring

    calls, fit = [], scoring.fit_on_validation
    monkeypatch.setattr(scoring, "fit_on_validation", lambda *args, **kw: calls.append(1) or fit(*args, **kw))
    run_quick(trained_run / "best.pth", "--out", tmp_path / "own")
    printed = capsys.readouterr().out
    assert calls == [] and "the checkpoint's own, fitted on its validation split" in printed
    said = ["evaluating ", "the test split:", "scoring ", "out of distribution:", "writing predictions.csv"]
    said.append("subgroups:")
    places = [printed.find(line) for line in said]  # each long section says what it does before it starts
    assert -1 not in places and places == sorted(places), dict(zip(said, places))
    run_quick(trained_run / "best.pth", "--refit", "--out", tmp_path / "refit")
    assert calls == [1]
    own, refit = (
        json.loads((tmp_path / name / "thresholds.json").read_text(encoding="utf-8")) for name in ("own", "refit")
    )
    for finding in FINDINGS:
        assert (own["thresholds"][finding] is None) == (refit["thresholds"][finding] is None), finding
        if own["thresholds"][finding] is not None:
            assert own["thresholds"][finding] == pytest.approx(refit["thresholds"][finding], abs=1e-3), finding
