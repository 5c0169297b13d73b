"""What bench.py measures, timed as train.py trains: images/s of the input pipeline (decoding against the cache, a
worker's cost, batches from device memory), of train.py's own loop (cxr14/loop.py) against a bare step and an
evaluation pass, the host's share of a step on a GPU, and the operations, reads and uploads a step asks of the
device. bench.py chooses what to time and prints the tables.
"""

import argparse
import statistics
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from cxr14.devices import (
    autocast_dtype,
    synchronize,
    timed,
)
from cxr14.frozen_batchnorm import FrozenBatchNorm
from cxr14.loaders import ChestXrayDataset, DeviceBatches, SeededSampler

# train.py's own loop, from the package (cxr14/loop.py), so that the figures are those of the code that trains, not
# of a copy; the demo data and its cache it makes by running demo_data.py and cache.py
from cxr14.loop import (
    LabelledBCE,
    Loop,
    StopRequest,
    augmentation_on_device,
    fused_optimizer,
    graphed_step,
    loss_scaler,
    model_input,
    optimizer_step,
    ready_to_train,
    train_epoch,
)
from cxr14.pixels import images_on_device
from cxr14.run_folder import EpochTotals, Training
from dataset import FINDINGS, pos_weight_from_counts
from model import build_model, cast_frozen, parameter_groups
from transforms import WorkerAugment, augment_batch, augmentation_params, normalize

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


class Variant(NamedTuple):
    """One configuration of the training step that (b) times."""

    amp: bool
    channels_last: bool
    compile: str = ""  # a torch.compile mode ("default"; "reduce-overhead": CUDA graphs), or "" for eager
    fold: bool = True  # the frozen blocks' BatchNorm folded into their convolutions (model.fold_frozen_batchnorm)
    graphs: bool = False  # train.py's CUDA_GRAPHS: the whole step replayed as one CUDA graph (cuda_graphs.py)


def training_parts(args, device, variant):
    """(a run_folder.Training, the autocast dtype) as train.build_training makes it (AdamW, the pos_weight-ed loss),
    for random weights in the variant's precision and layout, the targets' rate of device_batches."""
    dtype = autocast_dtype(device, variant.amp)
    backbone = getattr(args, "backbone", "resnet50")
    layers = args.trainable_layers
    net = build_model(len(FINDINGS), "none", layers, backbone=backbone, fold=variant.fold, image_size=args.image_size)
    counts = np.full(len(FINDINGS), 20), np.full(len(FINDINGS), 80)
    pos_weight = pos_weight_from_counts(*counts)
    net = ready_to_train(net, counts, pos_weight, device, dtype, variant.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(net, 1e-5, 1e-4), lr=1e-5, fused=fused_optimizer(device))
    criterion = LabelledBCE(pos_weight=torch.tensor(pos_weight, dtype=torch.float32, device=device))
    return Training(net, optimizer, None, loss_scaler(device, dtype), criterion), dtype


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
    loop = Loop(device, dtype, variant.channels_last, image_size=args.image_size, show_progress=False)
    loop.graphed = graphed_step(variant.graphs, net, parts, loop, print)
    warmup, measured = device_batches(args, device, args.warmup), device_batches(args, device, args.steps)
    inputs = normalize(
        torch.randint(0, 256, (args.batch_size, 1, args.image_size, args.image_size), dtype=torch.uint8, device=device),
        variant.channels_last,
    )
    labels = (torch.rand(args.batch_size, len(FINDINGS), device=device) < 0.2).float()
    films = torch.randint(
        0, 256, (args.batch_size, 1, args.load_size, args.load_size), dtype=torch.uint8, device=device
    )
    params = augmentation_on_device(torch.arange(args.batch_size), args.load_size, loop)

    def project_loop(batches, epoch):
        batches.sampler.set_epoch(epoch)
        train_epoch(net, batches, parts, loop, epoch, 0, EpochTotals(), stop)

    def bare_step():  # train.py's step on one ready batch: no sampling, augmentation (but in a graph) or bookkeeping
        if loop.graphed is not None:
            loop.graphed(films, params, labels)
        else:
            optimizer_step(net, inputs, labels, parts, loop)

    stop = StopRequest()
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
    loop = Loop(device, None, device.type in ("cuda", "cpu"), image_size=args.image_size, show_progress=False)

    def epoch():
        sampler.set_epoch(1)
        for images, _, seeds in batches:
            model_input(images, augmentation_on_device(seeds, images.shape[-1], loop), loop)

    rate = len(batches) * args.rounds / sum(timed(epoch, device) for _ in range(args.rounds))
    return augment_seconds / args.batch_size * 1000, rate


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
    args = argparse.Namespace(trainable_layers="layer4", batch_size=batch_size, load_size=size + 8, image_size=size)
    parts, dtype = training_parts(args, device, Variant(amp=True, channels_last=device.type != "mps", fold=fold))
    loop = Loop(device, dtype, device.type != "mps", image_size=size, show_progress=False)
    batches = device_batches(args, device, steps)
    batches.sampler.set_epoch(1)

    def run():
        stop = StopRequest()
        try:
            train_epoch(parts.net, batches, parts, loop, 1, 0, EpochTotals(), stop)
        finally:
            stop.restore()

    return run


def _seconds_per_call(function, args, device):
    for _ in range(args.warmup):
        function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / args.steps
