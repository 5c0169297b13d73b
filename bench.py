"""Throughput, side by side in one run, on synthetic 1024 x 1024 NIH-like PNGs that it generates.

    python bench.py [--images 300] [--workers 2] [--image_size 224] [--batch_size 16] [--json bench.json]
    python bench.py --quick --json bench.json      # seconds, for CI

(a) input pipeline images/s: decoding the PNGs vs reading the cache, same worker augmentation, same worker count;
    a worker's milliseconds per image with augmentation in the workers vs on the device (the worker only reads);
    the device augmentation's cost per image, and batches/s drawn from images held in device memory;
(b) training-step and evaluation images/s of the real model on this device, in the configurations the device
    supports (fp32, AMP, channels_last, torch.compile), and the project's training loop (train.train_epoch, with
    device augmentation) against a bare forward/backward/step loop of the same model and batch; and on the CPU,
    fp32 against the project's CPU choice (bf16 autocast + channels_last where the CPU has native bf16);
(c) the projected time of one NIH training epoch for each configuration.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from cache import CachedImages, DeviceBatches, build_cache, cache_folder, images_on_device
from dataset import FINDINGS, ChestXrayDataset, PngImages, SeededSampler, attach_image_paths, read_labels
from demo_data import write_demo
from model import autocast_dtype, build_model, cpu_has_native_bf16, select_device
from train import StopRequest, model_input, train_epoch
from transforms import WorkerAugment, augment_batch, augmentation_params, normalize

NIH_TRAIN_IMAGES = 77_872  # train_val_list.txt (86,524) less a 10% validation split by patient
SOURCE_SIZE = 1024  # NIH films are 1024 x 1024 PNGs
CPU_STEP = {"image_size": 128, "batch_size": 32}  # the CPU fp32-vs-AMP step: all layers trainable (the demo, CI)
WORKER_IMAGES = 256  # images per timing of a worker's cost


def input_loader(images, targets, args):
    """The training DataLoader over `images` as train.py builds it (seeded sampler, persistent workers)."""
    dataset = ChestXrayDataset(images, targets, WorkerAugment(args.image_size))
    sampler = SeededSampler(DistributedSampler(dataset, 1, 0, seed=0), seed=0)
    workers = args.workers
    return DataLoader(
        dataset,
        batch_size=args.input_batch_size,
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
    raw = input_loader(PngImages(labels["path"], args.load_size), targets, args)
    cached = input_loader(CachedImages(cache_folder(folder, args.load_size), labels["image_name"]), targets, args)
    rates = {"raw": [], "cached": []}
    for epoch in range(args.rounds + 1):
        for name, loader in (("raw", raw), ("cached", cached)):
            rate = epoch_rate(loader, epoch)
            if epoch:
                rates[name].append(rate)
    return statistics.median(rates["raw"]), statistics.median(rates["cached"])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rates(args, device, config):
    """(project loop, bare loop, eval) images/s for one configuration of the model."""
    dtype = autocast_dtype(device, config["amp"])
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    model = build_model(len(FINDINGS), "none", args.trainable_layers, 0.5).to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((len(FINDINGS),), 5.0, device=device))
    net = torch.compile(model) if config["compile"] else model
    images = torch.randint(0, 256, (args.batch_size, 1, args.load_size, args.load_size), dtype=torch.uint8)
    targets = (torch.rand(args.batch_size, len(FINDINGS)) < 0.2).float()
    seeds = torch.arange(args.batch_size)
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    batches = [(images, targets, seeds)] * max(args.warmup, args.steps)
    context = loop_context(device, dtype, config["channels_last"], args.image_size)
    inputs = normalize(images[..., : args.image_size, : args.image_size].to(device), config["channels_last"])
    labels = targets.to(device)

    def project_loop():  # train.py's own epoch loop: batch preparation, loss checks, progress bar included
        train_epoch(net, batches[: args.steps], optimizer, scaler, criterion, context, 1, 0, _totals(), stop)

    def bare_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(net(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    stop = StopRequest()
    try:
        train_epoch(net, batches[: args.warmup], optimizer, scaler, criterion, context, 0, 0, _totals(), stop)
        project, bare = [], []
        for _ in range(args.rounds):  # alternated, so that drifts of the machine touch both alike
            project.append(args.steps * args.batch_size / _seconds(project_loop, device))
            bare.append(args.batch_size / _seconds_per_call(bare_step, args, device))
    finally:
        stop.restore()
    net.eval()

    def eval_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net(inputs)

    evaluation = args.batch_size / _seconds_per_call(eval_step, args, device)
    return statistics.median(project), statistics.median(bare), evaluation


def loop_context(device, dtype, channels_last, image_size):
    """train.py's context for train_epoch / model_input: one process, device augmentation, no progress bar."""
    return {
        "device": device,
        "dtype": dtype,
        "world_size": 1,
        "rank": 1,
        "channels_last": channels_last,
        "augment_on": "device",
        "image_size": image_size,
    }


def cpu_train_rates(args):
    """(fp32, the project's CPU choice) images/s of a bare training step on the CPU: all layers trainable, CPU_STEP
    (the choice: bf16 autocast + channels_last where the CPU multiplies bf16 natively, as train.py does)."""
    cpu = torch.device("cpu")
    return _cpu_step_rate(None, torch.contiguous_format, args), _cpu_step_rate(
        autocast_dtype(cpu), torch.channels_last, args
    )


def _cpu_step_rate(dtype, layout, args):
    size, batch = CPU_STEP["image_size"], CPU_STEP["batch_size"]
    model = build_model(len(FINDINGS), "none", "all", 0.5).to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    targets = (torch.rand(batch, len(FINDINGS)) < 0.2).float()

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).float(), targets)
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
            for start in range(0, WORKER_IMAGES, args.input_batch_size):
                items = range(start, min(start + args.input_batch_size, WORKER_IMAGES))
                default_collate([dataset[(item % len(dataset), item)] for item in items])
            times[name].append((time.perf_counter() - started) / WORKER_IMAGES * 1000)
    return statistics.median(times["workers"]), statistics.median(times["device"])


def device_input_rates(cached_images, targets, args, device):
    """(device augmentation ms per image, batches/s drawn from images held in device memory and made ready for
    the model: gather, augment, normalise)."""
    on_device = images_on_device(cached_images, device)
    batch = on_device[torch.arange(args.input_batch_size, device=device) % len(on_device)].unsqueeze(1)
    params = torch.from_numpy(augmentation_params(np.arange(args.input_batch_size), args.load_size)).to(device)
    augment_seconds = _seconds_per_call(lambda: augment_batch(batch, params, args.image_size), args, device)
    sampler = SeededSampler(DistributedSampler(range(len(on_device)), 1, 0, seed=0), seed=0)
    batches = DeviceBatches(on_device, targets, sampler, args.input_batch_size, drop_last=True)
    context = loop_context(device, None, device.type in ("cuda", "cpu"), args.image_size)

    def epoch():
        sampler.set_epoch(1)
        for images, _, seeds in batches:
            model_input(images, seeds, context)

    rate = len(batches) * args.rounds / sum(_seconds(epoch, device) for _ in range(args.rounds))
    return augment_seconds / args.input_batch_size * 1000, rate


def _totals():
    return {"loss_sum": 0.0, "images": 0}


def _seconds(function, device):
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


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
    """What the device supports: AMP and channels_last on CUDA, and on CPUs with native bf16; the last row is what
    train.py does there."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        configs = [(False, False, False), (True, False, False), (True, True, False)]
    else:
        configs = [(False, False, False), (False, True, False)]
    if with_compile:
        configs.append((configs[-1][0], configs[-1][1], True))
    return [{"amp": amp, "channels_last": last, "compile": comp} for amp, last, comp in configs]


def make_images(folder, count, load_size, workers):
    """count NIH-like 1024 x 1024 PNGs (the demo phantoms, about 3 per patient) and their cache."""
    write_demo(folder, patients=max(1, count // 3), size=SOURCE_SIZE)
    build_cache(folder, load_size, workers=workers)
    return attach_image_paths(read_labels(folder / "Data_Entry_2017_v2020.csv"), folder)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="synthetic 1024-px PNGs to generate (default: 300)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (a) (default: 2)")
    parser.add_argument("--image_size", type=int, default=224, help="network input (default: 224)")
    parser.add_argument("--load_size", type=int, default=256, help="cache / resize size (default: 256)")
    parser.add_argument("--batch_size", type=int, default=16, help="model steps (default: 16; 64+ on a GPU)")
    parser.add_argument("--input_batch_size", type=int, default=64, help="input pipeline, as train.py (default: 64)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and configuration (default: 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated timings; medians reported (default: 3)")
    parser.add_argument("--trainable_layers", default="layer4", help="as in train.py (default: layer4)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), or a torch device")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, figures mean little")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:  # the input figures keep 224 of 256 px: a worker's cost depends on the image size
        args.images, args.batch_size, args.steps, args.warmup, args.rounds, args.input_batch_size = 12, 4, 2, 1, 1, 8
    return args


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv=None):
    args = parse_args(argv)
    device = select_device(args.device)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        print(f"(a) input pipeline: generating synthetic {SOURCE_SIZE}-px PNGs and their {args.load_size}-px cache ...")
        labels = make_images(Path(folder), args.images, args.load_size, args.workers)
        raw, cached = input_rates(labels, folder, args)
        cached_images = CachedImages(cache_folder(folder, args.load_size), labels["image_name"])
        targets = labels[list(FINDINGS)].to_numpy()
        worker_aug_ms, worker_read_ms = worker_costs(cached_images, targets, args)
        device_aug_ms, device_batches = device_input_rates(cached_images, targets, args, device)
    per_worker = max(args.workers, 1)
    print(
        f"    {len(labels)} images, {args.workers} workers, batch {args.input_batch_size}, worker augmentation at "
        f"{args.image_size} px, median of {args.rounds} alternated epochs each"
    )
    print(f"    decoding PNGs  {raw:9.1f} img/s  ({raw / per_worker:8.1f} per worker)")
    print(f"    reading cache  {cached:9.1f} img/s  ({cached / per_worker:8.1f} per worker)   {cached / raw:.1f}x")
    print(
        f"    a worker's time per cached image: augmenting {worker_aug_ms:.3f} ms, only reading {worker_read_ms:.3f} ms"
    )
    print(
        f"    ({worker_aug_ms / worker_read_ms:.1f}x); device augmentation {device_aug_ms:.3f} ms per image on {device}"
    )
    print(f"    images held in {device} memory: {device_batches:.1f} batches/s of {args.input_batch_size}, augmented")

    print(f"(b) model steps at {args.image_size} px, batch {args.batch_size}, trainable {args.trainable_layers}")
    print(
        f"    {'amp':>5} {'ch_last':>7} {'compile':>7} {'train img/s':>12} {'bare img/s':>11} {'loop/bare':>9} "
        f"{'eval img/s':>11} {'NIH epoch':>10} {'(c) w/ cache here':>18}"
    )
    rows = []
    for config in configurations(device, args.compile):
        project, bare, evaluation = step_rates(args, device, config)
        epoch_gpu = NIH_TRAIN_IMAGES / project
        epoch_here = NIH_TRAIN_IMAGES / min(project, cached)
        rows.append(
            {
                **config,
                "train_img_s": project,
                "bare_train_img_s": bare,
                "eval_img_s": evaluation,
                "nih_epoch_s": epoch_gpu,
                "nih_epoch_with_this_input_s": epoch_here,
            }
        )
        print(
            f"    {config['amp']!s:>5} {config['channels_last']!s:>7} {config['compile']!s:>7} {project:12.1f} "
            f"{bare:11.1f} {project / bare:9.2f} {evaluation:11.1f} {epoch_gpu / 60:9.1f}m {epoch_here / 60:17.1f}m"
        )
    default = rows[-1 - args.compile]  # what train.py does on this device
    cpu_fp32, cpu_amp = cpu_train_rates(args)
    choice = f"{autocast_dtype(torch.device('cpu')) or 'fp32'} + channels_last"
    print(
        f"    CPU, all layers, {CPU_STEP['image_size']} px, batch {CPU_STEP['batch_size']}: fp32 {cpu_fp32:.1f} img/s, "
        f"{choice} {cpu_amp:.1f} img/s ({cpu_amp / cpu_fp32:.2f}x)"
    )
    print(
        f"(c) one NIH epoch = {NIH_TRAIN_IMAGES:,} training images; 'w/ cache here' is bounded by this machine's "
        f"cached input rate ({args.workers} workers)"
    )
    results = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "settings": vars(args),
        "input_raw_img_s": raw,
        "input_cached_img_s": cached,
        "input_cached_over_raw": cached / raw,
        "train_img_s": default["train_img_s"],
        "bare_train_img_s": default["bare_train_img_s"],
        "eval_img_s": default["eval_img_s"],
        "cpu_train_img_s_fp32": cpu_fp32,
        "cpu_train_img_s_amp": cpu_amp,
        "input_worker_ms_per_img": worker_aug_ms,
        "input_worker_ms_per_img_device_aug": worker_read_ms,
        "device_aug_ms_per_img": device_aug_ms,
        "on_device_batches_per_s": device_batches,
        "configurations": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
