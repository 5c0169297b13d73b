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
from configurator import Above, AtLeast, Between, CommaList, Flag, OneOf, Text, Weights
from dataset import POS_WEIGHT_POLICIES

LAYERS = CommaList("stem", "layer1", "layer2", "layer3", "layer4", "head", alone="all")  # model.BLOCKS, and the head
DATASETS = CommaList("nih", "chexpert", "mimic", "padchest", "vindr", "rsna", "csv")  # datasets.TRAINING_DATASETS

# ----------------------------------------------------------------------------- settings (python train.py --help)
# NAME: what it may be = its default  # what it means. Edit a default here, or override it with a config file or
# --name value; every value is checked against what it may be before the run writes or reads anything.
DATASET: DATASETS = "nih"  # the films to train on, or a union: nih,chexpert (datasets.py)
DATA_DIR: Text = "data/nih"  # the dataset's folder (label CSV and images); for a union one per dataset, comma-separated
CSV: Text = ""  # label file; empty: the dataset's own (NIH: the Data_Entry_2017*.csv below DATA_DIR)
UNCERTAIN: OneOf("ignore", "zeros", "ones") = "ignore"  # CheXpert/MIMIC -1: unlabelled (U-Ignore), negative, positive
DATASET_WEIGHTS: Weights = ""  # a union's share of each epoch per dataset: empty, by size; 1,1: equal shares
BACKBONE: OneOf("resnet50", "densenet121", "convnext_tiny") = "resnet50"  # the network (model.BACKBONES)
IMAGE_SIZE: AtLeast(32) = 224  # side of the square crop the network sees
LOAD_SIZE: AtLeast(32) = 256  # images are letterboxed to this square on load; training crops are taken from it
CACHE: Text = "auto"  # "auto": each DATA_DIR's cache_<LOAD_SIZE> when built (cache.py), "off" (read films), or a folder
BATCH_SIZE: AtLeast(1) = 64  # images per step on each GPU
EPOCHS: AtLeast(1) = 10  # passes over the training split
LEARNING_RATE: Above(0.0) = 1e-5  # AdamW learning rate; low, as suits fine-tuning pretrained weights
WEIGHT_DECAY: AtLeast(0.0) = 1e-4  # AdamW decoupled weight decay
DROPOUT: Between(0.0, 1.0) = 0.5  # dropout before the final Linear layer
PRETRAINED: Text = "imagenet"  # "imagenet" (torchvision download), "none" (random init), or a weights file
TRAINABLE_LAYERS: LAYERS = "layer4"  # blocks that train besides the head (layer1-4: the backbone's four stages)
POS_WEIGHT: OneOf(*POS_WEIGHT_POLICIES) = "ratio"  # pos_weight per finding from the training split
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
CUDA_GRAPHS: Flag = False  # replay the whole training step as one CUDA graph (one CUDA GPU; cuda_graphs.py)
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
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cuda_graphs import GraphedStep, graph_support
from dataset import FINDINGS, count_positives, pos_weight_from_counts, saved_split, split_record
from datasets import describe, is_nih_only, read_training_films, sampling
from devices import autocast_dtype, compile_support, device_name, select_device, use_channels_last
from distributed import gather_rows, setup_distributed, shut_down, sum_over_ranks
from errors import CheckpointError, SettingsError, one_line_errors
from inference import fit_run_statistics, predict_logits
from loaders import close_workers, make_loaders
from model import build_model, cast_frozen, derived_buffers, frozen_blocks, init_head_bias, save_checkpoint
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
from settings import Settings, from_config
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
    """The settings as a {NAME: value} mapping, from the constants above, config files and --name value flags, each
    checked."""
    return configurator.parse_config(argv, sys.modules[__name__], __doc__, check_settings)


def parse_settings(argv):
    """The settings as the library takes them (settings.Settings)."""
    return from_config(parse_config(argv))


def check_settings(config):
    """What a setting may be given the others (each alone is checked against its rule)."""
    parsed = from_config(config)
    data, model_settings = parsed.data, parsed.model
    if data.val_fraction + data.test_fraction >= 1:
        raise SettingsError(
            f"VAL_FRACTION {data.val_fraction} + TEST_FRACTION {data.test_fraction} leave no patient for "
            "training: their sum must be below 1"
        )
    pretrained = str(model_settings.pretrained)
    if pretrained.lower() not in ("imagenet", "none") and not Path(pretrained).is_file():
        raise SettingsError(f"PRETRAINED = {pretrained!r}: use imagenet, none, or the path of a weights file")


def warn_about_settings(settings, log):
    """Settings that run but waste the run: said at the start, with the fix."""
    model_settings, data = settings.model, settings.data
    frozen = frozen_blocks(model_settings.trainable_layers)
    if str(model_settings.pretrained).lower() == "none" and frozen:
        log(
            f"warning: PRETRAINED = none with TRAINABLE_LAYERS = {model_settings.trainable_layers!r}: the frozen "
            f"blocks ({', '.join(frozen)}) keep random weights and pass little of use on. Train them: "
            "--trainable_layers all"
        )
    if data.image_size > data.load_size:
        log(
            f"warning: IMAGE_SIZE {data.image_size} is larger than LOAD_SIZE {data.load_size}: every crop "
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


def load_split_labels(data, checkpoint, checkpoint_path):
    """The datasets.TrainingFilms of a settings.DataSettings: a new split for a new run; for a resumed run the
    checkpoint's own (checked against the split.csv beside it)."""
    if checkpoint is None:
        films = read_training_films(data)
    else:
        saved = saved_split(checkpoint.get("split"), Path(checkpoint_path).parent / "split.csv")
        if saved is None:
            raise CheckpointError(f"{checkpoint_path} carries no split and no split.csv lies beside it: cannot resume.")
        films = read_training_films(data, saved)
    return films


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
    epochs: int = 1  # for the progress bar and the run's time estimate
    steps_per_epoch: int = 0
    step_scheduler: object = None  # the cosine schedule, stepped every step; None for plateau (stepped per epoch)
    graphed: object = None  # a cuda_graphs.GraphedStep that runs each step (CUDA_GRAPHS); None: steps run eagerly
    tensorboard: object = None
    show_progress: bool = True
    estimated: bool = False  # the run's time estimate has been printed


def make_scheduler(optimizer, training, steps_per_epoch):
    """ReduceLROnPlateau (stepped per epoch on validation loss), or linear warmup then cosine decay (per step), as a
    settings.TrainingSettings asks."""
    if training.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=training.lr_factor, patience=training.lr_patience
        )
    warmup, total = training.warmup_epochs * steps_per_epoch, max(training.epochs * steps_per_epoch, 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def augmentation_on_device(seeds, load_size, loop):
    """The batch's augmentation parameters (transforms.augmentation_params) on the device, from each image's seed;
    None when the workers augment. On CUDA they are copied from pinned memory, which does not wait for the GPU."""
    if loop.augment_on != "device":
        return None
    params = torch.from_numpy(augmentation_params(seeds.numpy(), load_size))
    if loop.device.type == "cuda":
        params = params.pin_memory()
    return params.to(loop.device, non_blocking=True)


def model_input(images, params, loop):
    """A training batch on the device as the model takes it: augmented by `params` (or, None, already in the
    workers), normalised, in the chosen memory layout."""
    if params is not None:
        images = augment_batch(images, params, loop.image_size)
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


def optimizer_step(net, images, targets, training, loop):
    """One step of a run_folder.Training on a model-ready batch; the loss, left on the device (reading it would wait
    for the GPU)."""
    # no autocast cache: each weight is cast once a forward anyway, and torch's CUDA graph notes ask for it off
    with torch.autocast(loop.device.type, dtype=loop.dtype, enabled=loop.dtype is not None, cache_enabled=False):
        logits = net(images)
    loss = training.criterion(logits.float(), targets)
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    return loss


def train_step(net, images, targets, seeds, training, loop):
    """One training step of a loader's batch (uint8 images, targets, augmentation seeds), replayed as a CUDA graph
    when the loop has one; the loss, left on the device. The cosine schedule steps after it, on the host."""
    images = images.to(loop.device, non_blocking=True)
    targets = targets.to(loop.device, non_blocking=True)
    params = augmentation_on_device(seeds, images.shape[-1], loop)
    if loop.graphed is not None:
        loss = loop.graphed(images, params, targets)
    else:
        loss = augmented_step(net, images, params, targets, training, loop)
    if loop.step_scheduler is not None:
        loop.step_scheduler.step()
    return loss


def augmented_step(net, images, params, targets, training, loop):
    """optimizer_step on device images augmented by `params`: the step, eager or captured as a CUDA graph."""
    return optimizer_step(net, model_input(images, params, loop), targets, training, loop)


def graphed_step(wanted, net, training, loop, log):
    """train.py's step as a cuda_graphs.GraphedStep when `wanted` (CUDA_GRAPHS) and this run can capture it; else
    None, saying why."""
    if not wanted:
        return None
    possible, why = graph_support(loop.device, loop.world_size, loop.dtype)
    if not possible:
        log(f"CUDA_GRAPHS: {why}; training without graphs")
        return None

    def step(images, params, targets):
        return augmented_step(net, images, params, targets, training, loop)

    return GraphedStep(step, training.optimizer, capture=loop.device.type == "cuda", log=log)


def train_epoch(net, batches, training, loop, epoch, step, totals, stop):
    """One epoch of `net` (training.net, or its DDP or compiled wrapper) trained by a run_folder.Training, from
    `step`; returns the steps done. The device is read every SYNC_EVERY steps and at the epoch's
    end: the losses (a non-finite one stops the run, naming its step) and a stop request, which ends the epoch
    early (without error) on every rank at once."""
    net.train()
    first_step, steps = step, step + len(batches)
    bar = tqdm(total=steps, initial=step, desc=f"epoch {epoch}/{loop.epochs} train", disable=not loop.show_progress)
    window, started, learning_rates = StepLosses(loop.device), time.perf_counter(), []
    for images, targets, seeds in batches:
        loss = train_step(net, images, targets, seeds, training, loop)
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


@dataclass
class Validation:
    """What one validation pass measured, gathered over all ranks."""

    loss: float  # weighted as in training
    aurocs: np.ndarray  # per finding; NaN where a finding lacks positives or negatives
    mean_auroc: float  # over the findings whose AUROC is defined
    targets: np.ndarray
    probabilities: np.ndarray
    crops: list  # this rank's first few validation crops (for the heat maps)


class LabelledBCE(torch.nn.BCEWithLogitsLoss):
    """BCEWithLogitsLoss with pos_weight, averaged over the labelled entries only: a NaN target (a finding the film's
    dataset does not label, or an uncertain one under UNCERTAIN = "ignore") adds no loss and no gradient. Without NaN
    it is BCEWithLogitsLoss's mean."""

    def forward(self, logits, targets):
        labelled = ~torch.isnan(targets)
        losses = F.binary_cross_entropy_with_logits(
            logits, torch.where(labelled, targets, 0), pos_weight=self.pos_weight, reduction="none"
        )
        return torch.where(labelled, losses, 0).sum() / labelled.sum().clamp(min=1)


def validate(net, loader, pos_weight, loop):
    """A Validation of the model on the validation batches."""
    from metrics import auroc_per_finding, mean_auroc  # scikit-learn: imported here, not in every DataLoader worker

    device, world_size, crops = loop.device, loop.world_size, []

    def prepare(images):
        if len(crops) < HEAT_MAP_IMAGES:
            crops.extend(images[: HEAT_MAP_IMAGES - len(crops), 0].cpu().numpy())
        return normalize(images.to(device, non_blocking=True), loop.channels_last)

    def progress(batches):
        return tqdm(batches, desc="  validation", leave=False, disable=not loop.show_progress)

    logits, targets = predict_logits(net, loader, prepare, loop.dtype, progress)
    indices = torch.tensor(list(loader.sampler))  # DistributedSampler pads ranks to equal size: de-duplicate
    indices = gather_rows(indices, device, world_size).numpy()
    _, first = np.unique(indices, return_index=True)
    logits = gather_rows(logits, device, world_size)[first]
    targets = gather_rows(targets, device, world_size)[first]
    loss = LabelledBCE(pos_weight=pos_weight.cpu())(logits, targets).item()
    probabilities, targets = torch.sigmoid(logits).numpy(), targets.numpy()
    aurocs = auroc_per_finding(targets, probabilities)
    return Validation(loss, aurocs, mean_auroc(aurocs), targets, probabilities, crops)


def build_training(
    model_settings, training_settings, counts, pos_weight, device, dtype, channels_last, steps, fold=True
):
    """A run_folder.Training of a settings.ModelSettings and TrainingSettings: the model (head bias at the weighted
    base rate; the frozen blocks' BatchNorm folded into their convolutions and cast to `dtype` once, unless not
    `fold`, which bench.py times), AdamW on its trainable parameters, the scheduler (`steps` per epoch), the loss
    scaler (fp16 only) and the pos_weight-ed loss."""
    built = model_settings
    net = build_model(len(FINDINGS), built.pretrained, built.trainable_layers, built.dropout, built.backbone, fold)
    init_head_bias(net, *counts, pos_weight)
    net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    cast_frozen(net, dtype or torch.float32)
    trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]
    # fused: one kernel for all parameters (on this CPU 18 ms a step instead of 44 for the whole ResNet-50); on CUDA
    # it also takes GradScaler's scale and inf check on the device, so fp16 steps need no wait for the device
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        trainable, lr=training_settings.learning_rate, weight_decay=training_settings.weight_decay, fused=fused
    )
    return Training(
        net=net,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, training_settings, steps),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        criterion=LabelledBCE(pos_weight=torch.tensor(pos_weight, dtype=torch.float32, device=device)),
    )


def compiled(net, wanted, device, log):
    """torch.compile(net) when `wanted` (COMPILE) and this device can compile; else the net, saying why."""
    if not wanted:
        return net
    possible, why = compile_support(device)
    if not possible:
        log(f"COMPILE: {why}; training without compiling")
        return net
    return torch.compile(net)


@dataclass
class Run:
    """A started run: its settings, where it runs, its data and batches, what trains, and where it stands."""

    settings: Settings
    run_dir: Path
    device: torch.device
    is_main: bool
    log: object
    labels: object  # the label table with image paths
    split: object  # train / val / test per row
    train_batches: object
    val_batches: object
    training: Training
    net: object  # what trains: training.net, or its DDP or compiled wrapper
    validation_net: object  # training.net or its DDP wrapper, uncompiled: eval mode and a short last batch would
    # compile (or, under reduce-overhead, record graphs) again
    loop: Loop
    tensorboard: TensorBoard
    history: list
    position: Position
    totals: EpochTotals


def train(settings):
    """Train a run to its end (or to a stop request, which saves it); the process's exit code."""
    run = start_run(settings)
    if run is None:
        return 0  # finished, and said so
    stop = StopRequest()
    try:
        code = train_epochs(run, stop)
    finally:
        stop.restore()
        close_workers(run.train_batches, run.val_batches)
        run.tensorboard.close(settings, run.history, run.loop.dtype)
    if code == 0 and run.history:
        run.log(summary(run.history, run.run_dir))
        if len(run.labels.dataset.unique()) > 1:
            run.log(sampling(settings.data, run.labels, run.split))
        if run.is_main:
            batch_size, amp = settings.loader.batch_size, settings.run.amp
            fit_run_statistics(run.run_dir, settings.data, batch_size, amp, run.labels, run.split, run.device, run.log)
    return code


def start_run(settings):
    """The Run a new or resumed run starts from, with its folder written; None when the run has finished."""
    rank, world_size, device = setup_distributed(select_device(settings.run.device))
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    run_dir = Path(settings.run.out_dir)
    resume_path, checkpoint = open_run(settings, run_dir, is_main, log)
    if resume_path is not None and checkpoint is None:
        return None
    warn_about_settings(settings, log)
    torch.manual_seed(settings.data.seed)
    dtype = autocast_dtype(device, settings.run.amp)
    channels_last = use_channels_last(device, settings.run.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log(
        f"device: {device} ({device_name(device)}); autocast {dtype or 'off (fp32)'}; channels_last {channels_last}; "
        f"augmentation on the {settings.loader.augment_on}; {world_size} process(es)"
    )
    films = load_split_labels(settings.data, checkpoint, resume_path)
    labels, split = films.rows, films.split
    counts, pos_weight = describe_data(settings, films, log)
    batches = make_loaders(settings.data, settings.loader, labels, split, device, rank, world_size, log)
    steps = len(batches[0])
    training = build_training(
        settings.model, settings.training, counts, pos_weight, device, dtype, channels_last, steps
    )
    training.split = split_record(labels, split, films.sources)
    history, position, totals = [], Position(), EpochTotals()
    if checkpoint is not None:
        history, position, totals = restore(training, checkpoint, device)
        log(f"resumed from {resume_path} at epoch {position.epoch}, step {position.step}")
    if is_main and (checkpoint is None or not (run_dir / "split.csv").is_file()):
        write_run_folder(run_dir, labels, split, settings, pos_weight)  # only now: the run is known to start
    validation_net = data_parallel(training.net, world_size, device)
    net = compiled(validation_net, settings.run.compile, device, log)
    done = (position.epoch - 1) * steps + position.step
    tensorboard = TensorBoard(run_dir, is_main and settings.run.tensorboard, done + 1, log)  # purge what a crash left
    loop = make_loop(settings, device, dtype, channels_last, world_size, steps, training, tensorboard, is_main)
    loop.graphed = graphed_step(settings.run.cuda_graphs, net, training, loop, log)
    return Run(
        settings,
        run_dir,
        device,
        is_main,
        log,
        labels,
        split,
        *batches,
        training,
        net,
        validation_net,
        loop,
        tensorboard,
        history,
        position,
        totals,
    )


def make_loop(settings, device, dtype, channels_last, world_size, steps, training, tensorboard, is_main):
    """The Loop of this process: how it runs its steps, fixed for the run."""
    return Loop(
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        augment_on=settings.loader.augment_on,
        image_size=settings.data.image_size,
        world_size=world_size,
        epochs=settings.training.epochs,
        steps_per_epoch=steps,
        step_scheduler=training.scheduler if settings.training.lr_schedule == "cosine" else None,
        tensorboard=tensorboard if tensorboard.writer else None,
        show_progress=is_main,
    )


def describe_data(settings, films, log):
    """(the training split's labelled (positives, negatives), the pos_weight from them), with the label files, each
    dataset's films, and the split's sizes said."""
    labels, split = films.rows, films.split
    log(f"labels: {', '.join(str(path) for path in films.sources)} ({len(labels):,} images)")
    if not is_nih_only(settings.data):
        for line in describe(films):
            log(f"  {line}")
    if len(films.rows.dataset.unique()) > 1:
        log(f"  {sampling(settings.data, films.rows, films.split)}")
    counts = count_positives(labels[split == "train"][list(FINDINGS)].to_numpy())
    pos_weight = pos_weight_from_counts(*counts, settings.training.pos_weight, settings.training.pos_weight_cap)
    for part in ("train", "val", "test"):
        rows = labels[split == part]
        log(f"{part:>5}: {len(rows):>7,} images, {rows['patient_id'].nunique():>6,} patients")
    return counts, pos_weight


def data_parallel(net, world_size, device):
    """The network in DistributedDataParallel under torchrun; else the network."""
    if world_size == 1:
        return net
    ignored = derived_buffers(net)  # the same on every process: not broadcast every step
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ignored)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def train_epochs(run, stop):
    """The epochs left of a Run, each trained, validated and saved; the exit code (128 + the signal when stopped)."""
    settings, training, loop, log = run.settings, run.training, run.loop, run.log
    for epoch in range(run.position.epoch, settings.training.epochs + 1):
        started = time.perf_counter()
        first_step = run.position.step if epoch == run.position.epoch else 0
        if first_step == 0:
            torch.manual_seed(mix_seed(settings.data.seed, epoch))  # dropout: a stream per epoch, so resume is exact
            run.totals = EpochTotals()
        run.train_batches.sampler.set_epoch(epoch, skip=first_step * settings.loader.batch_size)
        step = train_epoch(run.net, run.train_batches, training, loop, epoch, first_step, run.totals, stop)
        if stop.signal is not None or step < first_step + len(run.train_batches):
            if run.is_main:
                position = Position(epoch, step)
                state = training_state(training, settings, run.history, position, run.totals, run.device, loop.dtype)
                save_checkpoint(state, run.run_dir / "interrupted.pth")
            log(
                f"stopped at epoch {epoch}, step {step}: saved {run.run_dir / 'interrupted.pth'}; continue with "
                "the same command plus --resume last"
            )
            return 128 + (stop.signal or 0)
        validation = validate(run.validation_net, run.val_batches, training.criterion.pos_weight, loop)
        if settings.training.lr_schedule == "plateau":
            training.scheduler.step(validation.loss)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=run.totals.mean(),
            val_loss=validation.loss,
            val_mean_auroc=validation.mean_auroc,
            lr=training.optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
            aurocs={finding: float(value) for finding, value in zip(FINDINGS, validation.aurocs)},
        )
        datasets = run.labels.dataset[(run.split == "val").to_numpy()].to_numpy()
        if len(set(datasets)) > 1:
            metrics.dataset_aurocs = auroc_by_dataset(validation, datasets)
        run.history.append(metrics.row())
        log(
            f"epoch {epoch}: train loss {metrics.train_loss:.4f}, val loss {metrics.val_loss:.4f}, "
            f"mean AUROC {metrics.val_mean_auroc:.4f}, lr {metrics.lr:.1e}"
        )
        if metrics.dataset_aurocs:
            said = ", ".join(f"{name} {value:.4f}" for name, value in metrics.dataset_aurocs.items())
            log(f"  mean AUROC by dataset: {said}")
        if run.is_main:
            save_and_log_epoch(run, metrics, validation)
        ended = finished(run.history, Position(epoch + 1, 0), metrics.lr, settings.training)
        if ended:
            log(f"training ends: {ended}")
            break
    return 0


def auroc_by_dataset(validation, datasets):
    """{dataset: the mean validation AUROC over its own films} of a union (`datasets`: each validation film's)."""
    from metrics import auroc_per_finding, mean_auroc

    return {
        name: mean_auroc(
            auroc_per_finding(validation.targets[datasets == name], validation.probabilities[datasets == name])
        )
        for name in dict.fromkeys(datasets)
    }


def save_and_log_epoch(run, metrics, validation):
    """Rank 0, after an epoch: its checkpoints, metrics.csv and curves, and its TensorBoard figures and heat maps."""
    settings, loop = run.settings, run.loop
    position = Position(metrics.epoch + 1, 0)
    state = training_state(run.training, settings, run.history, position, run.totals, run.device, loop.dtype)
    save_epoch(run.run_dir, run.history, state, settings.run.keep_training_state)
    global_step = metrics.epoch * loop.steps_per_epoch
    run.tensorboard.epoch(global_step, metrics, validation.targets, validation.probabilities)
    if run.tensorboard.writer:
        from heatmaps import top_finding_overlays  # grad-cam and matplotlib: not in DataLoader workers

        drawn = top_finding_overlays(run.training.net, validation.crops, FINDINGS, run.device)
        run.tensorboard.heat_maps(global_step, drawn)


def main(argv=None):
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    try:
        with one_line_errors(FloatingPointError):
            code = train(settings)
    finally:
        shut_down()
    sys.exit(code)


if __name__ == "__main__":
    main()
