"""Train a ResNet-50 to read chest X-rays (NIH ChestX-ray14: 14 findings, multi-label).

    python train.py                              # the settings below; edit them, or override:
    python train.py --epochs 3 --batch_size=32   # any setting, lower-case, as --name value or --name=value
    python train.py config/demo.py               # a file of NAME = value lines, applied before --name flags
    torchrun --nproc_per_node=4 train.py         # several GPUs (DistributedDataParallel)

Every epoch writes OUT_DIR/epoch_NN.pth, metrics.csv, training_curves.png and TensorBoard events; best.pth is
the epoch of lowest validation loss, best_auroc.pth the one of highest mean validation AUROC. Each checkpoint
carries its config and its split, so it evaluates and resumes on its own. Ctrl-C (or SIGTERM) saves
OUT_DIR/interrupted.pth; --resume last continues exactly where the run stopped (--resume PATH --out_dir NEW
branches a run into a new folder); a finished run says so instead of training on.
"""

import sys

import configurator
from configurator import Above, AtLeast, Between, CommaList, Flag, OneOf, Text

LAYERS = CommaList("stem", "layer1", "layer2", "layer3", "layer4", "head", alone="all")  # model.BLOCKS, and the head

# ----------------------------------------------------------------------------- settings (python train.py --help)
# NAME: what it may be = its default  # what it means. Edit a default here, or override it with a config file or
# --name value; every value is checked against what it may be before the run writes or reads anything.
DATA_DIR: Text = "data/nih"  # folder with the label CSV and the images (NIH archive layout or flat)
CSV: Text = ""  # label file; empty: the one Data_Entry_2017*.csv below DATA_DIR
BACKBONE: OneOf("resnet50", "densenet121", "convnext_tiny") = "resnet50"  # the network (model.BACKBONES)
IMAGE_SIZE: AtLeast(32) = 224  # side of the square crop the network sees
LOAD_SIZE: AtLeast(32) = 256  # images are letterboxed to this square on load; training crops are taken from it
CACHE: Text = "auto"  # "auto": DATA_DIR/cache_<LOAD_SIZE> when built (python cache.py), "off" (read PNGs), or a folder
BATCH_SIZE: AtLeast(1) = 64  # images per step on each GPU
EPOCHS: AtLeast(1) = 10  # passes over the training split
LEARNING_RATE: Above(0.0) = 1e-5  # AdamW learning rate; low, as suits fine-tuning pretrained weights
WEIGHT_DECAY: AtLeast(0.0) = 1e-4  # AdamW decoupled weight decay
DROPOUT: Between(0.0, 1.0) = 0.5  # dropout before the final Linear layer
PRETRAINED: Text = "imagenet"  # "imagenet" (torchvision download), "none" (random init), or a weights file
TRAINABLE_LAYERS: LAYERS = "layer4"  # blocks that train besides the head (layer1-4: the backbone's four stages)
POS_WEIGHT: OneOf("ratio", "sqrt", "none") = "ratio"  # pos_weight per finding from the training split
POS_WEIGHT_CAP: AtLeast(0.0) = 0.0  # upper bound on any pos_weight; 0: none
LR_SCHEDULE: OneOf("plateau", "cosine") = "plateau"  # plateau: ReduceLROnPlateau on val loss; cosine: warmup, decay
LR_PATIENCE: AtLeast(0) = 1  # plateau: epochs without a lower validation loss before the learning rate drops
LR_FACTOR: Between(0.0, 1.0, low_included=False) = 0.1  # plateau: the factor the learning rate is multiplied by then
WARMUP_EPOCHS: AtLeast(0.0) = 0.0  # cosine: epochs of linear warmup from 0 (per step)
MIN_LEARNING_RATE: AtLeast(0.0) = 1e-8  # plateau: the run ends when the rate has been cut below this
EARLY_STOPPING_PATIENCE: AtLeast(0) = 3  # epochs without a lower validation loss before training stops; 0: never
VAL_FRACTION: Between(0.0, 1.0, low_included=False) = 0.1  # share of the (train_val) patients held out for validation
TEST_FRACTION: Between(0.0, 1.0) = 0.2  # share of patients held out for testing when there are no official lists
DROP_MISSING_IMAGES: Flag = False  # train on the images present when some in the CSV are missing (else an error)
NUM_WORKERS: AtLeast(-1) = -1  # DataLoader worker processes per GPU; -1: from the CPUs this process may use
AUGMENT_ON: OneOf("device", "workers") = "device"  # crop, rotation, jitter batched on the GPU (or CPU), or in workers
CACHE_ON_DEVICE: OneOf("auto", "on", "off") = "auto"  # hold the cached images in device memory when they fit
AMP: Flag = True  # mixed precision: bf16 (fp16 with loss scaling before Ampere GPUs) and on CPUs with native bf16
CHANNELS_LAST: Flag = True  # NHWC memory layout on CUDA and the CPU (faster convolutions)
COMPILE: Flag = False  # torch.compile the model (faster steps after a slow first one; needs Triton on a GPU)
TENSORBOARD: Flag = True  # write TensorBoard events to OUT_DIR (tensorboard --logdir checkpoints)
SEED: AtLeast(0) = 0  # seeds the split, the data order, augmentation and dropout
DEVICE: Text = "auto"  # "auto" (cuda, else mps, else cpu), or a torch device such as "cuda:1" or "cpu"
OUT_DIR: Text = "checkpoints/resnet50"  # the run folder: checkpoints, metrics.csv, split.csv, config.json, plots
RESUME: Text = ""  # "" (a new run), "last" (the newest checkpoint in OUT_DIR), "auto" (last if any) or a path
KEEP_TRAINING_STATE: OneOf("newest", "all") = "newest"  # optimizer state in the newest checkpoint only, or in all
# -----------------------------------------------------------------------------
if __name__ == "__main__":
    configurator.exit_after_help(sys.modules[__name__])  # --help needs no torch: it answers before the imports below

import math  # the imports follow the settings, so that --help answers without them (pyproject: E402 here)
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import (
    FINDINGS,
    attach_image_paths,
    count_positives,
    find_label_file,
    make_split,
    pos_weight_from_counts,
    read_labels,
    saved_split,
    split_record,
)
from devices import autocast_dtype, compile_support, device_name, select_device, use_channels_last
from distributed import gather_rows, setup_distributed, shut_down, sum_over_ranks
from errors import CheckpointError, DataError, SettingsError, UserError
from images import find_cache
from inference import predict_logits
from loaders import close_workers, make_loaders
from model import build_model, frozen_blocks, init_head_bias, save_checkpoint
from run_folder import (
    HEAT_MAP_IMAGES,
    EpochMetrics,
    EpochTotals,
    Position,
    TensorBoard,
    Training,
    finished,
    open_run,
    restore,
    save_epoch,
    summary,
    training_state,
    write_run_folder,
)
from transforms import augment_batch, augmentation_params, mix_seed, normalize

# No matplotlib, scikit-learn or grad-cam up here: each DataLoader worker on Windows re-imports this file, and they
# are imported where used (validation's AUROC, the TensorBoard heat maps), so a worker stays small.

# the loop reads the loss back from the device (and agrees on a stop request) once every this many steps: each read
# waits for the GPU to finish its queued work, so reading every step would leave it idle between steps
SYNC_EVERY = 10
# the run prints its time estimate once this many seconds of training, or a tenth of the epoch, have passed
ETA_AFTER_SECONDS = 20


def settings():
    """{NAME: (default, comment)} of the settings above."""
    return configurator.settings(sys.modules[__name__])


def parse_config(argv):
    """The settings, from the constants above, config files and --name value flags, each checked."""
    return configurator.parse_config(argv, sys.modules[__name__], __doc__, check_settings)


def check_settings(config):
    """What a setting may be given the others (each alone is checked against its rule)."""
    if config["VAL_FRACTION"] + config["TEST_FRACTION"] >= 1:
        raise SettingsError(
            f"VAL_FRACTION {config['VAL_FRACTION']} + TEST_FRACTION {config['TEST_FRACTION']} leave no patient for "
            "training: their sum must be below 1"
        )
    pretrained = str(config["PRETRAINED"])
    if pretrained.lower() not in ("imagenet", "none") and not Path(pretrained).is_file():
        raise SettingsError(f"PRETRAINED = {pretrained!r}: use imagenet, none, or the path of a weights file")


def warn_about_settings(config, log):
    """Settings that run but waste the run: said at the start, with the fix."""
    frozen = frozen_blocks(config["TRAINABLE_LAYERS"])
    if str(config["PRETRAINED"]).lower() == "none" and frozen:
        log(
            f"warning: PRETRAINED = none with TRAINABLE_LAYERS = {config['TRAINABLE_LAYERS']!r}: the frozen blocks "
            f"({', '.join(frozen)}) keep random weights and pass little of use on. Train them: --trainable_layers all"
        )
    if config["IMAGE_SIZE"] > config["LOAD_SIZE"]:
        log(
            f"warning: IMAGE_SIZE {config['IMAGE_SIZE']} is larger than LOAD_SIZE {config['LOAD_SIZE']}: every crop "
            f"is upscaled, which adds no detail. Set LOAD_SIZE to about IMAGE_SIZE / 0.875 (and rebuild the cache)."
        )


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at its next read of the device and save. Only a second Ctrl-C stops at
    once: under SLURM and torchrun every process gets SIGTERM twice (from the scheduler, then forwarded by torchrun),
    and the second must not cut the save short, possibly in the middle of a collective."""

    def __init__(self):
        self.signal, self.interrupts = None, 0
        names = [name for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)]  # Windows: no SIGTERM to catch
        self.previous = {name: signal.signal(getattr(signal, name), self._handle) for name in names}

    def restore(self):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def _handle(self, signum, frame):
        self.interrupts += signum == signal.SIGINT
        if self.interrupts >= 2:
            raise KeyboardInterrupt  # a person pressing Ctrl-C twice
        self.signal = self.signal or signum


# ----------------------------------------------------------------------------- data


def load_split_labels(config, checkpoint, checkpoint_path):
    """(label file, labels with image paths, split per row): a new split for a new run; for a resumed run the
    checkpoint's own (checked against the split.csv beside it)."""
    csv_path = find_label_file(config["DATA_DIR"], config["CSV"])
    cache = find_cache(config["DATA_DIR"], config["LOAD_SIZE"], config["CACHE"])  # its films need no PNG on disk
    labels = attach_image_paths(read_labels(csv_path), config["DATA_DIR"], config["DROP_MISSING_IMAGES"], cache=cache)
    if checkpoint is None:
        return (
            csv_path,
            labels,
            make_split(labels, csv_path, config["VAL_FRACTION"], config["TEST_FRACTION"], config["SEED"]),
        )
    saved = saved_split(checkpoint.get("split"), Path(checkpoint_path).parent / "split.csv")
    if saved is None:
        raise CheckpointError(f"{checkpoint_path} carries no split and no split.csv lies beside it: cannot resume.")
    missing = saved.image_name[~saved.image_name.isin(labels.image_name)]
    if len(missing):
        raise DataError(
            f"{len(missing)} image(s) of the run's split are not below {config['DATA_DIR']} (first: {missing.iloc[0]})"
        )
    split = labels["image_name"].map(saved.set_index("image_name")["split"])
    keep = split.notna().to_numpy()  # images added to the label file since the run started take no part
    return csv_path, labels[keep].reset_index(drop=True), split[keep].reset_index(drop=True)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Loop:
    """How this process runs the training loop; fixed for a run."""

    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None: full precision
    channels_last: bool = False
    augment_on: str = "device"  # "device": augment_batch here; "workers": batches arrive augmented
    image_size: int = 224
    world_size: int = 1
    rank: int = 0
    epochs: int = 1  # for the progress bar and the run's time estimate
    steps_per_epoch: int = 0
    step_scheduler: object = None  # the cosine schedule, stepped every step; None for plateau (stepped per epoch)
    tensorboard: object = None
    show_progress: bool = True
    estimated: bool = False  # the run's time estimate has been printed


def make_scheduler(optimizer, config, steps_per_epoch):
    """ReduceLROnPlateau (stepped per epoch on validation loss), or linear warmup then cosine decay (per step)."""
    if config["LR_SCHEDULE"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config["LR_FACTOR"], patience=config["LR_PATIENCE"]
        )
    warmup, total = config["WARMUP_EPOCHS"] * steps_per_epoch, max(config["EPOCHS"] * steps_per_epoch, 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_input(images, seeds, loop):
    """A training batch as the model takes it: augmented on the device from each image's seed (or already in the
    workers), normalised, in the chosen memory layout."""
    images = images.to(loop.device, non_blocking=True)
    if loop.augment_on == "device":
        params = torch.from_numpy(augmentation_params(seeds.numpy(), images.shape[-1]))
        images = augment_batch(images, params.to(loop.device, non_blocking=True), loop.image_size)
    return normalize(images, loop.channels_last)


class StepLosses:
    """Each step's loss kept on the device, and read back every SYNC_EVERY steps in one wait: summed over ranks
    (so the logged loss is every rank's, not rank 0's alone) together with any rank's stop request."""

    def __init__(self, device):
        self.values = torch.zeros(SYNC_EVERY + 1, device=device)  # the last slot: how many ranks were asked to stop
        self.count = 0

    def add(self, loss):
        self.values[self.count].copy_(loss.detach())
        self.count += 1

    def full(self):
        return self.count == SYNC_EVERY

    def read(self, stop_requested, world_size):
        """(each step's loss averaged over ranks, whether any rank was asked to stop); every rank calls it together."""
        self.values[-1].fill_(float(stop_requested))
        values = sum_over_ranks(self.values, world_size).tolist()  # the one wait for the device
        losses, self.count = [value / world_size for value in values[: self.count]], 0
        return losses, values[-1] > 0


def train_epoch(net, batches, training, loop, epoch, step, totals, stop):
    """One epoch of `net` (training.model, or its DDP or compiled wrapper) trained by a run_folder.Training, from
    `step`; returns the steps done. The device is read every SYNC_EVERY steps and at the epoch's
    end: the losses (a non-finite one stops the run, naming its step) and a stop request, which ends the epoch
    early (without error) on every rank at once."""
    net.train()
    first_step, steps = step, step + len(batches)
    bar = tqdm(total=steps, initial=step, desc=f"epoch {epoch}/{loop.epochs} train", disable=not loop.show_progress)
    window, started, learning_rates = StepLosses(loop.device), time.perf_counter(), []
    for images, targets, seeds in batches:
        images = model_input(images, seeds, loop)
        targets = targets.to(loop.device, non_blocking=True)
        with torch.autocast(loop.device.type, dtype=loop.dtype, enabled=loop.dtype is not None):
            logits = net(images)
        loss = training.criterion(logits.float(), targets)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        if loop.step_scheduler is not None:
            loop.step_scheduler.step()
        step += 1
        window.add(loss)
        learning_rates.append(training.optimizer.param_groups[0]["lr"])
        bar.update()
        if window.full() or step == steps:
            losses, stopping = window.read(stop.signal is not None, loop.world_size)
            seconds = time.perf_counter() - started
            images_per_second = (step - first_step) * len(targets) * loop.world_size / seconds
            record_steps(
                losses, learning_rates, len(targets) * loop.world_size, images_per_second, step, epoch, totals, loop
            )
            bar.set_postfix(
                loss=f"{totals.mean():.4f}", lr=f"{learning_rates[-1]:.1e}", img_s=f"{images_per_second:.0f}"
            )
            learning_rates = []
            estimate_time(seconds, step - first_step, steps - step, images_per_second, epoch, loop, bar)
            if stopping:
                break
    bar.close()
    return step


def record_steps(losses, learning_rates, batch_images, images_per_second, step, epoch, totals, loop):
    """Add a window of steps' losses to the epoch's totals and to TensorBoard; a non-finite loss stops the run."""
    first = step - len(losses) + 1
    for offset, (loss, learning_rate) in enumerate(zip(losses, learning_rates)):
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at epoch {epoch}, step {first + offset}: training diverged. Lower LEARNING_RATE, "
                "cap POS_WEIGHT (POS_WEIGHT_CAP) or use --resume on the last good checkpoint."
            )
        totals.loss_sum += loss * batch_images
        totals.images += batch_images
        if loop.tensorboard is not None:
            global_step = (epoch - 1) * loop.steps_per_epoch + first + offset
            loop.tensorboard.step(global_step, loss, learning_rate, images_per_second)


def estimate_time(seconds, steps_done, steps_left, images_per_second, epoch, loop, bar):
    """Once per run, after ETA_AFTER_SECONDS of training or a tenth of an epoch, while training remains: how long an
    epoch's training takes, and the rest of the run's."""
    left = steps_left + (loop.epochs - epoch) * loop.steps_per_epoch
    if loop.estimated or not loop.show_progress or left == 0:
        return
    if seconds < ETA_AFTER_SECONDS and steps_done < loop.steps_per_epoch / 10:
        return
    loop.estimated = True
    per_step = seconds / steps_done
    bar.write(
        f"epoch {epoch}: about {duration(per_step * loop.steps_per_epoch)} of training per epoch at "
        f"{images_per_second:.0f} img/s; about {duration(per_step * left)} of training left in this run "
        f"(epochs {epoch}-{loop.epochs}; validation not included)"
    )


def duration(seconds):
    """'40 s', '12.5 min' or '3.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def validate(model, loader, pos_weight, loop):
    """Validation loss (same weighting as training), per-finding AUROC, targets and probabilities, gathered over all
    ranks; and this rank's first few validation crops (for the heat maps)."""
    from metrics import auroc_per_finding  # scikit-learn: imported here, not in every DataLoader worker

    device, world_size, crops = loop.device, loop.world_size, []

    def prepare(images):
        if len(crops) < HEAT_MAP_IMAGES:
            crops.extend(images[: HEAT_MAP_IMAGES - len(crops), 0].cpu().numpy())
        return normalize(images.to(device, non_blocking=True), loop.channels_last)

    def progress(batches):
        return tqdm(batches, desc="  validation", leave=False, disable=not loop.show_progress)

    logits, targets = predict_logits(model, loader, prepare, loop.dtype, progress)
    indices = torch.tensor(list(loader.sampler))  # DistributedSampler pads ranks to equal size: de-duplicate
    indices = gather_rows(indices, device, world_size).numpy()
    _, first = np.unique(indices, return_index=True)
    logits = gather_rows(logits, device, world_size)[first]
    targets = gather_rows(targets, device, world_size)[first]
    loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight.cpu()).item()
    probabilities = torch.sigmoid(logits).numpy()
    return loss, auroc_per_finding(targets.numpy(), probabilities), targets.numpy(), probabilities, crops


def build_training(config, counts, pos_weight, device, dtype, channels_last, steps_per_epoch):
    """A run_folder.Training: the model (head bias at the weighted base rate), AdamW on its trainable parameters,
    the scheduler, the loss scaler (fp16 only) and the pos_weight-ed loss."""
    model = build_model(
        len(FINDINGS), config["PRETRAINED"], config["TRAINABLE_LAYERS"], config["DROPOUT"], config["BACKBONE"]
    )
    init_head_bias(model, *counts, pos_weight)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # fused: one kernel for all parameters (on this CPU 18 ms a step instead of 44 for the whole ResNet-50); on CUDA
    # it also takes GradScaler's scale and inf check on the device, so fp16 steps need no wait for the device
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        trainable, lr=config["LEARNING_RATE"], weight_decay=config["WEIGHT_DECAY"], fused=fused
    )
    return Training(
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        criterion=torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32, device=device)),
    )


def compiled(model, config, device, log):
    """torch.compile(model) when COMPILE is set and this device can compile; else the model, saying why."""
    if not config["COMPILE"]:
        return model
    possible, why = compile_support(device)
    if not possible:
        log(f"COMPILE: {why}; training without compiling")
        return model
    return torch.compile(model)


def train(config):
    rank, world_size, device = setup_distributed(select_device(config["DEVICE"]))
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    run_dir = Path(config["OUT_DIR"])
    resume_path, checkpoint = open_run(config, run_dir, is_main, log)
    if resume_path is not None and checkpoint is None:
        return 0  # finished, and said so
    warn_about_settings(config, log)
    torch.manual_seed(config["SEED"])
    dtype = autocast_dtype(device, config["AMP"])
    channels_last = use_channels_last(device, config["CHANNELS_LAST"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log(
        f"device: {device} ({device_name(device)}); autocast {dtype or 'off (fp32)'}; channels_last {channels_last}; "
        f"augmentation on the {'device' if config['AUGMENT_ON'] == 'device' else 'workers'}; {world_size} process(es)"
    )

    csv_path, labels, split = load_split_labels(config, checkpoint, resume_path)
    log(f"labels: {csv_path} ({len(labels):,} images)")
    counts = count_positives(labels[split == "train"][list(FINDINGS)].to_numpy())
    pos_weight = pos_weight_from_counts(*counts, config["POS_WEIGHT"], config["POS_WEIGHT_CAP"])
    for part in ("train", "val", "test"):
        rows = labels[split == part]
        log(f"{part:>5}: {len(rows):>7,} images, {rows['patient_id'].nunique():>6,} patients")
    train_loader, val_loader = make_loaders(config, labels, split, device, rank, world_size, log)
    steps_per_epoch = len(train_loader)
    training = build_training(config, counts, pos_weight, device, dtype, channels_last, steps_per_epoch)
    training.split = split_record(labels, split, csv_path)
    history, position, totals = [], Position(), EpochTotals()
    if checkpoint is not None:
        history, position, totals = restore(training, checkpoint, device)
        log(f"resumed from {resume_path} at epoch {position.epoch}, step {position.step}")
    if is_main and (checkpoint is None or not (run_dir / "split.csv").is_file()):
        write_run_folder(run_dir, labels, split, config, pos_weight)  # only now: the run is known to start
    net = training.model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    net = compiled(net, config, device, log)
    done = (position.epoch - 1) * steps_per_epoch + position.step
    tensorboard = TensorBoard(run_dir, is_main and config["TENSORBOARD"], done + 1, log)  # purge what a crash left
    loop = Loop(
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        augment_on=config["AUGMENT_ON"],
        image_size=config["IMAGE_SIZE"],
        world_size=world_size,
        rank=rank,
        epochs=config["EPOCHS"],
        steps_per_epoch=steps_per_epoch,
        step_scheduler=training.scheduler if config["LR_SCHEDULE"] == "cosine" else None,
        tensorboard=tensorboard if tensorboard.writer else None,
        show_progress=is_main,
    )

    stop = StopRequest()
    try:
        for epoch in range(position.epoch, config["EPOCHS"] + 1):
            started = time.perf_counter()
            first_step = position.step if epoch == position.epoch else 0
            if first_step == 0:
                torch.manual_seed(mix_seed(config["SEED"], epoch))  # dropout: a stream per epoch, so resume is exact
                totals = EpochTotals()
            train_loader.sampler.set_epoch(epoch, skip=first_step * config["BATCH_SIZE"])
            step = train_epoch(net, train_loader, training, loop, epoch, first_step, totals, stop)
            if stop.signal is not None or step < first_step + len(train_loader):
                if is_main:
                    state = training_state(training, config, history, Position(epoch, step), totals, device, dtype)
                    save_checkpoint(state, run_dir / "interrupted.pth")
                log(
                    f"stopped at epoch {epoch}, step {step}: saved {run_dir / 'interrupted.pth'}; continue with "
                    "the same command plus --resume last"
                )
                return 128 + (stop.signal or 0)
            pos_weight = training.criterion.pos_weight
            val_loss, aurocs, targets, probabilities, crops = validate(net, val_loader, pos_weight, loop)
            if config["LR_SCHEDULE"] == "plateau":
                training.scheduler.step(val_loss)
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=totals.mean(),
                val_loss=val_loss,
                val_mean_auroc=float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan"),
                lr=training.optimizer.param_groups[0]["lr"],
                seconds=time.perf_counter() - started,
                aurocs={finding: float(value) for finding, value in zip(FINDINGS, aurocs)},
            )
            history.append(metrics.row())
            log(
                f"epoch {epoch}: train loss {metrics.train_loss:.4f}, val loss {val_loss:.4f}, "
                f"mean AUROC {metrics.val_mean_auroc:.4f}, lr {metrics.lr:.1e}"
            )
            if is_main:
                state = training_state(training, config, history, Position(epoch + 1, 0), totals, device, dtype)
                save_epoch(run_dir, history, state, config["KEEP_TRAINING_STATE"])
                tensorboard.epoch(epoch * steps_per_epoch, metrics, targets, probabilities)
                if tensorboard.writer:
                    from heatmaps import top_finding_overlays  # grad-cam and matplotlib: not in DataLoader workers

                    drawn = top_finding_overlays(training.model, crops, FINDINGS, device)
                    tensorboard.heat_maps(epoch * steps_per_epoch, drawn)
            ended = finished(history, {"epoch": epoch + 1, "step": 0}, metrics.lr, config)
            if ended:
                log(f"training ends: {ended}")
                break
    finally:
        stop.restore()
        close_workers(train_loader, val_loader)
        tensorboard.close(config, history, dtype)
    if history:
        log(summary(history, run_dir))
        if is_main:
            fit_inference_statistics(run_dir, config, labels, split, device, log)
    return 0


def fit_inference_statistics(run_dir, config, labels, split, device, log):
    """What inference needs beside the weights, fitted for best.pth and best_auroc.pth and stored in them: thresholds
    and a calibration on the validation split, the out-of-distribution statistics on a sample of the training films
    (inference.py, calibration.py, ood.py). They are rewritten without the training state (a resume starts from
    epoch_NN.pth or interrupted.pth); best_auroc.pth stays a link to best.pth when both are the same epoch's."""
    from images import evaluation_images
    from inference import TorchModel, fit_statistics, outputs_over, statistics_record
    from loaders import evaluation_loader
    from model import add_to_checkpoint, copy_checkpoint
    from ood import fit_sample
    from run_folder import TRAINING_STATE

    train_rows = labels[split == "train"]
    parts = {
        "val": labels[split == "val"],
        "train": fit_sample(train_rows, config["SEED"]),
    }
    best, best_auroc = run_dir / "best.pth", run_dir / "best_auroc.pth"
    linked = best.is_file() and best_auroc.is_file() and os.path.samefile(best, best_auroc)
    fitted, written = {}, []
    for name in ("best.pth", "best_auroc.pth"):
        if not (run_dir / name).is_file():
            continue
        if name == "best_auroc.pth" and linked:
            copy_checkpoint(best, best_auroc)
            written.append(name)
            continue
        model = TorchModel(run_dir / name, str(device), config["AMP"])
        epoch = model.checkpoint["epoch"]
        if epoch not in fitted:
            outputs = {}
            for part, rows in parts.items():
                images = evaluation_images(rows, config["DATA_DIR"], config["LOAD_SIZE"], config["CACHE"])
                loader = evaluation_loader(images, config["IMAGE_SIZE"], config["BATCH_SIZE"], 0, device)
                outputs[part] = outputs_over(model, loader)
            targets = parts["val"][list(FINDINGS)].to_numpy(dtype=float)
            statistics = fit_statistics(
                FINDINGS,
                outputs["val"][0],
                targets,
                outputs["val"][2],
                outputs["train"][2],
                parts["train"].patient_id.to_numpy(),
            )
            fitted[epoch] = statistics_record(statistics)
        add_to_checkpoint(run_dir / name, TRAINING_STATE, inference=fitted[epoch])
        written.append(name)
    if written:
        log(
            f"fitted on the validation split, and on {len(parts['train']):,} training films, and stored in "
            f"{' and '.join(written)}: thresholds, calibration, out-of-distribution statistics (inference.py)"
        )


def main(argv=None):
    config = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        code = train(config)
    except (UserError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    finally:
        shut_down()
    sys.exit(code)


if __name__ == "__main__":
    main()
