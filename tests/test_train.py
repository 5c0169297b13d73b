import json
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

import train
from cxr14.checkpoints import load_checkpoint
from cxr14.cuda_graphs import GraphedStep
from cxr14.loop import model_input
from cxr14.metrics import auroc_per_finding
from dataset import FINDINGS
from helpers import assert_same_weights, predict_split, run, weights
from helpers import tiny_settings as tiny


@pytest.fixture(scope="module")
def straight_run(demo_dir, tmp_path_factory):
    """Two epochs without interruption: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    assert run(tiny(demo_dir, out)) == 0
    return out


def test_missing_dataset_says_how_to_get_one(tmp_path):
    message = run(tiny(tmp_path / "nothing", tmp_path / "out"))
    assert "Data_Entry_2017" in message and "demo_data.py" in message and "docs/data.md" in message
    assert not (tmp_path / "out").exists()  # a failed start leaves no run folder behind


def test_run_writes_checkpoints_metrics_split_and_plot(straight_run, demo_dir, capsys):
    names = {path.name for path in straight_run.iterdir()}
    assert {
        "epoch_01.pth",
        "epoch_02.pth",
        "best.pth",
        "best_auroc.pth",
        "metrics.csv",
        "split.csv",
        "config.json",
        "pos_weight.json",
        "training_curves.png",
    } <= names
    assert not [name for name in names if name.endswith(".tmp")]
    metrics = pd.read_csv(straight_run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2] and {f"auroc_{f}" for f in FINDINGS} <= set(metrics.columns)
    best = load_checkpoint(straight_run / "best.pth", FINDINGS)
    assert best["epoch"] == metrics["epoch"][metrics["val_loss"].idxmin()]
    best_auroc = load_checkpoint(straight_run / "best_auroc.pth", FINDINGS)
    assert best_auroc["epoch"] == metrics["epoch"][metrics["val_mean_auroc"].idxmax()]
    split = pd.read_csv(straight_run / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    train_rows = split.image_name[split.split == "train"]
    labels = pd.read_csv(demo_dir / "Data_Entry_2017_v2020.csv").set_index("Image Index").loc[train_rows]
    hernia_positives = labels["Finding Labels"].str.contains("Effusion").sum()
    pos_weight = json.loads(
        (straight_run / "pos_weight.json").read_text(encoding="utf-8")
    )  # from the training split only
    assert pos_weight["Effusion"] == pytest.approx((len(train_rows) - hernia_positives) / hernia_positives)


def test_a_finished_run_is_not_overwritten(straight_run, demo_dir):
    assert "--resume last" in run(tiny(demo_dir, straight_run))


def test_resume_at_an_epoch_boundary_equals_an_uninterrupted_run(straight_run, demo_dir, tmp_path):
    assert run(tiny(demo_dir, tmp_path, epochs=1)) == 0
    assert run(tiny(demo_dir, tmp_path, epochs=2, resume="last")) == 0
    assert_same_weights(weights(straight_run / "epoch_02.pth"), weights(tmp_path / "epoch_02.pth"))
    message = run(tiny(demo_dir, tmp_path, epochs=3, resume="last", image_size=48))
    assert "image_size 32 -> 48" in message and "config.json" in message
    straight, resumed = pd.read_csv(straight_run / "metrics.csv"), pd.read_csv(tmp_path / "metrics.csv")
    np.testing.assert_allclose(straight["val_loss"], resumed["val_loss"], rtol=1e-5)


def test_older_epochs_keep_the_model_alone_and_a_resume_from_one_says_which_file_to_use(
    straight_run, demo_dir, tmp_path
):
    from cxr14.run_folder import TRAINING_STATE

    older, newest = (load_checkpoint(straight_run / f"epoch_0{n}.pth", FINDINGS) for n in (1, 2))
    assert not any(name in older for name in TRAINING_STATE) and all(name in newest for name in TRAINING_STATE)
    assert (straight_run / "epoch_01.pth").stat().st_size < 0.7 * (straight_run / "epoch_02.pth").stat().st_size
    best = load_checkpoint(straight_run / "best.pth", FINDINGS)  # for inference: the model and its statistics
    assert "inference" in best and not any(name in best for name in TRAINING_STATE)
    same_epoch = best["epoch"] == load_checkpoint(straight_run / "best_auroc.pth", FINDINGS)["epoch"]
    assert (straight_run / "best.pth").samefile(straight_run / "best_auroc.pth") == same_epoch  # one file, two names
    message = run(tiny(demo_dir, tmp_path / "branch", epochs=3, resume=straight_run / "epoch_01.pth"))
    assert "keeps the model alone" in message and str(straight_run / "epoch_02.pth") in message
    assert "KEEP_TRAINING_STATE" in message and not (tmp_path / "branch").exists()


RUN_DEFINING_CHANGES = {  # another valid value of each setting that defines a run (tiny() gives the first)
    "DATASET": "chexpert",
    "UNCERTAIN": "ones",
    "DATASET_WEIGHTS": "1",
    "BACKBONE": "densenet121",
    "IMAGE_SIZE": 36,
    "LOAD_SIZE": 48,
    "BATCH_SIZE": 8,
    "TRAINABLE_LAYERS": "all",
    "DROPOUT": 0.25,
    "DROP_PATH": 0.1,
    "POOLING": "token",
    "LAYER_DECAY": 0.5,
    "POS_WEIGHT": "sqrt",
    "POS_WEIGHT_CAP": 5.0,
    "SEED": 7,
}


# settings that torchvision's ResNet-50 (the straight run's) refuses outright: changed with a network that takes them
VIT = {"backbone": "eva_x_tiny", "trainable_layers": "all"}
NEEDS_ANOTHER_NETWORK = {"DROP_PATH": VIT, "POOLING": VIT}


@pytest.mark.parametrize("name", sorted(RUN_DEFINING_CHANGES))
def test_a_resume_with_another_run_defining_setting_is_refused_before_writing(name, straight_run, demo_dir, tmp_path):
    from cxr14.run_folder import RUN_DEFINING

    assert set(RUN_DEFINING_CHANGES) == set(RUN_DEFINING)  # a setting added there is tested here
    branch = tmp_path / "branch"
    changed = {name.lower(): RUN_DEFINING_CHANGES[name], **NEEDS_ANOTHER_NETWORK.get(name, {})}
    message = run(tiny(demo_dir, branch, epochs=3, resume=straight_run / "epoch_02.pth", **changed))
    assert f"{name.lower()} " in message and "other settings" in message and "config.json" in message
    assert not branch.exists()


def test_sigterm_mid_epoch_saves_a_state_that_resumes_exactly(straight_run, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("cxr14.loop.SYNC_EVERY", 2)  # the loop reads the device, and sees the request, every 2 steps
    interrupt_at_step(monkeypatch, 3)  # during the third training step of epoch 1
    assert run(tiny(demo_dir, tmp_path)) == 128 + signal.SIGTERM
    state = load_checkpoint(tmp_path / "interrupted.pth", FINDINGS)
    assert state["position"] == {"epoch": 1, "step": 4} and not (tmp_path / "epoch_01.pth").exists()
    monkeypatch.undo()
    assert run(tiny(demo_dir, tmp_path, resume="last")) == 0
    assert_same_weights(weights(straight_run / "epoch_02.pth"), weights(tmp_path / "epoch_02.pth"))
    assert not (tmp_path / "interrupted.pth").exists()


def test_graphed_steps_train_as_eager_ones_and_stop_and_resume_exactly(straight_run, demo_dir, tmp_path, monkeypatch):
    """CUDA_GRAPHS, allowed on this CPU: every step goes through cuda_graphs.GraphedStep's static buffers and device
    learning rate (the path a captured graph replays, nothing captured here); a SIGTERM is honoured within
    SYNC_EVERY steps, and the run resumed with graphs ends with the uninterrupted eager run's weights."""
    calls = []

    class CountedStep(GraphedStep):
        def __call__(self, *tensors):
            calls.append(1)
            return super().__call__(*tensors)

    monkeypatch.setattr("cxr14.loop.graph_support", lambda device, world_size, dtype: (True, ""))
    monkeypatch.setattr("cxr14.loop.GraphedStep", CountedStep)
    monkeypatch.setattr("cxr14.loop.SYNC_EVERY", 2)
    eager_input = model_input
    interrupt_at_step(monkeypatch, 3)
    assert run(tiny(demo_dir, tmp_path, cuda_graphs="true")) == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "interrupted.pth", FINDINGS)["position"] == {"epoch": 1, "step": 4}
    assert len(calls) == 4
    monkeypatch.setattr("cxr14.loop.model_input", eager_input)
    assert run(tiny(demo_dir, tmp_path, cuda_graphs="true", resume="last")) == 0
    split = pd.read_csv(straight_run / "split.csv")
    assert len(calls) == 2 * ((split.split == "train").sum() // 16)  # every step of both runs (2 epochs, batch 16)
    assert_same_weights(weights(straight_run / "epoch_02.pth"), weights(tmp_path / "epoch_02.pth"))


def interrupt_at_step(monkeypatch, step):
    """Send this process a SIGTERM while the training loop prepares its `step`-th batch."""
    calls = []
    train_input = model_input

    def input_then_signal(*args):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_input(*args)

    monkeypatch.setattr("cxr14.loop.model_input", input_then_signal)


@pytest.mark.slow  # three runs: about 15 s on 2 cores
@pytest.mark.parametrize("cuda_graphs", ["false", "true"])  # the resumed run's: the learning rate as a device tensor
def test_warmup_and_cosine_schedule_resume_exactly_mid_epoch(demo_dir, tmp_path, monkeypatch, cuda_graphs):
    cosine = {"lr_schedule": "cosine", "warmup_epochs": 0.5, "epochs": 2}
    assert run(tiny(demo_dir, tmp_path / "straight", **cosine)) == 0
    rates = pd.read_csv(tmp_path / "straight" / "metrics.csv")["lr"]
    assert rates[0] > rates[1] == 0  # decaying after the warmup, reaching 0 after the last step
    monkeypatch.setattr("cxr14.loop.graph_support", lambda device, world_size, dtype: (True, ""))  # allowed on the CPU
    eager_input = model_input
    interrupt_at_step(monkeypatch, 4)
    assert run(tiny(demo_dir, tmp_path / "resumed", **cosine, cuda_graphs=cuda_graphs)) == 128 + signal.SIGTERM
    monkeypatch.setattr("cxr14.loop.model_input", eager_input)
    assert run(tiny(demo_dir, tmp_path / "resumed", **cosine, cuda_graphs=cuda_graphs, resume="last")) == 0
    assert_same_weights(weights(tmp_path / "straight" / "epoch_02.pth"), weights(tmp_path / "resumed" / "epoch_02.pth"))


@pytest.mark.slow  # kept out of the quick suite for its time (about 10-30 s)
def test_each_epochs_dropout_is_its_own_stream_seeded_by_seed_and_epoch(demo_dir, tmp_path, monkeypatch):
    """An epoch's dropout masks are a function of (SEED, epoch) alone: whatever ran before (a resume, another epoch's
    length), epoch e starts from the stream that torch.manual_seed(mix_seed(SEED, e)) gives."""
    import torch.nn.functional as F

    from transforms import mix_seed

    first_of_epoch, now = {}, {}
    build, epoch_of = train.build_training, train.train_epoch

    def record(module, inputs, output):  # the dropout layer's first training step of each epoch
        if module.training and now["epoch"] not in first_of_epoch:
            first_of_epoch[now["epoch"]] = (inputs[0].detach().clone(), output.detach().clone())

    def spying(*args):
        training = build(*args)
        dropout = next(module for module in training.net.modules() if isinstance(module, torch.nn.Dropout))
        dropout.register_forward_hook(record)
        return training

    def marking(net, loader, training, loop, epoch, *rest):
        now["epoch"] = epoch
        return epoch_of(net, loader, training, loop, epoch, *rest)

    monkeypatch.setattr(train, "build_training", spying)
    monkeypatch.setattr(train, "train_epoch", marking)
    assert run(tiny(demo_dir, tmp_path, epochs=2, seed=5)) == 0
    dropped = {epoch: (inputs != 0) & (output == 0) for epoch, (inputs, output) in first_of_epoch.items()}
    assert sorted(dropped) == [1, 2] and not torch.equal(dropped[1], dropped[2])  # another stream each epoch
    for epoch, (inputs, _) in first_of_epoch.items():
        torch.manual_seed(mix_seed(5, epoch))
        expected = F.dropout(torch.ones_like(inputs), p=0.5, training=True) == 0
        assert torch.equal(dropped[epoch], expected & (inputs != 0)), epoch


@pytest.mark.parametrize("cuda_graphs", ["false", "true"])
def test_a_nan_loss_stops_naming_epoch_and_step(demo_dir, tmp_path, monkeypatch, cuda_graphs):
    monkeypatch.setattr("cxr14.loop.graph_support", lambda device, world_size, dtype: (True, ""))  # CUDA_GRAPHS' path
    calls = []
    train_input = model_input

    def poisoned(*args):
        calls.append(1)
        return train_input(*args) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr("cxr14.loop.model_input", poisoned)
    message = run(tiny(demo_dir, tmp_path, cuda_graphs=cuda_graphs))
    assert "epoch 1, step 2" in message and "diverged" in message
    assert not list(tmp_path.glob("epoch_*.pth"))


# equal to 1e-4 whatever the batching


def test_the_demo_settings_learn_every_finding(trained_run, learn_dir):
    """config/demo.py on fresh demo data (300 patients), judged on the held-out test split: chance is 0.5."""
    logits, targets = predict_split(trained_run / "best.pth", learn_dir, "test")
    aurocs = dict(zip(FINDINGS, np.round(auroc_per_finding(targets.numpy(), logits.numpy()), 3)))
    print(aurocs)
    assert np.mean(list(aurocs.values())) > 0.80 and min(aurocs.values()) > 0.6, aurocs
    history = pd.read_csv(trained_run / "metrics.csv")
    assert history.val_loss[1] < history.val_loss[0] and history.val_loss.idxmin() > 0  # learning, not memorising


def test_resume_auto_starts_a_new_run_then_continues_it_as_a_requeued_job_does(straight_run, demo_dir, tmp_path):
    assert run(tiny(demo_dir, tmp_path, epochs=1, resume="auto")) == 0  # nothing there yet: a new run
    assert run(tiny(demo_dir, tmp_path, epochs=2, resume="auto")) == 0  # the same command again: it continues
    assert_same_weights(weights(straight_run / "epoch_02.pth"), weights(tmp_path / "epoch_02.pth"))


def test_resume_into_a_new_folder_continues_exactly_and_writes_its_run_files(straight_run, demo_dir, tmp_path):
    assert run(tiny(demo_dir, tmp_path / "first", epochs=1)) == 0
    branch = tmp_path / "branch"
    assert run(tiny(demo_dir, branch, epochs=2, resume=tmp_path / "first" / "epoch_01.pth")) == 0
    assert_same_weights(weights(straight_run / "epoch_02.pth"), weights(branch / "epoch_02.pth"))
    for name in ("split.csv", "config.json", "pos_weight.json"):
        assert (branch / name).read_text(encoding="utf-8") == (tmp_path / "first" / name).read_text(
            encoding="utf-8"
        ) or name == "config.json"
    assert json.loads((branch / "config.json").read_text(encoding="utf-8"))["OUT_DIR"] == str(branch)
    message = run(tiny(demo_dir, straight_run, epochs=3, resume=tmp_path / "first" / "epoch_01.pth"))
    assert "already holds a run" in message  # never two runs mixed in one folder


def test_a_finished_run_says_so_and_raising_epochs_continues_it(straight_run, demo_dir, tmp_path, capsys):
    shutil.copytree(straight_run, tmp_path / "run")
    (tmp_path / "run" / "best_auroc.pth3k2j1x.tmp").write_bytes(b"half a checkpoint")  # a kill -9 during a save
    assert run(tiny(demo_dir, tmp_path / "run", resume="last")) == 0
    printed = capsys.readouterr().out
    assert "has finished (all 2 epochs are done)" in printed and "--epochs" in printed
    assert not (tmp_path / "run" / "epoch_03.pth").exists()
    assert not list((tmp_path / "run").glob("*.tmp")) and "removed" in printed
    assert run(tiny(demo_dir, tmp_path / "run", resume="last", epochs=3)) == 0
    assert "continuing a run that had finished" in capsys.readouterr().out
    assert (tmp_path / "run" / "epoch_03.pth").exists()


@pytest.mark.slow  # short runs, each warned about: about 12 s on 2 cores
def test_settings_that_waste_a_run_are_warned_about(demo_dir, tmp_path, capsys):
    assert run(tiny(demo_dir, tmp_path, epochs=1, trainable_layers="layer4", image_size=48, load_size=40)) == 0
    printed = capsys.readouterr().out
    assert "PRETRAINED = none with TRAINABLE_LAYERS = 'layer4'" in printed and "--trainable_layers all" in printed
    assert "IMAGE_SIZE 48 is larger than LOAD_SIZE 40" in printed
    assert "per epoch at" not in printed  # 8 steps an epoch: too few for an estimate


@pytest.mark.slow  # kept out of the quick suite for its time (about 10-30 s)
def test_the_time_of_an_epoch_and_of_the_run_is_estimated_within_a_short_first_epoch(demo_dir, tmp_path, capsys):
    assert run(tiny(demo_dir, tmp_path, epochs=2)) == 0  # 10 steps an epoch
    estimates = [line for line in capsys.readouterr().out.splitlines() if "of training per epoch" in line]
    assert len(estimates) == 1 and estimates[0].startswith("epoch 1: about ")
    assert "of training left in this run (epochs 1-2" in estimates[0]


@pytest.mark.slow  # kept out of the quick suite for its time (about 10-30 s)
def test_tensorboard_events_cover_each_step_once_across_a_resume(demo_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cxr14 import run_folder

    monkeypatch.setattr(run_folder, "LOG_EVERY", 1)
    interrupt_at_step(monkeypatch, 12)  # epoch 2, after the first epoch's events
    assert run(tiny(demo_dir, tmp_path, epochs=2, tensorboard="true")) == 128 + signal.SIGTERM
    monkeypatch.undo()
    monkeypatch.setattr(run_folder, "LOG_EVERY", 1)
    assert run(tiny(demo_dir, tmp_path, epochs=2, resume="last", tensorboard="true")) == 0
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0}).Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    steps_per_epoch = len(steps) // 2
    assert steps == list(range(1, 2 * steps_per_epoch + 1))  # every step once, in order, across the resume
    assert [event.step for event in events.Scalars("epoch/val_loss")] == [steps_per_epoch, 2 * steps_per_epoch]
    assert {f"val_auroc/{finding}" for finding in ("Cardiomegaly", "Effusion")} <= set(events.Tags()["scalars"])
    assert "val_heat_map/0" in events.Tags()["images"]
    assert any(tag.startswith("val_pr/") for tag in events.Tags()["tensors"])


@pytest.mark.slow  # two networks, each trained, resumed, evaluated, drawn and exported: about 45 s on 2 cores
@pytest.mark.parametrize("backbone", ["densenet121", "convnext_tiny"])  # resnet50: every other test here
def test_another_backbone_trains_resumes_exactly_evaluates_draws_and_exports(backbone, demo_dir, tmp_path):
    import evaluate
    from cxr14.films import prepare
    from cxr14.heat_maps import film_overlays
    from cxr14.inference import TorchModel
    from cxr14.onnx_model import OnnxModel
    from export import export

    settings = {"backbone": backbone}
    assert run(tiny(demo_dir, tmp_path / "straight", **settings)) == 0
    assert run(tiny(demo_dir, tmp_path / "resumed", **settings, epochs=1)) == 0
    assert run(tiny(demo_dir, tmp_path / "resumed", **settings, resume="last")) == 0
    assert_same_weights(weights(tmp_path / "straight" / "epoch_02.pth"), weights(tmp_path / "resumed" / "epoch_02.pth"))
    assert load_checkpoint(tmp_path / "straight" / "best.pth", FINDINGS)["backbone"] == backbone
    arguments = ["--checkpoint", str(tmp_path / "straight" / "best.pth"), "--bootstrap", "20", "--num_workers", "0"]
    report = evaluate.evaluate(evaluate.parse_args([*arguments, "--boxes", "none"]))
    assert np.isfinite(report["mean_auroc"])
    model = TorchModel(tmp_path / "straight" / "best.pth", device="cpu", amp=False)
    films = [prepare(path, model.load_size, model.image_size) for path in sorted(demo_dir.rglob("*.png"))[:4]]
    probabilities = model.predict(np.stack([film.crop for film in films])).probabilities
    drawn = film_overlays(model, films[0], probabilities[0], 2)
    assert len(drawn) == 2 and min(drawn[0][1].size) >= 512
    export(tmp_path / "straight" / "best.pth", tmp_path / "model.onnx")
    onnx = OnnxModel(tmp_path / "model.onnx").predict(np.stack([film.crop for film in films])).probabilities
    np.testing.assert_allclose(onnx, probabilities, atol=1e-4)


@pytest.mark.slow  # a ViT trained, resumed, evaluated (with localisation), drawn, exported and quantized: about 70 s
def test_eva_x_tiny_at_64_px_trains_resumes_evaluates_predicts_and_exports_from_its_checkpoint_alone(
    demo_dir, tmp_path, monkeypatch
):
    """EVA-X's ViT-Ti with its last four blocks trainable, layer decay and drop path: a run resumed with CUDA_GRAPHS'
    static-buffer step (every step through it, per-layer learning rates on the device) equals the uninterrupted eager
    run; then, with the code's EVA-X constants changed (the checkpoint's own arguments build it) and
    timm unable to download anything, evaluate.py reports (Grad-CAM localisation on its tokens included), predict.py
    and the page draw heat maps, export.py's ONNX model gives PyTorch's probabilities to 1e-4, and --int8 quantizes
    its linear layers within the export's own limits."""
    import onnx
    from PIL import Image

    import app
    import evaluate
    import export
    import predict
    from cxr14 import timm_networks
    from cxr14.films import prepare
    from cxr14.inference import TorchModel
    from cxr14.onnx_model import OnnxModel

    settings = {"backbone": "eva_x_tiny", "image_size": 64, "load_size": 72, "trainable_layers": "4"}
    settings.update(layer_decay=0.65, drop_path=0.1, learning_rate=1e-3)
    assert run(tiny(demo_dir, tmp_path / "straight", **settings)) == 0
    calls = []

    class CountedStep(GraphedStep):
        def __call__(self, *tensors):
            calls.append(1)
            return super().__call__(*tensors)

    with monkeypatch.context() as graphed:
        graphed.setattr("cxr14.loop.graph_support", lambda device, world_size, dtype: (True, ""))
        graphed.setattr("cxr14.loop.GraphedStep", CountedStep)
        assert run(tiny(demo_dir, tmp_path / "resumed", **settings, epochs=1, cuda_graphs="true")) == 0
        assert run(tiny(demo_dir, tmp_path / "resumed", **settings, resume="last", cuda_graphs="true")) == 0
    steps = (pd.read_csv(tmp_path / "straight" / "split.csv").split == "train").sum() // 16
    assert len(calls) == 2 * steps
    assert_same_weights(weights(tmp_path / "straight" / "epoch_02.pth"), weights(tmp_path / "resumed" / "epoch_02.pth"))
    best = tmp_path / "straight" / "best.pth"
    saved = load_checkpoint(best, FINDINGS)
    assert saved["timm"]["name"] == "eva_x_tiny" and saved["timm"]["arguments"]["img_size"] == 64

    monkeypatch.setitem(timm_networks.EVA_X_COMMON, "depth", 3)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("a download was attempted"))
    arguments = ["--checkpoint", str(best), "--bootstrap", "20", "--num_workers", "0"]
    report = evaluate.evaluate(evaluate.parse_args(arguments))
    assert np.isfinite(report["mean_auroc"]) and report["localisation"] and report["subgroups"]
    assert report["calibration"] and report["ood"]  # fitted at the run's end on its ViT features, applied
    torch_model = TorchModel(best, device="cpu", amp=False)
    assert len(torch_model.net.blocks) == 12
    paths = sorted(demo_dir.rglob("*.png"))[:4]
    films = [prepare(path, torch_model.load_size, torch_model.image_size) for path in paths]
    probabilities = torch_model.predict(np.stack([film.crop for film in films])).probabilities
    predict.main(["--checkpoint", str(best), "--cam", "--top", "2", "--out", str(tmp_path / "maps"), str(paths[0])])
    drawn = sorted((tmp_path / "maps").glob(f"{paths[0].stem}_*.png"))
    assert len(drawn) == 3 and all(min(Image.open(path).size) >= 512 for path in drawn)  # two maps and the sheet
    shutil.copy(paths[0], tmp_path / "upload.png")  # the page forgets (deletes) what it was given
    label, _, _, _, _, maps = app.analyse(torch_model, str(tmp_path / "upload.png"), 2)
    np.testing.assert_allclose([label[finding] for finding in FINDINGS], probabilities[0], atol=1e-6)
    assert len(maps) == 2 and min(maps[0][0].shape[:2]) >= 512
    export.export(best, tmp_path / "model.onnx")
    onnx_probabilities = OnnxModel(tmp_path / "model.onnx").predict(np.stack([film.crop for film in films]))
    np.testing.assert_allclose(onnx_probabilities.probabilities, probabilities, atol=1e-4)
    export.main(
        ["--checkpoint", str(best), "--out", str(tmp_path / "int8.onnx"), "--int8", "--data_dir", str(demo_dir)]
    )
    quantized = [
        node for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node if node.op_type == "DequantizeLinear"
    ]
    assert len(quantized) > 48  # at least each of the twelve blocks' four linear layers' weights


@pytest.mark.parametrize("where", ["is", "below"])
def test_an_out_dir_that_cannot_be_a_folder_is_one_line_before_the_data_is_read(where, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("the user's file", encoding="utf-8")
    out = taken if where == "is" else taken / "run"
    message = run(tiny(tmp_path / "no_data_here", out, epochs=1))  # the data would fail next: it is never read
    assert str(message).startswith(f"error: OUT_DIR {out}") and "is a file" in message, message
    assert "labels:" not in capsys.readouterr().out and taken.read_text(encoding="utf-8") == "the user's file"


def test_a_resume_that_names_a_folder_says_so_and_names_its_checkpoints(straight_run, demo_dir, tmp_path):
    message = run(tiny(demo_dir, tmp_path / "new", epochs=2, resume=straight_run))
    assert f"--resume {straight_run} is a folder, not a checkpoint" in message and "epoch_01.pth" in message, message
    message = run(tiny(demo_dir, tmp_path / "new", epochs=2, resume=tmp_path / "missing.pth"))
    assert "missing.pth: no such checkpoint" in message, message


def test_a_dataset_and_data_dir_count_mismatch_is_a_setting_error(tmp_path, capsys):
    """Refused with the other setting errors (exit 2, before anything is read), not as a data error (exit 1)."""
    assert run(tiny(tmp_path, tmp_path / "run", dataset="nih,chexpert")) == 2
    error = capsys.readouterr().err
    assert "DATASET 'nih,chexpert' names 2 dataset(s) but DATA_DIR" in error, error
    assert run(tiny(tmp_path, tmp_path / "run", dataset_weights="1,1")) == 2
    assert "DATASET_WEIGHTS '1,1' gives 2 weight(s) for 1 dataset(s)" in capsys.readouterr().err


@pytest.mark.slow  # two short runs on a copy of the demo data: about 30 s on 2 cores
def test_a_resume_with_relabelled_files_is_refused_and_a_moved_folder_resumes(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data, ignore=shutil.ignore_patterns("cache_*"))
    assert run(tiny(data, tmp_path / "run", epochs=1)) == 0
    moved = tmp_path / "moved"
    shutil.move(data, moved)  # the same bytes in another folder
    relabelled = tmp_path / "relabelled"
    shutil.copytree(moved, relabelled)
    label_file = relabelled / "Data_Entry_2017_v2020.csv"
    table = pd.read_csv(label_file)
    table["Finding Labels"] = table["Finding Labels"].sample(frac=1, random_state=0).to_numpy()
    table.to_csv(label_file, index=False)
    message = run(tiny(relabelled, tmp_path / "run", epochs=2, resume="last"))
    assert "was trained on other labels" in message and str(label_file) in message, message
    assert not (tmp_path / "run" / "epoch_02.pth").exists()
    assert run(tiny(moved, tmp_path / "run", epochs=2, resume="last")) == 0


@pytest.mark.slow  # two short runs, one in emulated bf16 where the CPU has none: about 40 s on 2 cores
def test_a_resume_in_another_precision_says_it_is_no_longer_exact(demo_dir, tmp_path, monkeypatch, capsys):
    """bf16 then fp32, whatever this CPU would choose: the first run is told it has bf16."""
    monkeypatch.setattr("cxr14.loop.autocast_dtype", lambda device, amp=True: torch.bfloat16 if amp else None)
    assert run(tiny(demo_dir, tmp_path, epochs=1)) == 0
    assert "goes on in" not in capsys.readouterr().out  # a new run: nothing to compare
    assert run(tiny(demo_dir, tmp_path, epochs=2, resume="last", amp="false")) == 0
    assert "this run trained in bf16 and goes on in fp32" in capsys.readouterr().out


@pytest.mark.slow  # a run and a fit of its statistics: about 17 s on 2 cores
def test_the_ends_fit_reuses_the_validation_pass_and_equals_a_fit_that_predicts_again(demo_dir, tmp_path, capsys):
    """The statistics a run stores at its end, fitted on its kept validation outputs, against the same fit on the
    validation films predicted again from best.pth, as evaluate.py would for an older checkpoint."""
    from cxr14.fitting import fit_run_statistics
    from cxr14.inference import TorchModel

    assert run(tiny(demo_dir, tmp_path / "run")) == 0
    printed = capsys.readouterr().out
    assert "training films, predicted" in printed and "validation films, predicted" not in printed
    kept = TorchModel(tmp_path / "run" / "best.pth", device="cpu").statistics
    again = tmp_path / "again"
    again.mkdir()
    for name in ("best.pth", "split.csv"):
        shutil.copy(tmp_path / "run" / name, again / name)
    model = TorchModel(again / "best.pth", device="cpu")
    films = train.load_split_labels(model.data, model.checkpoint, again / "best.pth")
    fit_run_statistics(again, model.data, 16, True, films.rows, films.split, torch.device("cpu"), print)
    assert "validation films, predicted" in capsys.readouterr().out
    predicted = TorchModel(again / "best.pth", device="cpu").statistics
    assert kept.thresholds.keys() == predicted.thresholds.keys() and kept.thresholds  # the findings with a threshold
    for finding, threshold in kept.thresholds.items():
        assert threshold == pytest.approx(predicted.thresholds[finding], abs=1e-3), finding  # equal bit for bit here
    for ours, theirs in zip(kept.calibration, predicted.calibration):
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(kept.ood["validation"], predicted.ood["validation"], rtol=1e-3)
