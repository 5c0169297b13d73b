"""checkpoints.py: every shape of checkpoint this project has written loads, evaluates, predicts and resumes through
one upgrade to today's format (FORMAT); a newer format is refused, naming the file."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
import export
import predict
from cxr14.checkpoints import ADDED_SINCE, ADDED_WITH_TIMM, FORMAT, load_checkpoint, save_checkpoint
from cxr14.errors import CheckpointError
from cxr14.films import prepare
from cxr14.inference import TorchModel
from cxr14.onnx_model import OnnxModel
from dataset import FINDINGS
from helpers import assert_same_weights, run, tiny_settings, weights


def before_backbone(checkpoint):
    """Before BACKBONE: the network's name under "architecture", and no BACKBONE in the config."""
    checkpoint["architecture"] = checkpoint.pop("backbone")
    del checkpoint["config"]["BACKBONE"]


def before_dataset(checkpoint):
    """Before DATASET (and UNCERTAIN, DATASET_WEIGHTS, CUDA_GRAPHS): NIH alone."""
    for name in ("DATASET", "UNCERTAIN", "DATASET_WEIGHTS", "CUDA_GRAPHS"):
        del checkpoint["config"][name]


def before_ood_features(checkpoint):
    """Before the OOD features held the third block's halves: statistics of the head's 2048 features alone."""
    ood = dict(checkpoint["inference"]["ood"])
    ood["mean"], ood["components"] = ood["mean"][:2048], ood["components"][:, :2048]
    checkpoint["inference"] = {**checkpoint["inference"], "ood": ood}


def before_split(checkpoint):
    """The oldest: no split record, the split.csv beside the checkpoint holds it."""
    del checkpoint["split"]


SHAPES = [before_backbone, before_dataset, before_ood_features, before_split]


def format_1(source, folder, *shapes):
    """A copy of the run folder's checkpoint `source` in format 1 (no "format" key), in the given older shapes,
    written in `folder` beside the run's split.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source.parent / "split.csv", folder / "split.csv")
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    assert checkpoint.pop("format") == FORMAT  # what save_checkpoint writes today
    for shape in shapes:
        shape(checkpoint)
    path = folder / source.name
    torch.save(checkpoint, path)
    return path


def crops_of(learn_dir, model, count=4):
    films = sorted(learn_dir.rglob("*.png"))[:count]
    return np.stack([prepare(film, model.load_size, model.image_size).crop for film in films])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_each_older_shape_loads_in_todays_format_and_predicts_the_same(trained_run, learn_dir, tmp_path, shape, capsys):
    path = format_1(trained_run / "best.pth", tmp_path / "old", shape)
    loaded = load_checkpoint(path, FINDINGS)
    today = load_checkpoint(trained_run / "best.pth", FINDINGS)
    assert loaded["format"] == FORMAT and loaded["backbone"] == today["backbone"] == "resnet50"
    assert "architecture" not in loaded and set(ADDED_SINCE) <= set(loaded["config"])
    assert {name: loaded["config"][name] for name in ADDED_SINCE} == {
        name: today["config"][name] for name in ADDED_SINCE
    }
    assert loaded["split"]["image_names"] == today["split"]["image_names"]
    assert torch.equal(loaded["split"]["codes"], today["split"]["codes"])
    old, new = TorchModel(path, device="cpu"), TorchModel(trained_run / "best.pth", device="cpu")
    crops = crops_of(learn_dir, new)
    np.testing.assert_array_equal(old.predict(crops).probabilities, new.predict(crops).probabilities)
    if shape is before_ood_features:
        assert old.statistics.ood is None and "fitted on features of an older version" in capsys.readouterr().out
    else:
        assert len(old.statistics.ood["mean"]) == len(new.statistics.ood["mean"])


def test_a_format_2_checkpoint_gets_the_settings_timm_brought_at_the_values_its_run_had(
    trained_run, learn_dir, tmp_path
):
    """Before timm's networks (format 2): no LAYER_DECAY, DROP_PATH, POOLING and no timm record; upgraded to the
    values every such run trained with (today's run of torchvision's ResNet-50 has them too), predicting the same."""
    checkpoint = torch.load(trained_run / "best.pth", map_location="cpu", weights_only=True)
    checkpoint["format"] = 2
    del checkpoint["timm"]
    for name in ADDED_WITH_TIMM:
        del checkpoint["config"][name]
    (tmp_path / "old").mkdir()
    shutil.copy(trained_run / "split.csv", tmp_path / "old" / "split.csv")
    torch.save(checkpoint, tmp_path / "old" / "best.pth")
    loaded = load_checkpoint(tmp_path / "old" / "best.pth", FINDINGS)
    today = load_checkpoint(trained_run / "best.pth", FINDINGS)
    assert loaded["format"] == FORMAT and today["timm"] is None
    assert {name: loaded["config"][name] for name in ADDED_WITH_TIMM} == {
        name: today["config"][name] for name in ADDED_WITH_TIMM
    }
    old, new = (
        TorchModel(tmp_path / "old" / "best.pth", device="cpu"),
        TorchModel(trained_run / "best.pth", device="cpu"),
    )
    crops = crops_of(learn_dir, new)
    np.testing.assert_array_equal(old.predict(crops).probabilities, new.predict(crops).probabilities)


@pytest.mark.slow  # an evaluation, an OOD refit and an export: about 40 s on 2 cores
def test_the_oldest_checkpoint_evaluates_predicts_and_exports(trained_run, learn_dir, tmp_path):
    path = format_1(trained_run / "best.pth", tmp_path / "old", *SHAPES)
    arguments = ["--checkpoint", str(path), "--bootstrap", "50", "--num_workers", "0", "--boxes", "none"]
    report = evaluate.evaluate(evaluate.parse_args([*arguments, "--out", str(tmp_path / "evaluation")]))
    assert report["ood"]["films"] > 0  # refitted, and stored in the checkpoint: now of today's width
    assert len(load_checkpoint(path, FINDINGS)["inference"]["ood"]["mean"]) == 4096
    film = sorted(learn_dir.rglob("*.png"))[0]
    predict.main(["--checkpoint", str(path), str(film), "--out", str(tmp_path / "predictions")])
    table = pd.read_csv(tmp_path / "predictions" / "predictions.csv")
    assert len(table) == 1 and table.ood_percentile.notna().all()  # the refitted OOD statistics are in use
    export.main(["--checkpoint", str(path), "--out", str(tmp_path / "model.onnx")])
    crops = crops_of(learn_dir, TorchModel(path, device="cpu"))
    exported = OnnxModel(tmp_path / "model.onnx").predict(crops).probabilities
    expected = TorchModel(path, device="cpu", amp=False).predict(crops).probabilities
    np.testing.assert_allclose(exported, expected, atol=1e-4)


@pytest.mark.slow  # two short runs and two resumes: about 40 s on 2 cores
def test_an_older_checkpoint_resumes_exactly(demo_dir, tmp_path):
    """A run stopped after its first epoch in format 1 ends with the weights of the same run resumed in today's."""
    assert run(tiny_settings(demo_dir, tmp_path / "today", epochs=1)) == 0
    shutil.copytree(tmp_path / "today", tmp_path / "old")
    format_1(tmp_path / "today" / "epoch_01.pth", tmp_path / "old", before_backbone, before_dataset, before_split)
    for name in ("today", "old"):
        assert run(tiny_settings(demo_dir, tmp_path / name, epochs=2, resume="last")) == 0
    assert load_checkpoint(tmp_path / "old" / "epoch_02.pth", FINDINGS)["format"] == FORMAT
    assert_same_weights(weights(tmp_path / "today" / "epoch_02.pth"), weights(tmp_path / "old" / "epoch_02.pth"))


def test_a_newer_format_is_refused_naming_the_file(tmp_path):
    save_checkpoint({"model": {}, "config": {}, "findings": list(FINDINGS), "backbone": "resnet50"}, tmp_path / "a.pth")
    checkpoint = torch.load(tmp_path / "a.pth", map_location="cpu", weights_only=True)
    assert checkpoint["format"] == FORMAT
    torch.save({**checkpoint, "format": FORMAT + 1}, tmp_path / "newer.pth")
    with pytest.raises(CheckpointError, match=rf"newer.pth was written by a newer version .*format {FORMAT + 1}"):
        load_checkpoint(tmp_path / "newer.pth", FINDINGS)
