"""The CUDA, MPS and torchrun paths, checked without a GPU: checkpoints resumed onto a device that is not the CPU (the
meta device stands in for a GPU: numpy refuses its tensors as it refuses CUDA's), the wheel's kernels against the GPU,
an NVIDIA GPU beside a CPU-only PyTorch, the autocast dtype by GPU generation, the loss scaler's and the device's
random states across a resume, losses averaged over ranks, reads back from the device per step, torch.compile without
Triton, worker counts, what a DataLoader worker imports, and the chunked upload of the images to device memory."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from cxr14 import devices, pixels, processes, run_folder
from cxr14.checkpoints import load_checkpoint
from cxr14.errors import DeviceError
from cxr14.loop import SYNC_EVERY, Loop, StopRequest, train_epoch
from cxr14.timing import Variant, forward_operations, loop_counts, training_parts
from dataset import FINDINGS, count_positives, pos_weight_from_counts
from helpers import ROOT
from helpers import tiny_settings as tiny

META = torch.device("meta")


@pytest.fixture(scope="module")
def one_epoch(demo_dir, tmp_path_factory):
    """A run stopped after its first of two epochs (a checkpoint to resume)."""
    out = tmp_path_factory.mktemp("one_epoch")
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny(demo_dir, out, epochs=1))
    assert stopped.value.code == 0
    return out


def resume_onto(device, demo_dir, out, dtype=None):
    """train.py's resume path, as far as the device matters: open the run, read its split, build the training parts
    on `device` and restore the checkpoint into them; returns (checkpoint, parts, position)."""
    settings = train.parse_settings(tiny(demo_dir, out, epochs=2, resume="last"))
    path, checkpoint = run_folder.open_run(settings, out, True, print)
    films = train.load_split_labels(settings.data, checkpoint, path)
    labels, split = films.rows, films.split  # numpy on the split's codes
    counts = count_positives(labels[split == "train"][list(FINDINGS)].to_numpy())
    pos_weight = pos_weight_from_counts(*counts, settings.training.pos_weight, settings.training.pos_weight_cap)
    parts = train.build_training(settings, counts, pos_weight, device, dtype, False, 8)
    _, position, _ = run_folder.restore(parts, checkpoint, device)
    return checkpoint, parts, position


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta tensors hold no values
def test_resuming_onto_a_gpu_reads_the_checkpoint_on_the_cpu(one_epoch, demo_dir):
    """Resuming on CUDA or MPS crashed: the checkpoint was loaded onto the device, and the split's codes went to
    numpy from there. Loaded onto the CPU, only what the device needs moves there."""
    checkpoint, parts, position = resume_onto(META, demo_dir, one_epoch)
    assert checkpoint["split"]["codes"].device.type == "cpu" and position == run_folder.Position(2, 0)
    assert all(parameter.device == META for parameter in parts.net.parameters())
    moments = [state["exp_avg"] for state in parts.optimizer.state.values()]
    assert moments and all(moment.device == META for moment in moments)  # the optimizer's state followed its model


def test_every_torch_load_loads_onto_the_cpu():
    """One home for checkpoint I/O (cxr14/checkpoints.py; cxr14/weights_files.py reads a pretrained weights file),
    and every load there onto the CPU."""
    calls = {}
    for path in [*ROOT.glob("*.py"), *(ROOT / "cxr14").glob("*.py")]:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if "torch.load(" in line]
        if lines:
            calls[path.name] = lines
    assert set(calls) == {"checkpoints.py", "weights_files.py"}, calls
    assert all(
        'map_location="cpu"' in line and "weights_only=True" in line for lines in calls.values() for line in lines
    )


def test_an_empty_loss_scaler_state_resumes_into_an_fp16_run(one_epoch, demo_dir):
    """A bf16 or fp32 run saves its disabled scaler as {}; resumed where fp16 is chosen, it starts a fresh scale."""
    assert load_checkpoint(one_epoch / "epoch_01.pth", FINDINGS)["scaler"] == {}
    _, parts, _ = resume_onto(torch.device("cpu"), demo_dir, one_epoch, dtype=torch.float16)
    assert parts.scaler.is_enabled() and parts.scaler.get_scale() == 2.0**16


def test_checkpoints_record_the_autocast_dtype_that_trained_them(one_epoch):
    expected = devices.dtype_name(devices.autocast_dtype(torch.device("cpu")))
    assert load_checkpoint(one_epoch / "epoch_01.pth", FINDINGS)["amp_dtype"] == expected


@pytest.mark.parametrize(
    "capability, arch_list, covered",
    [
        ((9, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], True),  # H100
        ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90"], True),  # RTX 4090: sm_86 code runs on 8.9
        ((7, 5), ["sm_75", "sm_80"], True),  # T4
        ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # V100
        ((6, 1), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # GTX 1080
        ((12, 1), ["sm_90", "compute_120"], True),  # PTX compiled on the fly
        ((8, 0), ["sm_86"], False),  # a lower minor version does not run a higher one's code
        ((8, 6), ["sm_89"], False),
        ((9, 0), ["sm_80", "sm_86"], False),  # machine code runs within its major version only: no H100 kernels
        ((12, 0), ["sm_90"], False),
        ((9, 0), ["compute_80"], True),  # PTX runs on any later GPU
        ((8, 0), ["compute_86"], False),  # ... but not on an earlier one
    ],
)
def test_which_gpus_a_wheel_has_kernels_for(capability, arch_list, covered):
    assert devices.cuda_build_covers(capability, arch_list) is covered


def test_a_gpu_without_kernels_in_this_build_is_refused_with_the_build_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(DeviceError) as error:
        devices.check_cuda_build(torch.device("cuda"))
    message = str(error.value)
    assert "Tesla V100-SXM2-16GB" in message and "7.0" in message and "sm_70" in message
    assert f"--index-url {devices.PYTORCH_INDEX}/{devices.LEGACY_CUDA}" in message


@pytest.mark.parametrize("sign", ["nvidia-smi", "CUDA_VISIBLE_DEVICES"])
def test_an_nvidia_gpu_beside_a_cpu_only_pytorch_is_said_with_the_fix(monkeypatch, sign):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)  # pip's default wheel on Windows
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if sign == "nvidia-smi" else None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if sign == "CUDA_VISIBLE_DEVICES":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    said = []
    assert devices.select_device("auto", said.append) == torch.device("cpu")
    assert len(said) == 1 and "CPU-only build" in said[0] and f"--index-url {devices.PYTORCH_INDEX}/" in said[0]
    with pytest.raises(DeviceError, match="CPU-only build"):
        devices.select_device("cuda", said.append)


def test_no_gpu_anywhere_says_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    said = []
    devices.select_device("auto", said.append)
    assert said == []


@pytest.mark.parametrize(
    "capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, capability, expected):
    """A T4 (7.5) reports bf16 as supported (emulated, slowly): it gets fp16 with loss scaling."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert devices.autocast_dtype(torch.device("cuda")) == expected


def test_the_gpus_random_state_is_saved_and_restored(monkeypatch):
    """Dropout on a GPU draws from the GPU's generator: a mid-epoch resume must restore it too."""
    saved = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.tensor([7, 8], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: saved.update(state=state))
    state = devices.rng_state(torch.device("cuda"))
    assert state["cuda"].tolist() == [7, 8] and state["torch"].device.type == "cpu"
    devices.set_rng_state(state, torch.device("cuda"))
    assert saved["state"].tolist() == [7, 8]
    devices.set_rng_state(devices.rng_state(torch.device("cpu")), torch.device("cuda"))  # saved on a CPU: left alone


def test_a_training_step_waits_for_the_device_only_every_few_steps():
    """Reading the loss (and a finite check, and a blocking upload of the batch's indices, and the normalisation's
    constants) every step left the GPU idle between steps; now one read every SYNC_EVERY steps."""
    operations, reads, uploads = loop_counts(steps=2 * SYNC_EVERY)
    # 2 reads of the losses in 20 steps, and the sampler's list of indices (a host tensor) once an epoch
    assert reads <= 3 / (2 * SYNC_EVERY) and uploads == 0
    assert operations > 100  # the count sees the step


def test_frozen_batchnorm_keeps_activations_in_the_autocast_dtype():
    from torchvision.ops import FrozenBatchNorm2d

    from cxr14.frozen_batchnorm import FrozenBatchNorm

    assert forward_operations(FrozenBatchNorm) < 0.6 * forward_operations(FrozenBatchNorm2d)


def test_a_stop_request_survives_repeated_sigterms_and_two_ctrl_c_stop_at_once():
    stop = StopRequest()
    try:
        for _ in range(3):  # the scheduler's, torchrun's forwarded one, and another
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # one Ctrl-C: still a request
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
    finally:
        stop.restore()


def test_compile_needs_triton_on_a_gpu_and_cl_on_a_windows_cpu(monkeypatch):
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    possible, why = devices.compile_support(torch.device("cuda"))
    assert not possible and "Triton" in why
    monkeypatch.setattr(devices.platform, "system", lambda: "Windows")
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    possible, why = devices.compile_support(torch.device("cpu"))
    assert not possible and "cl.exe" in why


def test_a_compiled_run_validates_with_the_uncompiled_module(demo_dir, tmp_path, monkeypatch):
    """Eval mode and the short last validation batch would make torch.compile compile again (and reduce-overhead
    record more CUDA graphs): validation goes around the compiled module."""
    modes = []

    class Compiled(torch.nn.Module):  # stands for torch.compile's wrapper: records the mode of each call
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            modes.append(self.net.training)
            return self.net(images)

    monkeypatch.setattr("cxr14.loop.compile_support", lambda device: (True, ""))
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: Compiled(net))
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny(demo_dir, tmp_path, epochs=1, compile="true"))
    assert stopped.value.code == 0 and modes and all(modes)  # it trained, and never in eval mode


def test_a_run_that_cannot_compile_says_why_and_trains_uncompiled(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cxr14.loop.compile_support", lambda device: (False, "no Triton here"))
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny(demo_dir, tmp_path, epochs=1, compile="true"))
    assert stopped.value.code == 0 and "COMPILE: no Triton here; training without compiling" in capsys.readouterr().out


def test_workers_from_this_machines_cpus_and_processes(monkeypatch):
    assert processes.worker_count(-1, cpus=16, processes=2, system="Linux") == 7
    assert processes.worker_count(-1, cpus=32, processes=1, system="Windows") == processes.WINDOWS_MAX_WORKERS
    assert processes.worker_count(3, cpus=2, processes=8, system="Linux") == 3
    monkeypatch.setenv("WORLD_SIZE", "16")  # two machines of 8 GPUs: each machine's own 8 processes share its CPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert processes.usable_cpus() == 40 and processes.worker_count(-1, system="Linux") == 4


def test_a_dataloader_worker_imports_no_plotting_or_heat_map_library():
    """On Windows each worker re-imports train.py: matplotlib, scikit-learn, scipy and grad-cam there cost each worker
    about 0.8 GB and 15 s."""
    heavy = ("matplotlib", "sklearn", "scipy", "pytorch_grad_cam", "tensorboard", "cv2")
    code = f"import sys, train; print([name for name in {heavy!r} if name in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_images_go_to_device_memory_in_chunks_and_share_it_among_processes(demo_dir, tmp_path, monkeypatch):
    import shutil

    from cache import build_cache
    from cxr14.films import eval_crop
    from dataset import attach_image_paths, read_labels

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    build_cache(data, size=24, workers=1)
    labels = attach_image_paths(read_labels(data / "Data_Entry_2017_v2020.csv"), data)
    cached = pixels.CachedImages(pixels.cache_folder(data, 24), labels.image_name[::-1])
    whole = torch.from_numpy(np.stack([cached[k] for k in range(len(cached))]))
    monkeypatch.setattr(pixels, "UPLOAD_CHUNK", 7)
    assert torch.equal(pixels.images_on_device(cached, torch.device("cpu")), whole)
    crops = pixels.images_on_device(cached, torch.device("cpu"), lambda pixels: eval_crop(pixels, 16))
    assert crops.shape == (len(cached), 16, 16) and torch.equal(crops[3], torch.from_numpy(eval_crop(cached[3], 16)))
    alone, _ = pixels.memory_for_images(torch.device("cpu"), processes=1)
    shared, said = pixels.memory_for_images(torch.device("cpu"), processes=4)
    assert shared == pytest.approx(alone / 4) and "shared by 4 processes" in said


def _average_over_ranks(rank, port, results):
    """In one of two gloo processes: the same two steps with this rank's own targets, alone and then as one of two
    ranks; the loss logged as one of two must be both ranks' mean."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    parts, _ = training_parts(
        type("Args", (), {"trainable_layers": "head", "image_size": 32})(), torch.device("cpu"), Variant(False, False)
    )
    parts.net.fc[0].p = 0.0
    parts.optimizer.param_groups[0]["lr"] = 0.0  # the same model at every step: each loss depends on its batch only
    images = torch.full((2, 1, 40, 40), 100 + 50 * rank, dtype=torch.uint8)
    batches = [(images, torch.full((2, len(FINDINGS)), float(rank)), torch.arange(2))] * 2
    stop, totals = StopRequest(), {}
    try:
        for world_size in (1, 2):
            loop = Loop(torch.device("cpu"), image_size=32, world_size=world_size, show_progress=False)
            totals[world_size] = run_folder.EpochTotals()
            train_epoch(parts.net, batches, parts, loop, 1, 0, totals[world_size], stop)
    finally:
        stop.restore()
    alone = [None, None]
    dist.all_gather_object(alone, totals[1].mean())
    results[rank] = (alone, totals[2].mean(), totals[2].images)
    dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes, as tests/test_distributed.py's
def test_the_logged_training_loss_is_every_ranks_not_rank_0s():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_average_over_ranks, args=(port, results), nprocs=2)
    (alone_0, both_0, images_0), (_, both_1, images_1) = results[0], results[1]
    assert alone_0[0] != pytest.approx(alone_0[1])  # the ranks' own losses differ
    assert both_0 == pytest.approx(np.mean(alone_0)) and both_1 == pytest.approx(both_0)
    assert images_0 == images_1 == 2 * 2 * 2  # two steps of two images on each of two ranks


def test_gpu_check_on_a_machine_without_a_gpu_says_so_and_exits_0(tmp_path):
    result = subprocess.run(
        [sys.executable, "gpu_check.py", "--json", str(tmp_path / "gpu.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0 and "no GPU" in result.stdout
    assert not Path(tmp_path / "gpu.json").exists() or "no GPU" in (tmp_path / "gpu.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("requested, expected", [(0, 0), (3, 3), (-1, 7)])
def test_zero_workers_means_none_and_minus_one_means_from_the_cpus(requested, expected):
    assert processes.worker_count(requested, cpus=8, processes=1, system="Linux") == expected
    assert processes.worker_count(-1, cpus=8, processes=2, system="Linux") == 3  # 4 CPUs a process, one feeds it


def test_gpu_checks_of_bench_rows_fail_when_the_faster_path_is_not_and_skip_without_it():
    import gpu_check

    eager = {"amp": True, "channels_last": True, "compile": "", "fold": True, "graphs": False}
    graphed = {**eager, "graphs": True}
    figures = {
        "configurations": [{**eager, "train_img_s": 100.0, "ops_per_step": 353}, {**graphed, "train_img_s": 90.0}]
    }
    status, said = gpu_check.faster_row(figures, graphed, eager, "graphs")
    assert status == "FAIL" and "90 against 100 img/s (0.90x)" in said
    figures["configurations"][1]["train_img_s"] = 150.0
    assert gpu_check.faster_row(figures, graphed, eager, "graphs")[0] == "PASS"
    assert gpu_check.faster_row(figures, {**eager, "fold": False}, eager, "folded")[0] == "SKIP"
    assert gpu_check.faster_row(None, graphed, eager, "graphs")[0] == "SKIP"


def test_the_goal_line_judges_the_fastest_row_of_each_recipe_on_an_h100_or_h200_only():
    import gpu_check

    def row(recipe, rate, **variant):
        return {"batch_size": 64, "trainable_layers": recipe, "train_img_s": rate, "host_share_of_step": 0.5,
                "compile": "", "graphs": False, **variant}  # fmt: skip

    figures = {"configurations": [row("layer4", 5_000), row("layer4", 16_000, graphs=True), row("all", 2_900)]}
    status, said = gpu_check.check_goal(figures, "NVIDIA H200 (cuda:0)")
    assert status == "FAIL" and "layer4: 16,000 img/s (goal 15,000)" in said and "graphs True" in said
    figures["configurations"].append(row("all", 3_100, compile="default"))
    assert gpu_check.check_goal(figures, "NVIDIA H100 80GB HBM3")[0] == "PASS"
    assert gpu_check.check_goal(figures, "Tesla T4")[0] == "SKIP"
    assert gpu_check.check_goal({"configurations": figures["configurations"][:2]}, "NVIDIA H200")[0] == "SKIP"


def test_the_cuda_graphs_line_fails_a_curve_off_the_eager_one_or_a_capture_that_fell_back(tmp_path, monkeypatch):
    import pandas as pd

    import gpu_check

    def curve(name, losses):
        (tmp_path / name).mkdir(exist_ok=True)
        pd.DataFrame({"epoch": [1, 2], "val_loss": losses}).to_csv(tmp_path / name / "metrics.csv", index=False)

    curve("straight", [1.0, 0.8])
    curve("straight_again", [1.001, 0.8016])
    printed = {"text": "device: cuda:0\nCUDA_GRAPHS: step 2 captured as one CUDA graph; every later step replays it\n"}

    def train_graphed(data, out, *settings):
        assert "--cuda_graphs=true" in settings
        curve(Path(out).name, losses)
        return printed["text"]

    monkeypatch.setattr(gpu_check, "train", train_graphed)
    losses = [1.002, 0.803]
    status, said = gpu_check.check_cuda_graphs(None, tmp_path, "cuda")
    assert status == "PASS" and "0.20%, 0.38%" in said and "(two eager runs: 0.10%, 0.20%)" in said
    losses = [1.002, 0.85]  # 6% off the eager curve
    assert gpu_check.check_cuda_graphs(None, tmp_path, "cuda")[0] == "FAIL"
    losses = [1.0, 0.8]
    printed["text"] = "device: cuda:0\n"  # no graph captured: the curve is eager's, and proves nothing
    assert gpu_check.check_cuda_graphs(None, tmp_path, "cuda")[0] == "FAIL"
    printed["text"] = "CUDA_GRAPHS: capturing the training step failed (...); training on without graphs\n"
    assert gpu_check.check_cuda_graphs(None, tmp_path, "cuda")[0] == "FAIL"
    printed["text"] = "CUDA_GRAPHS: fp16 loss scaling (GPUs before Ampere) ...; training without graphs\n"
    assert gpu_check.check_cuda_graphs(None, tmp_path, "cuda")[0] == "SKIP"
    monkeypatch.setattr(gpu_check, "train", lambda *args: pytest.fail("trained where graphs cannot be"))
    status, said = gpu_check.check_cuda_graphs(None, tmp_path, "mps")
    assert status == "SKIP" and "not on mps" in said
