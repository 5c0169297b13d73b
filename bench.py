"""Throughput, side by side in one run, timed as train.py trains, on synthetic NIH-like PNGs that it generates.

    python bench.py [--images 300] [--workers 2] [--image_size 224] [--batch_size 64] [--json bench.json]
    python bench.py --quick --json bench.json      # seconds, for CI
    python bench.py --compile --batch_size 64 256 --trainable_layers layer4 all   # adds compiled (and graphed) rows

(a) input pipeline images/s: decoding the PNGs vs reading the cache, same worker augmentation, same worker count,
    and the same for JPEGs in CheXpert's layout (CHEXPERT_SIZE px, as CheXpert-v1.0-small) and their cache;
    a worker's milliseconds per image with augmentation in the workers vs on the device (the worker only reads);
    the device augmentation's cost per image, and batches/s drawn from images held in device memory;
(b) training-step and evaluation images/s of the real model on this device, in the configurations the device
    supports (fp32, AMP, channels_last; the frozen blocks' BatchNorm unfolded and folded into their convolutions,
    as train.py builds them; on CUDA the whole step replayed as one CUDA graph, as CUDA_GRAPHS does; with --compile,
    torch.compile, and on CUDA its own CUDA graphs (mode reduce-overhead) and compiled inside train.py's graph), for
    each --batch_size and --trainable_layers, with the operations of one step (eager rows): train.py's own loop
    (train.train_epoch over images held in device memory, the default on a GPU: no host-to-device copy per step, fused
    AdamW, cuDNN benchmark) against a bare forward/backward/step loop of the same model and batch; on a GPU, the
    share of a step the host needs to queue its kernels (near 100%: the step is CPU-bound by launch overhead, and a
    faster GPU would not help); on the CPU, fp32 against the project's CPU choice (bf16 autocast + channels_last
    where the CPU has native bf16);
(c) the projected time of one NIH epoch (training and validation) for each configuration;
(d) what a training step asks of the device, counted on any device: operations of a forward pass under bf16
    autocast (torchvision's FrozenBatchNorm2d, model.FrozenBatchNorm, and the BatchNorm folded into the convolution),
    and per step of train.py's loop the operations (unfolded and folded) and the reads back to the host (item, bool,
    tolist: each one a wait for a GPU) and blocking uploads.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from torchvision.ops import FrozenBatchNorm2d

# bench.py imports train.py, the one command another imports: it times train.py's own loop (train_epoch), so that
# its figures are those of the code that trains, not of a copy (the demo data and its cache it makes by running
# demo_data.py and cache.py)
import train
from configurator import add_device_flags
from dataset import FINDINGS, attach_image_paths, pos_weight_from_counts, read_labels
from datasets import cache_films
from devices import (
    autocast_dtype,
    compile_support,
    cpu_has_native_bf16,
    device_name,
    select_device,
    synchronize,
    timed,
)
from images import CachedImages, FilmImages, cache_folder, images_on_device
from loaders import ChestXrayDataset, DeviceBatches, SeededSampler
from model import FrozenBatchNorm, build_model, cast_frozen
from run_folder import EpochTotals
from transforms import WorkerAugment, augment_batch, augmentation_params, normalize

NIH_TRAIN_IMAGES = 77_872  # train_val_list.txt (86,524) less a 10% validation split by patient
NIH_VAL_IMAGES = 8_652  # that validation split: evaluated after every epoch
SOURCE_SIZE = 1024  # NIH films are 1024 x 1024 PNGs
CHEXPERT_SIZE = 320  # CheXpert-v1.0-small's JPEGs: about 320 px on their shorter side
CPU_STEP = {"image_size": 128, "batch_size": 32}  # the CPU fp32-vs-AMP step: all layers trainable (the demo, CI)
WORKER_IMAGES = 256  # images per timing of a worker's cost
HOST_BOUND = 0.9  # a step whose kernels take the host at least this share of its time to queue is CPU-bound
COUNTED_STEPS = 20  # training steps whose operations and reads are counted


def input_loader(images, targets, args):
    """The training DataLoader over `images` as train.py builds it (seeded sampler, persistent workers)."""
    dataset = ChestXrayDataset(images, targets, WorkerAugment(args.image_size))
    sampler = SeededSampler(DistributedSampler(dataset, 1, 0, seed=0), seed=0)
    workers = args.workers
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def epoch_rate(loader, epoch):
    """Images/s of one epoch through the loader (decode or read, augment, collate, hand over)."""
    loader.sampler.set_epoch(epoch)
    started = time.perf_counter()
    count = sum(len(batch) for batch, *_ in loader)
    return count / (time.perf_counter() - started)


def input_rates(labels, folder, args):
    """Median images/s of the PNG path and the cache path, their epochs alternated (epoch 0 starts workers)."""
    targets = labels[list(FINDINGS)]
    raw = input_loader(FilmImages(labels["path"], args.load_size), targets, args)
    cached = input_loader(CachedImages(cache_folder(folder, args.load_size), labels["image_name"]), targets, args)
    rates = {"raw": [], "cached": []}
    for epoch in range(args.rounds + 1):
        for name, loader in (("raw", raw), ("cached", cached)):
            rate = epoch_rate(loader, epoch)
            if epoch:
                rates[name].append(rate)
    return statistics.median(rates["raw"]), statistics.median(rates["cached"])


# ----------------------------------------------------------------------------- (b) model steps


class Variant(NamedTuple):
    """One configuration of the training step that (b) times."""

    amp: bool
    channels_last: bool
    compile: str = ""  # a torch.compile mode ("default"; "reduce-overhead": CUDA graphs), or "" for eager
    fold: bool = True  # the frozen blocks' BatchNorm folded into their convolutions (model.fold_frozen_batchnorm)
    graphs: bool = False  # train.py's CUDA_GRAPHS: the whole step replayed as one CUDA graph (cuda_graphs.py)


def training_parts(args, device, variant):
    """(a run_folder.Training, the autocast dtype), made by train.build_training for random weights in the variant's
    precision and layout: train.py's defaults otherwise, the targets' rate of device_batches."""
    dtype = autocast_dtype(device, variant.amp)
    defaults = train.parse_settings([])
    backbone, layers = getattr(args, "backbone", "resnet50"), args.trainable_layers
    model_settings = replace(defaults.model, backbone=backbone, pretrained="none", trainable_layers=layers)
    counts = np.full(len(FINDINGS), 20), np.full(len(FINDINGS), 80)
    pos_weight = pos_weight_from_counts(*counts)
    parts = train.build_training(
        model_settings, defaults.training, counts, pos_weight, device, dtype, variant.channels_last, 1, variant.fold
    )
    return parts, dtype


def device_batches(args, device, steps):
    """`steps` training batches drawn from random uint8 images held in device memory, as train.py does on a GPU."""
    count = steps * args.batch_size
    images = torch.randint(0, 256, (count, args.load_size, args.load_size), dtype=torch.uint8, device=device)
    targets = (np.random.default_rng(0).random((count, len(FINDINGS))) < 0.2).astype(np.float32)
    sampler = SeededSampler(DistributedSampler(range(count), 1, 0, seed=0), seed=0)
    return DeviceBatches(images, targets, sampler, args.batch_size, drop_last=True)


def step_rates(args, device, variant):
    """(project loop, bare loop, eval) images/s, the host's share of a bare step and its operations (None compiled
    or graphed: its kernels are not aten operations, or are replayed without them) for one Variant."""
    parts, dtype = training_parts(args, device, variant)
    net = torch.compile(parts.net, mode=variant.compile) if variant.compile else parts.net
    loop = train.Loop(device, dtype, variant.channels_last, image_size=args.image_size, show_progress=False)
    loop.graphed = train.graphed_step(variant.graphs, net, parts, loop, print)
    warmup, measured = device_batches(args, device, args.warmup), device_batches(args, device, args.steps)
    inputs = normalize(
        torch.randint(0, 256, (args.batch_size, 1, args.image_size, args.image_size), dtype=torch.uint8, device=device),
        variant.channels_last,
    )
    labels = (torch.rand(args.batch_size, len(FINDINGS), device=device) < 0.2).float()
    films = torch.randint(
        0, 256, (args.batch_size, 1, args.load_size, args.load_size), dtype=torch.uint8, device=device
    )
    params = train.augmentation_on_device(torch.arange(args.batch_size), args.load_size, loop)

    def project_loop(batches, epoch):
        batches.sampler.set_epoch(epoch)
        train.train_epoch(net, batches, parts, loop, epoch, 0, EpochTotals(), stop)

    def bare_step():  # train.py's step on one ready batch: no sampling, augmentation (but in a graph) or bookkeeping
        if loop.graphed is not None:
            loop.graphed(films, params, labels)
        else:
            train.optimizer_step(net, inputs, labels, parts, loop)

    stop = train.StopRequest()
    try:
        project_loop(warmup, 0)
        project, bare = [], []
        for round_ in range(args.rounds):  # alternated, so that drifts of the machine touch both alike
            seconds = timed(lambda epoch=round_ + 1: project_loop(measured, epoch), device)
            project.append(args.steps * args.batch_size / seconds)
            bare.append(args.batch_size / _seconds_per_call(bare_step, args, device))
        host_share = host_share_of_step(bare_step, device)
        operations = None
        if not variant.compile and loop.graphed is None:
            with OperationCount() as count:
                bare_step()
            operations = count.operations
    finally:
        stop.restore()
    net.eval()

    def eval_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net(inputs)

    evaluation = args.batch_size / _seconds_per_call(eval_step, args, device)
    return statistics.median(project), statistics.median(bare), evaluation, host_share, operations


def host_share_of_step(step, device):
    """On a GPU: the time the host takes to queue one step's kernels over the step's time from an idle GPU to an idle
    GPU. Near 1, the GPU waits for the host: the step is CPU-bound (launch overhead). None elsewhere."""
    if device.type != "cuda":
        return None
    shares = []
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        step()
        queued = time.perf_counter() - started
        synchronize(device)
        shares.append(queued / (time.perf_counter() - started))
    return statistics.median(shares)


def cpu_train_rates(args):
    """(fp32, the project's CPU choice) images/s of a bare training step on the CPU: all layers trainable, CPU_STEP
    (the choice: bf16 autocast + channels_last where the CPU multiplies bf16 natively, as train.py does)."""
    cpu = torch.device("cpu")
    return _cpu_step_rate(None, torch.contiguous_format, args), _cpu_step_rate(
        autocast_dtype(cpu), torch.channels_last, args
    )


def _cpu_step_rate(dtype, layout, args):
    size, batch = args.cpu_step["image_size"], args.cpu_step["batch_size"]
    net = build_model(len(FINDINGS), "none", "all", 0.5).to(memory_format=layout)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    targets = (torch.rand(batch, len(FINDINGS)) < 0.2).float()

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / _seconds_per_call(step, args, torch.device("cpu"))


# ----------------------------------------------------------------------------- (a') where augmentation runs


def worker_costs(images, targets, args):
    """A worker's milliseconds per image (read, augment if it does, collate), augmenting in the worker vs on the
    device; measured in this process, one image at a time as a worker does, median of args.rounds."""
    paths = {"workers": ChestXrayDataset(images, targets, WorkerAugment(args.image_size))}
    paths["device"] = ChestXrayDataset(images, targets)  # the worker only reads; the device augments
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, dataset in paths.items():
            started = time.perf_counter()
            for start in range(0, WORKER_IMAGES, args.batch_size):
                items = range(start, min(start + args.batch_size, WORKER_IMAGES))
                default_collate([dataset[(item % len(dataset), item)] for item in items])
            times[name].append((time.perf_counter() - started) / WORKER_IMAGES * 1000)
    return statistics.median(times["workers"]), statistics.median(times["device"])


def device_input_rates(cached_images, targets, args, device):
    """(device augmentation ms per image, batches/s drawn from images held in device memory and made ready for
    the model: gather, augment, normalise)."""
    on_device = images_on_device(cached_images, device)
    on_device = on_device[torch.arange(args.steps * args.batch_size, device=device) % len(on_device)]  # enough batches
    batch = on_device[: args.batch_size].unsqueeze(1)
    params = torch.from_numpy(augmentation_params(np.arange(args.batch_size), args.load_size)).to(device)
    augment_seconds = _seconds_per_call(lambda: augment_batch(batch, params, args.image_size), args, device)
    sampler = SeededSampler(DistributedSampler(range(len(on_device)), 1, 0, seed=0), seed=0)
    targets = np.resize(targets, (len(on_device), targets.shape[1]))
    batches = DeviceBatches(on_device, targets, sampler, args.batch_size, drop_last=True)
    loop = train.Loop(device, None, device.type in ("cuda", "cpu"), image_size=args.image_size, show_progress=False)

    def epoch():
        sampler.set_epoch(1)
        for images, _, seeds in batches:
            train.model_input(images, train.augmentation_on_device(seeds, images.shape[-1], loop), loop)

    rate = len(batches) * args.rounds / sum(timed(epoch, device) for _ in range(args.rounds))
    return augment_seconds / args.batch_size * 1000, rate


# ----------------------------------------------------------------------------- (d) what a step asks of the device


class OperationCount(TorchDispatchMode):
    """Counts the aten operations run under it (each one a kernel launch, or several, on a GPU)."""

    def __init__(self):
        super().__init__()
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        return func(*args, **(kwargs or {}))


class DeviceWaits(TorchFunctionMode):
    """Counts, under it, what makes the host wait for a GPU: reading a tensor's value (item, bool, float, int, tolist)
    and making a tensor on a device from Python data (torch.tensor / as_tensor with a device: a blocking upload).
    On the CPU nothing waits, but the same calls are made, so the count is the GPU's."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__}
    READS |= {torch.Tensor.__int__}
    UPLOADS = {torch.tensor, torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.reads = self.uploads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.reads += func in self.READS
        self.uploads += func in self.UPLOADS and kwargs.get("device") is not None
        return func(*args, **kwargs)


def forward_operations(frozen_class=None, trainable_layers="layer4", size=64):
    """Operations of one forward pass under bf16 autocast on the CPU (the count does not depend on the CPU having
    native bf16), with the frozen blocks' BatchNorm as `frozen_class`, or (None) folded into their convolutions, as
    train.py builds them (cast to bf16 once, as train.py does)."""
    net = build_model(len(FINDINGS), "none", trainable_layers, 0.5, fold=frozen_class is None).eval()
    if frozen_class not in (None, FrozenBatchNorm):
        _swap_frozen_batchnorm(net, frozen_class)
    cast_frozen(net, torch.bfloat16)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OperationCount() as count:
        net(images)
    return count.operations


def _swap_frozen_batchnorm(module, frozen_class):
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm):
            replacement = frozen_class(child.weight.numel(), eps=child.eps)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            _swap_frozen_batchnorm(child, frozen_class)


def loop_counts(steps=COUNTED_STEPS, size=32, batch_size=4, fold=True):
    """(operations, reads, uploads) per step of train.py's loop on the CPU, over `steps` steps of a small ResNet-50
    step from images held in memory (the operations depend on the model, not on the image size)."""
    run = _loop_steps(torch.device("cpu"), steps, size, batch_size, fold)
    with OperationCount() as operations, DeviceWaits() as waits:
        run()
    return operations.operations / steps, waits.reads / steps, waits.uploads / steps


def gpu_syncs_per_step(device, steps=COUNTED_STEPS, size=64, batch_size=16):
    """On CUDA: the operations per step of train.py's loop that make the host wait for the GPU, as CUDA's own sync
    debug mode reports them (None elsewhere)."""
    if device.type != "cuda":
        return None
    _loop_steps(device, 2, size, batch_size)()  # cuDNN's benchmark and first allocations out of the way
    run = _loop_steps(device, steps, size, batch_size)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught) / steps


def _loop_steps(device, steps, size, batch_size, fold=True):
    """A function that runs `steps` steps of train.py's loop (one epoch of that many) on `device`, from images held in
    its memory; what it needs is made here, outside what is counted."""
    args = argparse.Namespace(trainable_layers="layer4", batch_size=batch_size, load_size=size + 8)
    parts, dtype = training_parts(args, device, Variant(amp=True, channels_last=device.type != "mps", fold=fold))
    loop = train.Loop(device, dtype, device.type != "mps", image_size=size, show_progress=False)
    batches = device_batches(args, device, steps)
    batches.sampler.set_epoch(1)

    def run():
        stop = train.StopRequest()
        try:
            train.train_epoch(parts.net, batches, parts, loop, 1, 0, EpochTotals(), stop)
        finally:
            stop.restore()

    return run


# ----------------------------------------------------------------------------- timing


def _seconds_per_call(function, args, device):
    for _ in range(args.warmup):
        function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / args.steps


def configurations(device, with_compile):
    """What the device supports: AMP and channels_last on CUDA, and on CPUs with native bf16, each with the frozen
    BatchNorm unfolded; then what train.py does there (the last of those, folded); on CUDA the same replayed as one
    CUDA graph (CUDA_GRAPHS); and with --compile the same compiled and, on CUDA, compiled with torch.compile's own
    CUDA graphs (mode reduce-overhead) and compiled inside train.py's graph (COMPILE and CUDA_GRAPHS)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        layouts = [(False, False), (True, False), (True, True)]
    else:
        layouts = [(False, False), (False, True)]
    variants = [Variant(amp, channels_last, fold=False) for amp, channels_last in layouts]
    folded = variants[-1]._replace(fold=True)
    variants.append(folded)
    cuda = device.type == "cuda"
    if cuda:
        variants.append(folded._replace(graphs=True))
    if with_compile:
        variants.append(folded._replace(compile="default"))
        if cuda:
            variants += [folded._replace(compile="reduce-overhead"), folded._replace(compile="default", graphs=True)]
    return variants


def train_py_variant(device):
    """The Variant train.py trains with on this device by default (no COMPILE, no CUDA_GRAPHS)."""
    return next(variant for variant in configurations(device, False) if variant.fold)


def make_images(folder, count, load_size, workers):
    """count NIH-like 1024 x 1024 PNGs (the demo phantoms, about 3 per patient) and their cache, made by running
    demo_data.py and cache.py as a user does."""
    for command in (
        ["demo_data.py", "--out", folder, "--patients", max(1, count // 3), "--size", SOURCE_SIZE],
        ["cache.py", "--data_dir", folder, "--size", load_size, "--workers", max(workers, 1)],
    ):
        subprocess.run([sys.executable, *map(str, command)], cwd=Path(__file__).parent, check=True, capture_output=True)
    return attach_image_paths(read_labels(folder / "Data_Entry_2017_v2020.csv"), folder)


def make_jpegs(folder, count, load_size, workers):
    """About `count` frontal JPEGs in CheXpert's layout (demo_data.py --layout chexpert) and their cache (cache.py
    --dataset chexpert); their rows as a run reads them (image_name: the cache's key)."""
    patients = max(1, count // 3)
    for command in (
        ["demo_data.py", "--layout", "chexpert", "--out", folder, "--patients", patients, "--size", CHEXPERT_SIZE],
        ["cache.py", "--dataset", "chexpert", "--data_dir", folder, "--size", load_size, "--workers", max(workers, 1)],
    ):
        subprocess.run([sys.executable, *map(str, command)], cwd=Path(__file__).parent, check=True, capture_output=True)
    return cache_films("chexpert", folder)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="synthetic 1024-px PNGs to generate (default: 300)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (a) (default: 2)")
    parser.add_argument("--image_size", type=int, default=224, help="network input (default: 224)")
    parser.add_argument("--load_size", type=int, default=256, help="cache / resize size (default: 256)")
    parser.add_argument(
        "--batch_size",
        type=int,
        nargs="+",
        default=[64],
        help="images per step, as train.py; (b) times each (default: 64; the first for (a))",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and configuration (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated timings; medians reported (default: 3)")
    parser.add_argument(
        "--trainable_layers",
        nargs="+",
        default=["layer4"],
        help="TRAINABLE_LAYERS values, as in train.py; (b) times "
        "each (default: layer4, the seed recipe; 'all' is the full fine-tune)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile, and on CUDA its CUDA graphs (minutes)"
    )
    add_device_flags(parser, amp=False)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, figures mean little")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.cpu_step = CPU_STEP
    args.batch_sizes, args.recipes = args.batch_size, args.trainable_layers
    args.batch_size, args.trainable_layers = args.batch_sizes[0], args.recipes[0]
    if args.quick:  # that it runs, in seconds: every size small
        args.images, args.batch_sizes, args.steps, args.warmup, args.rounds = 12, [4], 2, 1, 1
        args.batch_size = 4
        args.image_size, args.load_size, args.cpu_step = 64, 73, {"image_size": 64, "batch_size": 8}
    return args


def input_section(args, device):
    """(a): the input pipeline's figures, printed; a dict of them."""
    with tempfile.TemporaryDirectory() as folder:
        print(f"(a) input pipeline: generating synthetic {SOURCE_SIZE}-px PNGs and their {args.load_size}-px cache ...")
        labels = make_images(Path(folder), args.images, args.load_size, args.workers)
        raw, cached = input_rates(labels, folder, args)
        cached_images = CachedImages(cache_folder(folder, args.load_size), labels["image_name"])
        targets = labels[list(FINDINGS)].to_numpy()
        worker_aug_ms, worker_read_ms = worker_costs(cached_images, targets, args)
        device_aug_ms, device_batches_per_s = device_input_rates(cached_images, targets, args, device)
    with tempfile.TemporaryDirectory() as folder:
        print(f"    and {CHEXPERT_SIZE}-px JPEGs in CheXpert's layout and their cache ...")
        jpegs = make_jpegs(Path(folder), args.images, args.load_size, args.workers)
        jpeg_raw, jpeg_cached = input_rates(jpegs, folder, args)
    per_worker = max(args.workers, 1)
    print(
        f"    {len(labels)} images, {args.workers} workers, batch {args.batch_size}, worker augmentation at "
        f"{args.image_size} px, median of {args.rounds} alternated epochs each"
    )
    print(f"    decoding PNGs  {raw:9.1f} img/s  ({raw / per_worker:8.1f} per worker)")
    print(f"    reading cache  {cached:9.1f} img/s  ({cached / per_worker:8.1f} per worker)   {cached / raw:.1f}x")
    print(f"    decoding JPEGs {jpeg_raw:9.1f} img/s  ({jpeg_raw / per_worker:8.1f} per worker), {len(jpegs)} films")
    print(
        f"    their cache    {jpeg_cached:9.1f} img/s  ({jpeg_cached / per_worker:8.1f} per worker)   "
        f"{jpeg_cached / jpeg_raw:.1f}x"
    )
    print(
        f"    a worker's time per cached image: augmenting {worker_aug_ms:.3f} ms, only reading {worker_read_ms:.3f} ms"
    )
    print(
        f"    ({worker_aug_ms / worker_read_ms:.1f}x); device augmentation {device_aug_ms:.3f} ms per image on {device}"
    )
    print(f"    images held in {device} memory: {device_batches_per_s:.1f} batches/s of {args.batch_size}, augmented")
    return {
        "input_raw_img_s": raw,
        "input_cached_img_s": cached,
        "input_cached_over_raw": cached / raw,
        "input_jpeg_img_s": jpeg_raw,
        "input_jpeg_cached_img_s": jpeg_cached,
        "input_jpeg_cached_over_raw": jpeg_cached / jpeg_raw,
        "input_worker_ms_per_img": worker_aug_ms,
        "input_worker_ms_per_img_device_aug": worker_read_ms,
        "device_aug_ms_per_img": device_aug_ms,
        "on_device_batches_per_s": device_batches_per_s,
    }


def step_section(args, device, with_compile, cached):
    """(b) and (c): each Variant's step rates and projected NIH epoch (`cached`: this machine's cached input rate) for
    each batch size and recipe, printed; a row of figures per Variant."""
    rows = []
    for layers in args.recipes:
        for batch_size in args.batch_sizes:
            setting = argparse.Namespace(**{**vars(args), "batch_size": batch_size, "trainable_layers": layers})
            rows += _step_rows(setting, device, with_compile, cached)
    default = _train_py_row(rows, device)
    if default["host_share_of_step"] is not None and default["host_share_of_step"] >= HOST_BOUND:
        print(
            f"    the step is CPU-bound: the host needs {default['host_share_of_step']:.0%} of it to queue the kernels "
            "(launch overhead); a larger batch, or CUDA graphs (CUDA_GRAPHS; its graphs rows), helps"
        )
    return rows


def _step_rows(args, device, with_compile, cached):
    print(f"(b) model steps at {args.image_size} px, batch {args.batch_size}, trainable {args.trainable_layers}")
    print(
        f"    {'amp':>5} {'ch_last':>7} {'folded':>6} {'compile':>15} {'graphs':>6} {'train img/s':>12} "
        f"{'bare img/s':>11} {'loop/bare':>9} {'ops/step':>8} {'eval img/s':>11} {'host share':>10} {'NIH epoch':>10} "
        f"{'(c) w/ cache here':>18}"
    )
    rows = []
    for variant in configurations(device, with_compile):
        project, bare, evaluation, host_share, operations = step_rates(args, device, variant)
        epoch = NIH_TRAIN_IMAGES / project + NIH_VAL_IMAGES / evaluation
        epoch_here = NIH_TRAIN_IMAGES / min(project, cached) + NIH_VAL_IMAGES / min(evaluation, cached)
        rows.append(
            {
                **variant._asdict(),
                "batch_size": args.batch_size,
                "trainable_layers": args.trainable_layers,
                "train_img_s": project,
                "bare_train_img_s": bare,
                "eval_img_s": evaluation,
                "host_share_of_step": host_share,
                "ops_per_step": operations,
                "nih_epoch_s": epoch,
                "nih_epoch_with_this_input_s": epoch_here,
            }
        )
        share = "" if host_share is None else f"{host_share:.0%}"
        ops = "-" if operations is None else str(operations)
        print(
            f"    {variant.amp!s:>5} {variant.channels_last!s:>7} {variant.fold!s:>6} {variant.compile or '-':>15} "
            f"{variant.graphs!s:>6} "
            f"{project:12.1f} {bare:11.1f} {project / bare:9.2f} {ops:>8} {evaluation:11.1f} {share:>10} "
            f"{epoch / 60:9.1f}m {epoch_here / 60:17.1f}m"
        )
    return rows


def _train_py_row(rows, device):
    """The row of what train.py does on this device, for the first batch size and recipe."""
    variant = train_py_variant(device)._asdict()
    return next(row for row in rows if all(row[key] == value for key, value in variant.items()))


def cpu_section(args, device):
    """On a CPU, what the CPU itself does best (beside a GPU it is not what trains), printed; its figures."""
    if device.type != "cpu":
        return {"cpu_train_img_s_fp32": None, "cpu_train_img_s_amp": None}
    cpu_fp32, cpu_amp = cpu_train_rates(args)
    choice = f"{autocast_dtype(torch.device('cpu')) or 'fp32'} + channels_last"
    print(
        f"    CPU, all layers, {args.cpu_step['image_size']} px, batch {args.cpu_step['batch_size']}: "
        f"fp32 {cpu_fp32:.1f} img/s, {choice} {cpu_amp:.1f} img/s ({cpu_amp / cpu_fp32:.2f}x)"
    )
    return {"cpu_train_img_s_fp32": cpu_fp32, "cpu_train_img_s_amp": cpu_amp}


def loop_section(device):
    """(d): operations, reads and uploads per step of the loop, printed; their figures."""
    frozen_torchvision, frozen_ours = forward_operations(FrozenBatchNorm2d), forward_operations(FrozenBatchNorm)
    folded = forward_operations()
    unfolded_operations = loop_counts(fold=False)[0]
    operations, reads, uploads = loop_counts()
    gpu_syncs = gpu_syncs_per_step(device)
    print(
        f"(d) a forward pass under bf16 autocast (layer4 + head trainable): {frozen_torchvision} operations with "
        f"torchvision's FrozenBatchNorm2d, {frozen_ours} with model.FrozenBatchNorm, {folded} with it folded into "
        "the convolutions (train.py)"
    )
    print(
        f"    train.py's loop, per step: {unfolded_operations:.0f} operations unfolded, {operations:.0f} folded (what "
        f"train.py runs), {reads:.2f} reads back to the host, "
        f"{uploads:.2f} blocking uploads (train.SYNC_EVERY = {train.SYNC_EVERY})"
        + ("" if gpu_syncs is None else f"; on this GPU, synchronising operations per step: {gpu_syncs:.2f}")
    )
    return {
        "forward_ops_torchvision_frozen_bn": frozen_torchvision,
        "forward_ops_frozen_bn": frozen_ours,
        "forward_ops_folded": folded,
        "loop_ops_per_step_unfolded": unfolded_operations,
        "loop_ops_per_step": operations,
        "loop_reads_per_step": reads,
        "loop_uploads_per_step": uploads,
        "loop_gpu_syncs_per_step": gpu_syncs,
    }


def main(argv=None):
    args = parse_args(argv)
    device = select_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    with_compile = args.compile and compile_support(device)[0]
    if args.compile and not with_compile:
        print(f"    no torch.compile figures: {compile_support(device)[1]}")
    inputs = input_section(args, device)
    rows = step_section(args, device, with_compile, inputs["input_cached_img_s"])
    default = _train_py_row(rows, device)
    cpu = cpu_section(args, device)
    print(
        f"(c) one NIH epoch = {NIH_TRAIN_IMAGES:,} training + {NIH_VAL_IMAGES:,} validation images; 'w/ cache here' "
        f"is bounded by this machine's cached input rate ({args.workers} workers)"
    )
    loop = loop_section(device)
    results = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "settings": vars(args),
        **{key: inputs[key] for key in ("input_raw_img_s", "input_cached_img_s", "input_cached_over_raw")},
        **{key: default[key] for key in ("train_img_s", "bare_train_img_s", "eval_img_s", "host_share_of_step")},
        "nih_epoch_s": default["nih_epoch_s"],
        **cpu,
        **inputs,
        **loop,
        "configurations": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
