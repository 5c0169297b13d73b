import numpy as np
import pandas as pd
import pytest
import torch

import predict
from cxr14.checkpoints import load_checkpoint
from dataset import FINDINGS
from helpers import predict_split


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
    # the same numbers as the evaluation path gives for these images: raw, and through the run's calibration
    logits, _ = predict_split(trained_run / "best.pth", learn_dir, "test", amp=False)
    expected = torch.sigmoid(logits[:3]).numpy()
    np.testing.assert_allclose(table[[f"raw_{finding}" for finding in FINDINGS]].to_numpy(), expected, atol=1e-4)
    slopes, intercepts = (
        part.numpy() for part in load_checkpoint(trained_run / "best.pth", FINDINGS)["inference"]["calibration"]
    )
    calibrated = 1 / (1 + np.exp(-(logits[:3].numpy() * slopes + intercepts)))
    np.testing.assert_allclose(table[list(FINDINGS)].to_numpy(), calibrated, atol=1e-4)
    assert table.ood_percentile.between(0, 100).all()
    first_block = printed.split(names[0])[1].splitlines()[1:15]
    probabilities = [
        float(line.split()[-1]) if "threshold" not in line else float(line.split()[-3]) for line in first_block
    ]
    assert len(first_block) == 14 and probabilities == sorted(probabilities, reverse=True)


def test_thresholds_mark_findings_and_heat_maps_are_written(trained_run, learn_dir, tmp_path, capsys):
    image = next(learn_dir.rglob("00000002_000.png"))
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text('{"policy": "youden", "thresholds": {"Cardiomegaly": 0.0, "Hernia": 1.1}}', encoding="utf-8")
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
    score) would say the model learnt the finding as missing normal anatomy. Measured: 4 of all 340 test-split maps
    empty."""
    from functools import partial

    from cxr14.films import eval_crop
    from cxr14.heat_maps import finding_masks
    from cxr14.inference import TorchModel
    from cxr14.pixels import FilmImages, index_images

    loaded = TorchModel(trained_run / "best.pth", device="cpu")
    checkpoint, net = loaded.checkpoint, loaded.net
    split = pd.read_csv(trained_run / "split.csv")
    boxes = pd.read_csv(learn_dir / "BBox_List_2017.csv", header=None, skiprows=1, usecols=[0, 1], names=["image", "f"])
    boxes = boxes[boxes.image.isin(split.image_name[split.split == "test"])]
    boxes["f"] = boxes.f.replace("Infiltrate", "Infiltration")
    boxes = boxes.iloc[:120]  # enough to count empty maps; all 340 take 25 s on 2 cores
    paths, config = index_images(learn_dir), checkpoint["config"]
    view = partial(eval_crop, image_size=config["IMAGE_SIZE"])
    empty = 0
    for name, group in boxes.groupby("image"):
        crop = view(FilmImages([paths[name]], config["LOAD_SIZE"])[0])
        maps = finding_masks(net, crop[None], [FINDINGS.index(finding) for finding in group.f], "cpu")
        empty += sum(heat.max() == 0 for heat in maps)
    print(f"{empty} of {len(boxes)} heat maps empty")
    assert len(boxes) >= 100 and empty <= len(boxes) // 10, f"{empty} of {len(boxes)} heat maps empty"


def test_films_of_one_name_in_two_folders_get_their_own_rows_and_heat_maps(trained_run, learn_dir, tmp_path):
    """Hospital exports name every film IM0001: a/x.png and a/sub/x.png must not overwrite each other's files."""
    films = sorted(learn_dir.rglob("*.png"))[:2]
    first, second = tmp_path / "a" / "IM0001.png", tmp_path / "a" / "sub" / "IM0001.png"
    for film, target in zip(films, (first, second)):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(film.read_bytes())
    out = tmp_path / "out"
    arguments = ["--checkpoint", str(trained_run / "best.pth"), str(tmp_path / "a"), "--cam", "--top", "1"]
    predict.main([*arguments, "--out", str(out), "--no-amp"])
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(table.image.str.replace("\\", "/")) == ["a/IM0001.png", "a/sub/IM0001.png"]
    assert not np.allclose(table[list(FINDINGS)].iloc[0], table[list(FINDINGS)].iloc[1])  # two films, two rows
    sheets = sorted(path.name for path in out.glob("*_sheet.png"))
    assert sheets == ["a__IM0001_sheet.png", "sub__IM0001_sheet.png"] and len(list(out.glob("*IM0001_*_*.png"))) == 2


def test_file_stems_are_unique_whatever_the_paths():
    assert predict.file_stems(["x/a.png", "y/b.png"]) == ["a", "b"]
    assert predict.file_stems(["a/IM1.dcm", "a/sub/IM1.dcm", "b/sub/IM1.dcm"]) == [
        "a__IM1",
        "a__sub__IM1",
        "b__sub__IM1",
    ]
    assert predict.file_stems(["IM1.png", "IM1.png"]) == ["IM1", "IM1_2"]


@pytest.mark.parametrize(
    "case, said",
    [
        ("broken thresholds", "is not a thresholds file of evaluate.py"),
        ("missing thresholds", "thresholds file not found"),
        ("missing onnx", "ONNX model not found"),
        ("text as onnx", "is not an ONNX model"),
    ],
)
def test_bad_model_and_threshold_files_are_one_line(case, said, trained_run, learn_dir, tmp_path):
    film = str(next(learn_dir.rglob("00000002_000.png")))
    (tmp_path / "broken.json").write_text('{"thresholds": {"Cardiomegaly": 0.3,', encoding="utf-8")  # cut short
    (tmp_path / "model.onnx").write_text("not a model", encoding="utf-8")
    source = {
        "broken thresholds": [
            "--checkpoint",
            str(trained_run / "best.pth"),
            "--thresholds",
            str(tmp_path / "broken.json"),
        ],
        "missing thresholds": [
            "--checkpoint",
            str(trained_run / "best.pth"),
            "--thresholds",
            str(tmp_path / "no.json"),
        ],
        "missing onnx": ["--onnx", str(tmp_path / "missing.onnx")],
        "text as onnx": ["--onnx", str(tmp_path / "model.onnx")],
    }[case]
    with pytest.raises(SystemExit) as stopped:
        predict.main([*source, film, "--out", str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and said in message and "\n" not in message
    assert "weights_only" not in message and not (tmp_path / "out").exists()


def test_top_zero_is_refused_and_more_than_the_findings_says_how_many_it_draws(
    trained_run, learn_dir, tmp_path, capsys
):
    film = str(next(learn_dir.rglob("00000002_000.png")))
    arguments = ["--checkpoint", str(trained_run / "best.pth"), film, "--cam", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stopped:
        predict.main([*arguments, "--top", "0"])
    assert stopped.value.code == 2 and "--top: '0': it must be a whole number of at least 1" in capsys.readouterr().err
    predict.main([*arguments, "--top", "99"])
    assert "--top 99: the model has 14 findings; drawing 14 per film" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("00000002_000_*_*.png"))) == 14


def test_an_empty_folder_is_said_to_hold_no_films(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:
        predict.main(["--checkpoint", str(tmp_path / "never_loaded.pth"), str(tmp_path / "empty")])
    assert "no film found among the inputs" in str(stopped.value.code)
    assert f"skipped {tmp_path / 'empty'}: no films in this folder" in capsys.readouterr().out
