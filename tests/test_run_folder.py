"""run_folder.py: what a run writes and finds again: checkpoints kept slim or whole, the epoch records of its
history (older histories included), the best epoch, and when a run has finished."""

import pytest
import torch

import train
from cxr14 import run_folder
from cxr14.checkpoints import load_checkpoint
from dataset import FINDINGS
from helpers import run
from helpers import tiny_settings as tiny


def test_keep_training_state_all_leaves_every_epoch_resumable(tmp_path, monkeypatch):
    from cxr14 import run_folder

    monkeypatch.setattr(run_folder, "write_metrics", lambda *args: None)  # these rows carry no metrics to plot
    history = []
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "val_loss": 1.0 / epoch, "val_mean_auroc": 0.5 + epoch / 10})
        state = {
            "epoch": epoch,
            "model": {"w": torch.ones(3)},
            **{name: {"x": 1} for name in run_folder.TRAINING_STATE},
        }
        run_folder.save_epoch(tmp_path, history, state, keep_training_state="all")
    for epoch in (1, 2, 3):
        kept = torch.load(tmp_path / f"epoch_0{epoch}.pth", weights_only=True)
        assert all(name in kept for name in run_folder.TRAINING_STATE), epoch


@pytest.mark.slow  # kept out of the quick suite for its time (about 10-30 s)
def test_an_early_stopped_run_stays_stopped_unless_the_patience_is_raised(demo_dir, tmp_path, capsys):
    from dataclasses import replace

    from cxr14 import run_folder

    Position = run_folder.Position
    history = [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.6}, {"epoch": 3, "val_loss": 0.7}]
    defaults = train.parse_settings([]).training
    settings = replace(defaults, epochs=10, early_stopping_patience=2, lr_schedule="plateau", min_learning_rate=1e-8)
    ended = run_folder.finished(history, Position(4, 0), 1e-4, settings)
    assert ended.startswith("early stop") and "best: 1" in ended
    patient = replace(settings, early_stopping_patience=3)
    assert run_folder.finished(history, Position(4, 0), 1e-4, patient) is None
    assert run_folder.finished(history, Position(3, 5), 1e-4, settings) is None  # mid-epoch: not finished
    assert "learning rate" in run_folder.finished(history[:1], Position(2, 0), 1e-9, settings)
    # a run whose plateau schedule cuts the rate below the floor ends with the reason
    assert run(tiny(demo_dir, tmp_path, epochs=4, learning_rate=1e-7, lr_factor=0.01, lr_patience=0)) == 0
    printed = capsys.readouterr().out
    assert "training ends: the learning rate was cut" in printed and not (tmp_path / "epoch_04.pth").exists()


def test_the_best_epoch_is_the_lowest_validation_loss_and_the_summary_marks_it(tmp_path):
    history = [
        run_folder.EpochMetrics(epoch, 0.9, loss, 0.6, 1e-4, 1.0, {"Hernia": 0.7}).row()
        for epoch, loss in ((1, 0.8), (2, 0.55), (3, 0.6))
    ]
    assert run_folder.best_epoch(history).epoch == 2 and run_folder.best_epoch(history).aurocs == {"Hernia": 0.7}
    lines = run_folder.summary(history, tmp_path).splitlines()
    assert [line.endswith("<- best") for line in lines[1:4]] == [False, True, False]
    assert lines[-1].startswith("best epoch 2: val loss 0.5500")


@pytest.mark.slow  # kept out of the quick suite for its time (about 10-30 s)
def test_a_run_whose_history_lacks_a_field_resumes(demo_dir, tmp_path):
    """A run started by an older train.py wrote its history without a field added since (here `seconds`); resuming
    it raised KeyError. Its rows now read with NaN there, and the run continues."""
    assert run(tiny(demo_dir, tmp_path, epochs=1)) == 0
    path = tmp_path / "epoch_01.pth"
    checkpoint = load_checkpoint(path, FINDINGS)
    for row in checkpoint["history"]:
        del row["seconds"]
    checkpoint["metrics"].pop("seconds", None)  # history[-1] itself, once loaded
    torch.save(checkpoint, path)
    assert run(tiny(demo_dir, tmp_path, epochs=2, resume="last")) == 0
    history = load_checkpoint(tmp_path / "epoch_02.pth", FINDINGS)["history"]
    rows = [run_folder.EpochMetrics.from_row(row) for row in history]
    assert [row.epoch for row in rows] == [1, 2] and rows[0].seconds != rows[0].seconds and rows[1].seconds > 0
    assert (tmp_path / "training_curves.png").is_file()
