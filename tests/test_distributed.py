"""train.py under torchrun: two gloo processes on the CPU write one set of files, validate every film once, and two
SIGTERMs (a scheduler's, then torchrun's) leave a state that resumes exactly. Each start costs three Python processes
that import torch (about a minute for both tests on 2 cores), so they run with the slow tests: make test-slow."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from cxr14.checkpoints import load_checkpoint
from dataset import FINDINGS
from helpers import ROOT, assert_same_weights, validation_loss_of, weights
from helpers import tiny_settings as tiny

pytestmark = pytest.mark.slow


def torchrun(settings):
    """train.py under torchrun: two processes of this machine (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *settings]


TORCHRUN_SETTINGS = {"epochs": 2, "batch_size": 4, "amp": "false", "num_workers": 1, "tensorboard": "false"}  # fp32:


@pytest.fixture(scope="module")
def torchrun_straight(demo_dir, tmp_path_factory):
    """Two epochs in two processes, uninterrupted: checked on its own, and the reference of the SIGTERM test."""
    out = tmp_path_factory.mktemp("torchrun_straight")
    result = subprocess.run(
        torchrun(tiny(demo_dir, out, **TORCHRUN_SETTINGS)), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_torchrun_two_processes_on_cpu_write_one_set_of_files(torchrun_straight, demo_dir):
    out, printed = torchrun_straight
    assert printed.count("device: cpu") == 1 and "2 process(es)" in printed  # rank 0 alone prints
    names = sorted(path.name for path in out.glob("*.pth"))
    assert names == ["best.pth", "best_auroc.pth", "epoch_01.pth", "epoch_02.pth"]
    assert len(pd.read_csv(out / "metrics.csv")) == 2
    # the validation metrics cover every validation image once, gathered from both ranks
    expected = validation_loss_of(out / "epoch_02.pth", demo_dir, amp=False)
    assert pd.read_csv(out / "metrics.csv")["val_loss"][1] == pytest.approx(expected, rel=1e-4)


def test_two_sigterms_to_a_two_process_run_leave_a_state_that_resumes_exactly(torchrun_straight, demo_dir, tmp_path):
    """Under SLURM the scheduler signals every process of the job, and torchrun forwards a second SIGTERM to its
    workers; DataLoader workers get the signal too. Both ranks must still stop together, save interrupted.pth, and
    resume to the weights of an uninterrupted run."""
    settings = TORCHRUN_SETTINGS
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        torchrun(tiny(demo_dir, out, **settings)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job's
    )
    started = time.time()
    while not (out / "epoch_01.pth").exists():
        assert process.poll() is None and time.time() < started + 300, process.communicate()[1][-3000:]
        time.sleep(0.02)
    for _ in range(2):  # the scheduler's SIGTERM to every process (torchrun forwards one more to each rank)
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(0.3)
    _, stderr = process.communicate(timeout=300)
    assert (out / "interrupted.pth").exists(), stderr[-3000:]
    assert "DataLoader worker" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    position = load_checkpoint(out / "interrupted.pth", FINDINGS)["position"]
    assert position["epoch"] == 2 and 0 < position["step"], position  # inside epoch 2, as the signal was
    resumed = subprocess.run(  # a timeout: workers that ignore SIGTERM must still end with the run
        torchrun(tiny(demo_dir, out, resume="last", **settings)), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(torchrun_straight[0] / "epoch_02.pth"), weights(out / "epoch_02.pth"))


def test_a_vit_trains_under_torchrun_and_validates_every_film_once(demo_dir, tmp_path):
    """EVA-X's ViT-Ti (last four blocks, layer decay, drop path) under DistributedDataParallel: the logged validation
    loss is the checkpoint's own over every validation film, computed again in one process."""
    vit = {"backbone": "eva_x_tiny", "image_size": 64, "load_size": 72, "trainable_layers": "4"}
    settings = {**TORCHRUN_SETTINGS, **vit, "layer_decay": 0.65, "drop_path": 0.1, "epochs": 1}
    result = subprocess.run(
        torchrun(tiny(demo_dir, tmp_path, **settings)), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(tmp_path / "epoch_01.pth", FINDINGS)["timm"]["name"] == "eva_x_tiny"
    expected = validation_loss_of(tmp_path / "epoch_01.pth", demo_dir, amp=False)
    assert pd.read_csv(tmp_path / "metrics.csv")["val_loss"][0] == pytest.approx(expected, rel=1e-4)
