"""inference.py: decisions at a threshold, and raw scores when calibration is turned off."""

import numpy as np
import pandas as pd
import pytest

import predict
from cxr14.errors import DataError
from cxr14.inference import TorchModel
from cxr14.statistics import at_or_above, statistics_of


def test_a_probability_exactly_at_its_threshold_is_called_positive():
    called = at_or_above(np.array([[0.5, 0.5, 0.3], [0.51, 0.49, 0.9]]), ["A", "B", "C"], {"A": 0.5, "B": 0.5})
    np.testing.assert_array_equal(called, [[True, True, False], [True, False, False]])  # C has no threshold


def test_uncalibrated_gives_the_networks_raw_probabilities(trained_run, learn_dir, tmp_path):
    films = [str(path) for path in sorted((learn_dir / "images_001" / "images").glob("*.png"))[:4]]
    model = TorchModel(trained_run / "best.pth", device="cpu", amp=False)
    assert model.calibrated and model.statistics.calibration is not None
    tables = {}
    for name, extra in (("calibrated", []), ("raw", ["--uncalibrated"])):
        out = tmp_path / name
        predict.main(["--checkpoint", str(trained_run / "best.pth"), *films, "--out", str(out), "--no-amp", *extra])
        tables[name] = pd.read_csv(out / "predictions.csv")
    findings, raw = model.findings, tables["raw"]
    np.testing.assert_allclose(raw[findings].to_numpy(), raw[[f"raw_{f}" for f in findings]].to_numpy())
    np.testing.assert_allclose(raw[findings].to_numpy(), tables["calibrated"][[f"raw_{f}" for f in findings]])
    assert np.abs(raw[findings].to_numpy() - tables["calibrated"][findings].to_numpy()).max() > 0.01
    uncalibrated = TorchModel(trained_run / "best.pth", device="cpu", amp=False, calibrated=False)
    shown = uncalibrated.thresholds
    assert all(shown[f] == uncalibrated.statistics.thresholds[f] for f in shown)  # thresholds on the raw scale too


def test_a_finding_left_raw_is_named_where_probabilities_are_called_calibrated(
    trained_run, learn_dir, tmp_path, capsys
):
    """predict.py said "probabilities: calibrated" and the ONNX metadata calibrated=true while some findings' numbers
    were raw (25.5). They are now named in predict.py, on the page, in the ONNX metadata and in report.json."""
    import shutil

    import torch

    import app
    from cxr14 import calibration
    from export import metadata

    checkpoint = tmp_path / "best.pth"
    shutil.copy(trained_run / "best.pth", checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    slopes, intercepts = state["inference"]["calibration"]
    hernia = list(state["findings"]).index("Hernia")
    slopes[hernia], intercepts[hernia] = 1.0, 0.0  # what fit_platt leaves for a finding it cannot fit
    torch.save(state, checkpoint)
    model = TorchModel(checkpoint, device="cpu", amp=False)
    assert model.left_raw == ["Hernia"] and TorchModel(trained_run / "best.pth", device="cpu").left_raw == []
    film = str(sorted((learn_dir / "images_001" / "images").glob("*.png"))[0])
    predict.main(["--checkpoint", str(checkpoint), film, "--out", str(tmp_path / "out"), "--no-amp"])
    assert f"probabilities: calibrated, except Hernia ({calibration.LEFT_RAW})" in capsys.readouterr().out
    assert metadata(model, {})["left_raw"] == '["Hernia"]'
    assert app.scale_text(model).endswith(f"Except Hernia: {calibration.LEFT_RAW}.")


def test_each_checkpoint_has_its_own_evaluation_and_thresholds_of_another_are_never_used(trained_run, tmp_path, capsys):
    """Evaluating epoch_01.pth must not change what best.pth predicts (25.1): own folders, thresholds by hash."""
    import json
    import shutil

    import evaluate

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pth", "split.csv"):
        shutil.copy(trained_run / name, run / name)
    import torch

    epoch_01 = torch.load(trained_run / "epoch_01.pth", weights_only=True)
    epoch_01["inference"] = torch.load(run / "best.pth", weights_only=True)[
        "inference"
    ]  # no OOD refit: not tested here
    torch.save(epoch_01, run / "epoch_01.pth")
    quick = ["--bootstrap", "10", "--num_workers", "0", "--boxes", "none"]
    evaluate.main(["--checkpoint", str(run / "best.pth"), *quick])
    best = TorchModel(run / "best.pth", device="cpu")
    before = dict(best.thresholds)
    evaluate.main(["--checkpoint", str(run / "epoch_01.pth"), *quick])
    assert (run / "evaluation" / "best" / "thresholds.json").is_file()
    assert (run / "evaluation" / "epoch_01" / "thresholds.json").is_file()
    assert TorchModel(run / "best.pth", device="cpu").thresholds == before
    owner = json.loads((run / "evaluation" / "epoch_01" / "thresholds.json").read_text(encoding="utf-8"))[
        "checkpoint_sha256"
    ]
    assert owner == evaluate.checkpoint_sha256(run / "epoch_01.pth")
    with pytest.raises(DataError, match="fitted for another checkpoint"):  # given by hand: refused
        TorchModel(run / "best.pth", device="cpu", thresholds=run / "evaluation" / "epoch_01" / "thresholds.json")
    shutil.copy(run / "epoch_01.pth", run / "best.pth")  # best.pth replaced after its evaluation: warned, ignored
    capsys.readouterr()
    replaced = TorchModel(run / "best.pth", device="cpu")
    assert "fitted for another checkpoint" in capsys.readouterr().out
    assert replaced.statistics.thresholds == statistics_of(replaced.checkpoint).thresholds


def test_a_thresholds_file_without_a_usable_threshold_is_an_error_not_a_silent_fallback(trained_run, tmp_path):
    import json

    empty = tmp_path / "thresholds.json"
    empty.write_text(
        json.dumps({"policy": "sensitivity 1.5", "thresholds": {"Hernia": None, "Mass": None}}), encoding="utf-8"
    )
    with pytest.raises(DataError, match="no usable threshold"):
        TorchModel(trained_run / "best.pth", device="cpu", thresholds=empty)


def test_bf16_inference_on_a_cpu_stays_close_to_fp32(trained_run, learn_dir):
    """What predict.py, the page and evaluate.py run on a CPU with native bf16 (autocast), against fp32, on the
    trained demo model's held-out test films: forced to bf16 here whatever CPU runs the test."""
    import torch

    from cxr14.films import eval_crop, load_image
    from cxr14.inference import crop_probabilities
    from cxr14.metrics import auroc_per_finding
    from dataset import FINDINGS, run_split, split_rows

    model = TorchModel(trained_run / "best.pth", device="cpu", amp=False)
    rows = split_rows(*run_split(model.checkpoint, trained_run / "best.pth"), learn_dir, "", ["test"])[0]["test"]
    crops = np.stack([eval_crop(load_image(path, model.load_size), model.image_size) for path in rows.path])
    fp32 = crop_probabilities(model.net, crops, torch.device("cpu"))
    bf16 = crop_probabilities(model.net, crops, torch.device("cpu"), torch.bfloat16)
    assert 0 < np.abs(fp32 - bf16).max() <= 0.02  # it did run in bf16, and moved no probability far
    targets = rows[list(FINDINGS)].to_numpy(dtype=float)
    assert np.abs(auroc_per_finding(targets, fp32) - auroc_per_finding(targets, bf16)).max() <= 0.002
