import json

import numpy as np
import pytest

import compute_pos_weight
from dataset import FINDINGS
from helpers import SAMPLE_CSV

NIH_POSITIVES = {  # full-release positives per finding (../shared/nih/README.md), 112,120 images
    "Atelectasis": 11559,
    "Cardiomegaly": 2776,
    "Effusion": 13317,
    "Infiltration": 19894,
    "Mass": 5782,
    "Nodule": 6331,
    "Pneumonia": 1431,
    "Pneumothorax": 5302,
    "Consolidation": 4667,
    "Edema": 2303,
    "Emphysema": 2516,
    "Fibrosis": 1686,
    "Pleural_Thickening": 3385,
    "Hernia": 227,
}


def test_full_release_counts_give_the_published_pos_weights(tmp_path, capsys):
    """A label file with the full release's positive counts (the real file is 45 GB away) prints its numbers."""
    rows = 112_120
    rng = np.random.default_rng(0)
    labelled = {finding: set(rng.choice(rows, count, replace=False)) for finding, count in NIH_POSITIVES.items()}
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    for row in range(rows):
        found = "|".join(finding for finding in FINDINGS if row in labelled[finding]) or "No Finding"
        lines.append(f"{row + 1:08d}_000.png,{found},0,{row + 1}")
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    compute_pos_weight.main(["--csv", str(tmp_path / "Data_Entry_2017_v2020.csv"), "--out", str(tmp_path / "w.json")])
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert table["Hernia"] == ["227", "111,893", "0.20%", "492.92"]
    assert table["Infiltration"][0] == "19,894" and table["Infiltration"][3] == f"{(rows - 19894) / 19894:.2f}"
    weights = json.loads((tmp_path / "w.json").read_text(encoding="utf-8"))
    assert list(weights) == list(FINDINGS) and weights["Hernia"] == pytest.approx(111893 / 227, abs=1e-6)


def test_train_list_restricts_the_rows(tmp_path, capsys):
    names = [
        line.split(",")[0] for line in SAMPLE_CSV.read_text(encoding="utf-8").splitlines()[1:4]
    ]  # patient 1: Cardiomegaly x3
    (tmp_path / "train.txt").write_text("\n".join(names), encoding="utf-8")
    with pytest.warns(UserWarning, match="no positive example of Atelectasis, .*cannot be learned from this split"):
        compute_pos_weight.main(["--csv", str(SAMPLE_CSV), "--train-list", str(tmp_path / "train.txt")])
    out = capsys.readouterr().out
    assert "3 images, 1 patients" in out
    assert [line for line in out.splitlines() if line.startswith("Cardiomegaly")][0].split()[1:3] == ["3", "0"]
    (tmp_path / "bad.txt").write_text("99999999_000.png\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="99999999_000.png"):
        compute_pos_weight.main(["--csv", str(SAMPLE_CSV), "--train-list", str(tmp_path / "bad.txt")])
