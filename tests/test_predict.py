import numpy as np
import pandas as pd
import pytest
import torch
from conftest import predict_split

import predict
from dataset import FINDINGS


def test_predicts_images_and_folders_and_skips_unreadable_ones(trained_run, learn_dir, tmp_path, capsys):
    split = pd.read_csv(trained_run / "split.csv")
    names = split.image_name[split.split == "test"].tolist()[:3]
    folder = tmp_path / "films"
    folder.mkdir()
    for name in names[1:]:
        (folder / name).write_bytes(next(learn_dir.rglob(name)).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    predict.main(
        [
            "--checkpoint",
            str(trained_run / "best.pth"),
            str(next(learn_dir.rglob(names[0]))),
            str(folder),
            "--out",
            str(tmp_path / "out"),
            "--no-amp",
        ]
    )
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.png" in printed
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert [p.split("/")[-1].split("\\")[-1] for p in table.image] == names
    # the same numbers as the evaluation path gives for these images
    logits, _ = predict_split(trained_run / "best.pth", learn_dir, "test", amp=False)
    expected = torch.sigmoid(logits[:3]).numpy()
    np.testing.assert_allclose(table[list(FINDINGS)].to_numpy(), expected, atol=1e-4)
    first_block = printed.split(names[0])[1].splitlines()[1:15]
    probabilities = [
        float(line.split()[-1]) if "threshold" not in line else float(line.split()[-3]) for line in first_block
    ]
    assert len(first_block) == 14 and probabilities == sorted(probabilities, reverse=True)


def test_thresholds_mark_findings_and_heat_maps_are_written(trained_run, learn_dir, tmp_path, capsys):
    image = next(learn_dir.rglob("00000002_000.png"))
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text('{"policy": "youden", "thresholds": {"Cardiomegaly": 0.0, "Hernia": 1.1}}')
    predict.main(
        [
            "--checkpoint",
            str(trained_run / "best.pth"),
            str(image),
            "--cam",
            "--top",
            "2",
            "--thresholds",
            str(thresholds),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    printed = capsys.readouterr().out
    marked = [line.split()[1] for line in printed.splitlines() if line.strip().startswith("*")]
    assert marked == ["Cardiomegaly"]
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table.above_threshold[0] == "Cardiomegaly" and table.warnings.isna().all()
    top_two = table[list(FINDINGS)].iloc[0].sort_values(ascending=False).index[:2]
    from PIL import Image

    for finding in top_two:  # drawn on the film at 512 px or more, and saying what it shows
        (path,) = (tmp_path / "out").glob(f"00000002_000_{finding}_*.png")
        overlay = Image.open(path)
        assert overlay.mode == "RGB" and min(overlay.size) >= 512
        assert overlay.text["finding"] == finding and float(overlay.text["probability"]) == pytest.approx(
            table[finding][0], abs=1e-4
        )
        assert overlay.text["threshold"] == ("0.0" if finding == "Cardiomegaly" else "none")
    sheet = Image.open(tmp_path / "out" / "00000002_000_sheet.png")  # the film beside its two maps
    assert sheet.height == 512 and sheet.width > 3 * 512


def test_dicom_without_pydicom_is_a_clear_message(trained_run, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pydicom.pixels", None)
    (tmp_path / "film.dcm").write_bytes(b"DICM")
    with pytest.raises(SystemExit, match="no readable image"):
        predict.main(
            ["--checkpoint", str(trained_run / "best.pth"), str(tmp_path / "film.dcm"), "--out", str(tmp_path / "out")]
        )
    printed = capsys.readouterr().out
    assert "install pydicom" in printed and "requirements-extras.txt" in printed


def test_heat_maps_of_boxed_findings_are_not_empty(trained_run, learn_dir):
    """Grad-CAM of the boxed findings on held-out films that show one: an empty map (every location lowering the
    score) would say the model learnt the finding as missing normal anatomy. Measured: 4 of 340 maps empty."""
    from functools import partial

    from films import eval_view
    from heatmaps import grad_cam, heat_maps
    from images import PngImages, index_images
    from inference import TorchModel

    loaded = TorchModel(trained_run / "best.pth", device="cpu")
    checkpoint, net = loaded.checkpoint, loaded.net
    split = pd.read_csv(trained_run / "split.csv")
    boxes = pd.read_csv(learn_dir / "BBox_List_2017.csv", header=None, skiprows=1, usecols=[0, 1], names=["image", "f"])
    boxes = boxes[boxes.image.isin(split.image_name[split.split == "test"])]
    boxes["f"] = boxes.f.replace("Infiltrate", "Infiltration")
    paths, config = index_images(learn_dir), checkpoint["config"]
    view = partial(eval_view, image_size=config["IMAGE_SIZE"])
    empty = 0
    with grad_cam(net) as cam:
        for name, group in boxes.groupby("image"):
            crop = view(PngImages([paths[name]], config["LOAD_SIZE"])[0])
            maps = heat_maps(cam, crop[None], [FINDINGS.index(finding) for finding in group.f], "cpu")
            empty += sum(heat.max() == 0 for heat in maps)
    print(f"{empty} of {len(boxes)} heat maps empty")
    assert len(boxes) >= 100 and empty <= len(boxes) // 10, f"{empty} of {len(boxes)} heat maps empty"
