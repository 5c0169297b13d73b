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
        ]
    )
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.png" in printed
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert [p.split("/")[-1].split("\\")[-1] for p in table.image] == names
    # the same numbers as the evaluation path gives for these images
    logits, _ = predict_split(trained_run / "best.pth", learn_dir, "test")
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
    assert pd.read_csv(tmp_path / "out" / "predictions.csv").above_threshold[0] == "Cardiomegaly"
    maps = sorted((tmp_path / "out").glob("00000002_000_*.png"))
    assert len(maps) == 2
    from PIL import Image

    assert Image.open(maps[0]).mode == "RGB" and Image.open(maps[0]).size == (64, 64)


def test_dicom_without_pydicom_is_a_clear_message(trained_run, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    (tmp_path / "film.dcm").write_bytes(b"DICM")
    with pytest.raises(SystemExit, match="no readable image"):
        predict.main(
            ["--checkpoint", str(trained_run / "best.pth"), str(tmp_path / "film.dcm"), "--out", str(tmp_path / "out")]
        )
    assert "install pydicom" in capsys.readouterr().out


def test_heat_maps_of_the_drawn_lesions_are_not_empty(trained_run, learn_dir):
    """Grad-CAM of Mass/Nodule on held-out films that show one. Measured: 0 of 67 maps empty; with the head's
    bias started at 0 instead of the base rate (model.init_head_bias), 67 of 67 were (tests/test_heat_maps.py
    checks where the peaks fall, at 128 px)."""
    from PIL import Image
    from pytorch_grad_cam import GradCAM

    from dataset import index_images, load_image
    from model import load_checkpoint, model_from_checkpoint
    from transforms import eval_transform

    checkpoint = load_checkpoint(trained_run / "epoch_04.pth", FINDINGS)
    net = model_from_checkpoint(checkpoint).eval()
    split = pd.read_csv(trained_run / "split.csv")
    labels = pd.read_csv(learn_dir / "Data_Entry_2017_v2020.csv").set_index("Image Index")["Finding Labels"]
    paths, transform = index_images(learn_dir), eval_transform(checkpoint["config"]["IMAGE_SIZE"])
    empty = total = 0
    with GradCAM(model=net, target_layers=[net.layer4[-1]]) as cam:
        for name in split.image_name[split.split == "test"]:
            for finding in set(labels[name].split("|")) & {"Mass", "Nodule"}:
                image = transform(Image.fromarray(load_image(paths[name], checkpoint["config"]["LOAD_SIZE"])))
                empty += predict.heat_map(cam, image, FINDINGS.index(finding), "cpu").max() == 0
                total += 1
    assert total >= 40 and empty <= total // 4, f"{empty} of {total} heat maps empty"
