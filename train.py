"""Train a ResNet-50 to read chest X-rays (NIH ChestX-ray14: 14 findings, multi-label).

    python train.py                              # the settings below; edit them, or override:
    python train.py --epochs 3 --batch_size=32   # any setting, lower-case, as --name value or --name=value
    python train.py config/demo.py               # a file of NAME = value lines, applied before --name flags
    torchrun --nproc_per_node=4 train.py         # several GPUs (DistributedDataParallel)

Every epoch writes OUT_DIR/epoch_NN.pth and metrics.csv; best.pth is the epoch of lowest validation loss,
best_auroc.pth the one of highest mean validation AUROC. Ctrl-C (or SIGTERM) saves OUT_DIR/interrupted.pth;
--resume last continues exactly where the run stopped.
"""

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from cache import CachedImages, cache_folder
from dataset import (
    FINDINGS,
    ChestXrayDataset,
    DataError,
    PngImages,
    SeededSampler,
    attach_image_paths,
    count_positives,
    find_label_file,
    make_split,
    pos_weight_from_counts,
    read_labels,
    read_split,
    save_split,
)
from metrics import auroc_per_finding, mean_auroc
from model import (
    ARCHITECTURE,
    CheckpointError,
    autocast_dtype,
    build_model,
    copy_checkpoint,
    init_head_bias,
    load_checkpoint,
    predict_logits,
    save_checkpoint,
    select_device,
    unwrap,
)
from transforms import eval_transform, prepare_batch, train_transform

# ----------------------------------------------------------------------------- settings (python train.py --help)
DATA_DIR = "data/nih"  # folder with the label CSV and the images (NIH archive layout or flat)
CSV = ""  # label file; empty: the one Data_Entry_2017*.csv below DATA_DIR
IMAGE_SIZE = 224  # side of the square crop the network sees
LOAD_SIZE = 256  # images are letterboxed to this square on load; training crops are taken from it
CACHE = "auto"  # "auto": DATA_DIR/cache_<LOAD_SIZE> when built (python cache.py), "off" (read PNGs), or a folder
BATCH_SIZE = 64  # images per step on each GPU
EPOCHS = 10  # passes over the training split
LEARNING_RATE = 1e-5  # AdamW learning rate; low, as suits fine-tuning pretrained weights
WEIGHT_DECAY = 1e-4  # AdamW decoupled weight decay
DROPOUT = 0.5  # dropout before the final Linear layer
PRETRAINED = "imagenet"  # "imagenet" (torchvision download), "none" (random init), or a ResNet-50 weights file
TRAINABLE_LAYERS = "layer4"  # blocks that train besides the head: comma list of stem,layer1..layer4, or "all"
POS_WEIGHT = "ratio"  # pos_weight per finding from the training split: "ratio" (neg/pos), "sqrt" or "none"
POS_WEIGHT_CAP = 0.0  # upper bound on any pos_weight; 0: none
LR_PATIENCE = 1  # epochs without a lower validation loss before the learning rate drops
LR_FACTOR = 0.1  # the factor the learning rate is multiplied by then
EARLY_STOPPING_PATIENCE = 3  # epochs without a lower validation loss before training stops; 0: never stop early
VAL_FRACTION = 0.1  # share of the (train_val) patients held out for validation
TEST_FRACTION = 0.2  # share of patients held out for testing when there are no official split lists
DROP_MISSING_IMAGES = False  # train on the images present when some in the CSV are missing (else an error)
NUM_WORKERS = -1  # DataLoader worker processes per GPU; -1: the CPU cores per GPU less one
AMP = True  # mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling
CHANNELS_LAST = True  # NHWC memory layout on CUDA (faster convolutions on tensor cores)
COMPILE = False  # torch.compile the model (faster steps after a slow first one)
SEED = 0  # seeds the split, the data order, augmentation and dropout
DEVICE = "auto"  # "auto" (cuda, else mps, else cpu), or a torch device such as "cuda:1" or "cpu"
OUT_DIR = "checkpoints/resnet50"  # the run folder: checkpoints, metrics.csv, split.csv, config.json, plots
RESUME = ""  # "" (a new run), "last" (the newest checkpoint in OUT_DIR) or a checkpoint path
# -----------------------------------------------------------------------------


def settings():
    """{NAME: (default, comment)} for the constants above, read from this file so --help matches it."""
    source = Path(__file__).read_text(encoding="utf-8")
    comments = re.findall(r"^([A-Z_]+) = .*?  # (.*)$", source, re.MULTILINE)
    return {name: (globals()[name], comment) for name, comment in comments}


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_config(argv):
    """The settings with config-file and command-line overrides applied, typed from their defaults."""
    known = settings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("config_files", nargs="*", metavar="CONFIG.py", help="files of NAME = value lines")
    for name, (default, comment) in known.items():
        kind = _parse_bool if isinstance(default, bool) else type(default)
        metavar = type(default).__name__.upper()
        parser.add_argument(f"--{name.lower()}", type=kind, metavar=metavar, help=f"{comment} (default: {default!r})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown setting(s) {unknown}. Valid: {', '.join('--' + n.lower() for n in known)}")
    config = {name: default for name, (default, _) in known.items()}
    for path in args.config_files:
        if not Path(path).is_file():
            parser.error(f"config file not found: {path} (settings are given as --name value; config/demo.py is one)")
        overrides = {}
        exec(Path(path).read_text(encoding="utf-8"), {}, overrides)
        bad = [name for name in overrides if name not in known and not name.startswith("_")]
        if bad:
            parser.error(f"{path}: unknown setting(s) {bad}. Valid: {', '.join(known)}")
        for name, value in overrides.items():
            default = known.get(name, (value,))[0]
            if not isinstance(value, type(default)) and not (type(default) is float and type(value) is int):
                parser.error(f"{path}: {name} = {value!r} should be a {type(default).__name__}, like {default!r}")
        config.update({name: value for name, value in overrides.items() if name in known})
    for name in known:
        if getattr(args, name.lower()) is not None:
            config[name] = getattr(args, name.lower())
    return config


# ----------------------------------------------------------------------------- distributed helpers


def setup_distributed(device_name):
    """(rank, world_size, device); under torchrun one process per GPU (NCCL) or per CPU process (gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = select_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo")  # Windows: gloo
    return dist.get_rank(), world_size, device


def gather_rows(tensor, device, world_size):
    """Concatenate a tensor's rows from every rank (each rank holds the same number of rows)."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor, device=device) for _ in range(world_size)]
    dist.all_gather(parts, tensor.to(device))
    return torch.cat(parts).cpu()


def any_rank(flag, device, world_size):
    """True on every rank if `flag` is true on any: ranks must stop at the same step or they deadlock."""
    if world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and save; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        names = [name for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)]  # Windows: no SIGTERM to catch
        self.previous = {name: signal.signal(getattr(signal, name), self._handle) for name in names}

    def restore(self):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


# ----------------------------------------------------------------------------- data


def load_split_labels(config, run_dir, resuming):
    """Labels with image paths and the split per row: made and saved for a new run, read back on resume."""
    csv_path = find_label_file(config["DATA_DIR"], config["CSV"])
    labels = attach_image_paths(read_labels(csv_path), config["DATA_DIR"], config["DROP_MISSING_IMAGES"])
    if resuming:
        saved = read_split(run_dir / "split.csv").set_index("image_name")["split"]
        return labels, labels["image_name"].map(saved)
    split = make_split(labels, csv_path, config["VAL_FRACTION"], config["TEST_FRACTION"], config["SEED"])
    return labels, split


def find_cache(config):
    """The cache folder to read, or None to decode the PNGs."""
    if config["CACHE"] == "off":
        return None
    if config["CACHE"] != "auto":
        return Path(config["CACHE"])
    folder = cache_folder(config["DATA_DIR"], config["LOAD_SIZE"])
    return folder if (folder / "index.csv").is_file() else None


def make_loaders(config, labels, split, device, rank, world_size):
    cache = find_cache(config)

    def subset(name, transform):
        rows = labels[split == name]
        if cache is None:
            images = PngImages(rows["path"], config["LOAD_SIZE"])
        else:
            images = CachedImages(cache, rows["image_name"])
            if images.size != config["LOAD_SIZE"]:
                raise DataError(f"the cache {cache} holds {images.size}-px images; LOAD_SIZE is {config['LOAD_SIZE']}")
        return ChestXrayDataset(images, rows[list(FINDINGS)], transform)

    if rank == 0:
        print(f"images: {f'cache {cache}' if cache else 'decoding PNGs (python cache.py builds a faster cache)'}")
    train_set = subset("train", train_transform(config["IMAGE_SIZE"]))
    val_set = subset("val", eval_transform(config["IMAGE_SIZE"]))
    if len(train_set) < config["BATCH_SIZE"] * world_size or len(val_set) == 0:
        raise DataError(f"{len(train_set)} training / {len(val_set)} validation images: too few for a batch.")
    cores_per_process = (os.cpu_count() or 1) // world_size
    workers = config["NUM_WORKERS"] if config["NUM_WORKERS"] >= 0 else max(1, cores_per_process - 1)  # 1 core feeds
    common = {
        "batch_size": config["BATCH_SIZE"],
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        "prefetch_factor": 4 if workers else None,
        # iter(DataLoader) draws a seed from this generator, not from the global stream that dropout uses
        "generator": torch.Generator().manual_seed(config["SEED"]),
    }
    train_sampler = SeededSampler(DistributedSampler(train_set, world_size, rank, seed=config["SEED"]), config["SEED"])
    val_sampler = DistributedSampler(val_set, world_size, rank, shuffle=False)
    train_loader = DataLoader(train_set, sampler=train_sampler, drop_last=True, **common)
    val_loader = DataLoader(val_set, sampler=val_sampler, **common)
    return train_loader, val_loader


# ----------------------------------------------------------------------------- checkpoints of this run


def resolve_resume(resume, run_dir):
    if resume != "last":
        return Path(resume)
    candidates = list(run_dir.glob("epoch_*.pth")) + list(run_dir.glob("interrupted.pth"))
    if not candidates:
        raise CheckpointError(f"--resume last: no epoch_*.pth or interrupted.pth in {run_dir}")
    return max(candidates, key=lambda path: path.stat().st_mtime)


RUN_DEFINING = (
    "IMAGE_SIZE",
    "LOAD_SIZE",
    "BATCH_SIZE",
    "TRAINABLE_LAYERS",
    "DROPOUT",
    "POS_WEIGHT",
    "POS_WEIGHT_CAP",
    "SEED",
)  # settings a resumed run must share with its start, or it is another experiment


def check_same_run(config, saved, path):
    changed = {name: (saved[name], config[name]) for name in RUN_DEFINING if saved.get(name) != config[name]}
    if changed:
        differences = ", ".join(f"{name.lower()} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise CheckpointError(
            f"{path} was trained with other settings ({differences}). Resume with the settings the run started "
            f"with (they are in {Path(path).parent / 'config.json'}), e.g. the same config file, plus --resume last."
        )


def training_state(model, optimizer, scheduler, scaler, config, history, position, epoch_totals):
    """Everything a resumed run needs; plain types and tensors only, so weights_only loading accepts it."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "config": config,
        "findings": list(FINDINGS),
        "architecture": ARCHITECTURE,
        "epoch": history[-1]["epoch"] if history else 0,
        "metrics": history[-1] if history else {},
        "history": history,
        "position": position,  # {"epoch", "step"}: where training continues
        "epoch_totals": epoch_totals,  # the running loss of a part-done epoch
        "rng": {"torch": torch.get_rng_state()},
    }


def write_run_files(run_dir, history):
    pd.DataFrame(history).to_csv(run_dir / "metrics.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(history)
    figure, (loss_axes, auroc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(table["epoch"], table["train_loss"], "o-", label="train")
    loss_axes.plot(table["epoch"], table["val_loss"], "o-", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="weighted BCE loss", title="Loss")
    loss_axes.legend()
    auroc_axes.plot(table["epoch"], table["val_mean_auroc"], "o-", color="C2")
    auroc_axes.set(xlabel="epoch", ylabel="mean AUROC (14 findings)", title="Validation AUROC")
    figure.tight_layout()
    figure.savefig(run_dir / "training_curves.png", dpi=100)
    plt.close(figure)


def summary(history, run_dir):
    best = min(history, key=lambda row: row["val_loss"])
    lines = [f"{'epoch':>5} {'train loss':>11} {'val loss':>9} {'val AUROC':>10} {'lr':>9} {'time':>7}"]
    for row in history:
        mark = "  <- best" if row is best else ""
        lines.append(
            f"{row['epoch']:>5} {row['train_loss']:>11.4f} {row['val_loss']:>9.4f} {row['val_mean_auroc']:>10.4f} "
            f"{row['lr']:>9.1e} {row['seconds']:>6.0f}s{mark}"
        )
    lines.append(
        f"best epoch {best['epoch']}: val loss {best['val_loss']:.4f}, mean AUROC {best['val_mean_auroc']:.4f} "
        f"-> {run_dir / 'best.pth'}"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the loop


def train_epoch(model, loader, optimizer, scaler, criterion, context, epoch, step, totals, stop):
    """One epoch from `step`; returns the steps done. Stops early (without error) when a stop is requested."""
    model.train()
    device, dtype, world_size = context["device"], context["dtype"], context["world_size"]
    bar = tqdm(loader, desc=f"epoch {epoch} train", initial=step, total=step + len(loader), disable=context["rank"])
    started, first_step = time.perf_counter(), step
    for images, targets in bar:
        images = prepare_batch(images, device, context["channels_last"])
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {epoch}, step {step + 1}: training diverged. Lower "
                "LEARNING_RATE, cap POS_WEIGHT (POS_WEIGHT_CAP) or use --resume on the last good checkpoint."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        totals["loss_sum"] += loss.item() * len(targets)
        totals["images"] += len(targets)
        rate = (step - first_step) * len(targets) * world_size / (time.perf_counter() - started)
        bar.set_postfix(
            loss=f"{totals['loss_sum'] / totals['images']:.4f}",
            lr=f"{optimizer.param_groups[0]['lr']:.1e}",
            img_s=f"{rate:.0f}",
            refresh=False,
        )
        if any_rank(stop.signal is not None, device, world_size):
            break
    bar.close()
    return step


def validate(model, loader, pos_weight, context):
    """Validation loss (same weighting as training), per-finding AUROC, gathered over all ranks."""
    device, world_size = context["device"], context["world_size"]

    def prepare(images):
        return prepare_batch(images, device, context["channels_last"])

    def progress(batches):
        return tqdm(batches, desc="  validation", leave=False, disable=context["rank"])

    logits, targets = predict_logits(model, loader, prepare, context["dtype"], progress)
    indices = torch.tensor(list(loader.sampler))  # DistributedSampler pads ranks to equal size: de-duplicate
    indices = gather_rows(indices, device, world_size).numpy()
    _, first = np.unique(indices, return_index=True)
    logits = gather_rows(logits, device, world_size)[first]
    targets = gather_rows(targets, device, world_size)[first]
    loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight.cpu()).item()
    return loss, auroc_per_finding(targets.numpy(), torch.sigmoid(logits).numpy())


def train(config):
    rank, world_size, device = setup_distributed(config["DEVICE"])
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    run_dir = Path(config["OUT_DIR"])
    resume_path = resolve_resume(config["RESUME"], run_dir) if config["RESUME"] else None
    if resume_path is None and any(run_dir.glob("*.pth")):
        raise DataError(f"{run_dir} already holds a run. Continue it with --resume last, or set another --out_dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config["SEED"])
    dtype = autocast_dtype(device, config["AMP"])
    channels_last = config["CHANNELS_LAST"] and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    log(f"device: {device} ({name}); autocast {dtype}; channels_last {channels_last}; {world_size} process(es)")

    labels, split = load_split_labels(config, run_dir, resuming=resume_path is not None)
    train_rows = labels[split == "train"]
    positives, negatives = count_positives(train_rows[list(FINDINGS)].to_numpy())
    pos_weight = pos_weight_from_counts(positives, negatives, config["POS_WEIGHT"], config["POS_WEIGHT_CAP"])
    for part in ("train", "val", "test"):
        rows = labels[split == part]
        log(f"{part:>5}: {len(rows):>7,} images, {rows['patient_id'].nunique():>6,} patients")
    if is_main and resume_path is None:
        save_split(labels, split, run_dir / "split.csv")
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (run_dir / "pos_weight.json").write_text(json.dumps(dict(zip(FINDINGS, pos_weight.tolist())), indent=2))
    loaders = make_loaders(config, labels, split, device, rank, world_size)

    model = build_model(len(FINDINGS), config["PRETRAINED"], config["TRAINABLE_LAYERS"], config["DROPOUT"])
    init_head_bias(model, positives, negatives, pos_weight)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config["LEARNING_RATE"], weight_decay=config["WEIGHT_DECAY"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config["LR_FACTOR"], patience=config["LR_PATIENCE"]
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    pos_weight = torch.tensor(pos_weight, dtype=torch.float32, device=device)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    history, position, totals = [], {"epoch": 1, "step": 0}, {"loss_sum": 0.0, "images": 0}
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, FINDINGS, map_location=device)
        check_same_run(config, checkpoint["config"], resume_path)
        unwrap(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, position, totals = checkpoint["history"], checkpoint["position"], checkpoint["epoch_totals"]
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        log(f"resumed from {resume_path} at epoch {position['epoch']}, step {position['step']}")
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config["COMPILE"]:
        model = torch.compile(model)
    context = {"device": device, "dtype": dtype, "world_size": world_size, "rank": rank, "channels_last": channels_last}

    train_loader, val_loader = loaders
    stop = StopRequest()
    try:
        for epoch in range(position["epoch"], config["EPOCHS"] + 1):
            started = time.perf_counter()
            first_step = position["step"] if epoch == position["epoch"] else 0
            if first_step == 0:
                torch.manual_seed(config["SEED"] * 1_000_003 + epoch)  # dropout: a stream per epoch, so resume is exact
                totals = {"loss_sum": 0.0, "images": 0}
            train_loader.sampler.set_epoch(epoch, skip=first_step * config["BATCH_SIZE"])
            step = train_epoch(
                model, train_loader, optimizer, scaler, criterion, context, epoch, first_step, totals, stop
            )
            if stop.signal is not None or step < first_step + len(train_loader):
                if is_main:
                    state = training_state(
                        model, optimizer, scheduler, scaler, config, history, {"epoch": epoch, "step": step}, totals
                    )
                    save_checkpoint(state, run_dir / "interrupted.pth")
                log(
                    f"stopped at epoch {epoch}, step {step}: saved {run_dir / 'interrupted.pth'}; continue with "
                    "the same command plus --resume last"
                )
                return 128 + (stop.signal or 0)
            val_loss, aurocs = validate(model, val_loader, pos_weight, context)
            scheduler.step(val_loss)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": totals["loss_sum"] / max(totals["images"], 1),
                    "val_loss": val_loss,
                    "val_mean_auroc": mean_auroc(aurocs),
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - started,
                    **{f"auroc_{finding}": float(value) for finding, value in zip(FINDINGS, aurocs)},
                }
            )
            row = history[-1]
            log(
                f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
                f"mean AUROC {row['val_mean_auroc']:.4f}, lr {row['lr']:.1e}"
            )
            if is_main:
                save_epoch(
                    run_dir,
                    history,
                    training_state(
                        model, optimizer, scheduler, scaler, config, history, {"epoch": epoch + 1, "step": 0}, totals
                    ),
                )
            best_epoch = min(history, key=lambda past: past["val_loss"])["epoch"]
            if 0 < config["EARLY_STOPPING_PATIENCE"] <= epoch - best_epoch:
                log(f"early stop: no lower validation loss for {epoch - best_epoch} epochs")
                break
    finally:
        stop.restore()
    if history:
        log(summary(history, run_dir))
    return 0


def save_epoch(run_dir, history, state):
    epoch = history[-1]["epoch"]
    path = run_dir / f"epoch_{epoch:02d}.pth"
    save_checkpoint(state, path)
    if history[-1]["val_loss"] <= min(row["val_loss"] for row in history):
        copy_checkpoint(path, run_dir / "best.pth")
    aurocs = [row["val_mean_auroc"] for row in history]
    if np.isfinite(aurocs[-1]) and aurocs[-1] >= np.nanmax(aurocs):
        copy_checkpoint(path, run_dir / "best_auroc.pth")
    (run_dir / "interrupted.pth").unlink(missing_ok=True)  # superseded by a later, complete epoch
    write_run_files(run_dir, history)


def main(argv=None):
    config = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        code = train(config)
    except (DataError, CheckpointError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
