"""Throughput, side by side in one run, on synthetic 1024 x 1024 NIH-like PNGs that it generates.

    python bench.py [--images 300] [--workers 2] [--image_size 224] [--batch_size 16] [--json bench.json]
    python bench.py --quick --json bench.json      # seconds, for CI

(a) input pipeline images/s: decoding the PNGs vs reading the cache, same transforms, same worker count;
(b) training-step and evaluation images/s of the real model on this device, in the configurations the device
    supports (fp32, AMP, channels_last, torch.compile), and the project's training loop (train.train_epoch)
    against a bare forward/backward/step loop of the same model and batch;
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

import torch
from torch.utils.data import DataLoader, DistributedSampler

from cache import CachedImages, build_cache, cache_folder
from dataset import FINDINGS, ChestXrayDataset, PngImages, SeededSampler, attach_image_paths, read_labels
from demo_data import write_demo
from model import autocast_dtype, build_model, select_device
from train import StopRequest, train_epoch
from transforms import prepare_batch, train_transform

NIH_TRAIN_IMAGES = 77_872  # train_val_list.txt (86,524) less a 10% validation split by patient
SOURCE_SIZE = 1024  # NIH films are 1024 x 1024 PNGs


def input_loader(images, targets, args):
    """The training DataLoader over `images` as train.py builds it (seeded sampler, persistent workers)."""
    dataset = ChestXrayDataset(images, targets, train_transform(args.image_size))
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
    count = sum(len(batch) for batch, _ in loader)
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
    images = torch.randint(0, 256, (args.batch_size, 1, args.image_size, args.image_size), dtype=torch.uint8)
    targets = (torch.rand(args.batch_size, len(FINDINGS)) < 0.2).float()
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    batches = [(images, targets)] * max(args.warmup, args.steps)

    context = {"device": device, "dtype": dtype, "world_size": 1, "rank": 1, "channels_last": config["channels_last"]}
    inputs = prepare_batch(images, device, config["channels_last"])
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
    """What the device supports: AMP and channels_last pay on CUDA; on the CPU fp32 is the baseline."""
    if device.type == "cuda":
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
    if args.quick:
        args.images, args.image_size, args.load_size, args.batch_size, args.steps, args.warmup = 12, 64, 72, 4, 2, 1
        args.rounds, args.input_batch_size = 1, 4
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
    per_worker = max(args.workers, 1)
    print(
        f"    {len(labels)} images, {args.workers} workers, batch {args.input_batch_size}, train transform at "
        f"{args.image_size} px, median of {args.rounds} alternated epochs each"
    )
    print(f"    decoding PNGs  {raw:9.1f} img/s  ({raw / per_worker:8.1f} per worker)")
    print(f"    reading cache  {cached:9.1f} img/s  ({cached / per_worker:8.1f} per worker)   {cached / raw:.1f}x")

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
    default = rows[2] if device.type == "cuda" else rows[0]  # what train.py does on this device
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
        "configurations": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
