"""inference.py: decisions at a threshold, and raw scores when calibration is turned off."""

import numpy as np
import pandas as pd

import predict
from inference import TorchModel, at_or_above


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
