"""Throughput, side by side in one run, timed as train.py trains, on synthetic NIH-like PNGs that it generates.

    python bench.py [--images 300] [--workers 2] [--image_size 224] [--batch_size 64] [--json bench.json]
    python bench.py --quick --json bench.json      # seconds, for CI
    python bench.py --compile --batch_size 64 256 --trainable_layers layer4 all   # adds compiled (and graphed) rows
    python bench.py --backbone resnet50 eva_x_small --trainable_layers layer4 all  # EVA-X's ViT-S beside ResNet-50

(a) input pipeline images/s: decoding the PNGs vs reading the cache, same worker augmentation, same worker count,
    and the same for JPEGs in CheXpert's layout (CHEXPERT_SIZE px, as CheXpert-v1.0-small) and their cache;
    a worker's milliseconds per image with augmentation in the workers vs on the device (the worker only reads);
    the device augmentation's cost per image, and batches/s drawn from images held in device memory;
(b) training-step and evaluation images/s of the real model on this device, in the configurations the device
    supports (fp32, AMP, channels_last; the frozen blocks' BatchNorm unfolded and folded into their convolutions,
    as train.py builds them; on CUDA the whole step replayed as one CUDA graph, as CUDA_GRAPHS does; with --compile,
    torch.compile, and on CUDA its own CUDA graphs (mode reduce-overhead) and compiled inside train.py's graph), for
    each --batch_size and --trainable_layers, with the operations of one step (eager rows): train.py's own loop
    (train_epoch over images held in device memory, the default on a GPU: no host-to-device copy per step, fused
    AdamW, cuDNN benchmark) against a bare forward/backward/step loop of the same model and batch; on a GPU, the
    share of a step the host needs to queue its kernels (near 100%: the step is CPU-bound by launch overhead, and a
    faster GPU would not help); on the CPU, fp32 against the project's CPU choice (bf16 autocast + channels_last
    where the CPU has native bf16);
(c) the projected time of one NIH epoch (training and validation) for each configuration;
(d) what a training step asks of the device, counted on any device: operations of a forward pass under bf16
    autocast (torchvision's FrozenBatchNorm2d, frozen_batchnorm.FrozenBatchNorm, and the BatchNorm folded into the
    convolution), and per step of train.py's loop the operations (unfolded and folded) and the reads back to the host
    (item, bool, tolist: each one a wait for a GPU) and blocking uploads.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torchvision.ops import FrozenBatchNorm2d

from cxr14.configurator import add_device_flags
from cxr14.devices import (
    autocast_dtype,
    compile_support,
    cpu_has_native_bf16,
    device_name,
    select_device,
)
from cxr14.frozen_batchnorm import FrozenBatchNorm
from cxr14.loop import (
    SYNC_EVERY,
)
from cxr14.pixels import CachedImages, FilmImages, cache_folder

# train.py's own loop, from the package (cxr14/loop.py), so that the figures are those of the code that trains, not
# of a copy; the demo data and its cache it makes by running demo_data.py and cache.py
from cxr14.timing import (
    HOST_BOUND,
    Variant,
    cpu_train_rates,
    device_input_rates,
    epoch_rate,
    forward_operations,
    gpu_syncs_per_step,
    input_loader,
    loop_counts,
    step_rates,
    worker_costs,
)
from cxr14.training_films import cache_films
from dataset import FINDINGS, attach_image_paths, read_labels
from model import BACKBONES

NIH_TRAIN_IMAGES = 77_872  # train_val_list.txt (86,524) less a 10% validation split by patient
NIH_VAL_IMAGES = 8_652  # that validation split: evaluated after every epoch
SOURCE_SIZE = 1024  # NIH films are 1024 x 1024 PNGs
CHEXPERT_SIZE = 320  # CheXpert-v1.0-small's JPEGs: about 320 px on their shorter side
CPU_STEP = {"image_size": 128, "batch_size": 32}  # the CPU fp32-vs-AMP step: all layers trainable (the demo, CI)


def input_rates(labels, folder, args, dataset="nih"):
    """Median images/s of the PNG path and the cache path, their epochs alternated (epoch 0 starts workers)."""
    targets = labels[list(FINDINGS)]
    raw = input_loader(FilmImages(labels["path"], args.load_size), targets, args)
    cache = CachedImages(cache_folder(folder, args.load_size, dataset), labels["image_name"])
    cached = input_loader(cache, targets, args)
    rates = {"raw": [], "cached": []}
    for epoch in range(args.rounds + 1):
        for name, loader in (("raw", raw), ("cached", cached)):
            rate = epoch_rate(loader, epoch)
            if epoch:
                rates[name].append(rate)
    return statistics.median(rates["raw"]), statistics.median(rates["cached"])


# ----------------------------------------------------------------------------- (b) model steps


# ----------------------------------------------------------------------------- (a') where augmentation runs


# ----------------------------------------------------------------------------- (d) what a step asks of the device


# ----------------------------------------------------------------------------- timing


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
        "--backbone",
        nargs="+",
        default=["resnet50"],
        help="BACKBONE values, as in train.py; (b) times each (default: resnet50; eva_x_small is EVA-X's ViT-S/16). "
        "A ViT or timm network takes torchvision's block names as its last quarter of blocks (layer4 -> 3 of 12)",
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
        jpeg_raw, jpeg_cached = input_rates(jpegs, folder, args, "chexpert")
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
    for backbone in args.backbone:
        for layers in args.recipes:
            for batch_size in args.batch_sizes:
                chosen = {"batch_size": batch_size, "trainable_layers": recipe_of(backbone, layers)}
                setting = argparse.Namespace(**{**vars(args), **chosen, "backbone": backbone})
                rows += _step_rows(setting, device, with_compile, cached)
    default = _train_py_row(rows, device)
    if default["host_share_of_step"] is not None and default["host_share_of_step"] >= HOST_BOUND:
        print(
            f"    the step is CPU-bound: the host needs {default['host_share_of_step']:.0%} of it to queue the kernels "
            "(launch overhead); a larger batch, or CUDA graphs (CUDA_GRAPHS; its graphs rows), helps"
        )
    return rows


def recipe_of(backbone, layers):
    """TRAINABLE_LAYERS for `backbone`: torchvision's block names as they are for torchvision's networks; for the
    others (which have no layer4) the last quarter of a ViT's twelve blocks, as layer4 is ResNet-50's last stage."""
    if backbone in BACKBONES or layers in ("all", "head") or layers.isdigit():
        return layers
    return "3"


def _step_rows(args, device, with_compile, cached):
    print(
        f"(b) {args.backbone} model steps at {args.image_size} px, batch {args.batch_size}, trainable "
        f"{args.trainable_layers}"
    )
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
                "backbone": args.backbone,
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
    """The row of what train.py does on this device, for the first backbone, batch size and recipe."""
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
        f"torchvision's FrozenBatchNorm2d, {frozen_ours} with frozen_batchnorm.FrozenBatchNorm, {folded} with it "
        "folded into the convolutions (train.py)"
    )
    print(
        f"    train.py's loop, per step: {unfolded_operations:.0f} operations unfolded, {operations:.0f} folded (what "
        f"train.py runs), {reads:.2f} reads back to the host, "
        f"{uploads:.2f} blocking uploads (SYNC_EVERY = {SYNC_EVERY})"
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
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
