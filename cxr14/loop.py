"""The machinery of train.py's loop: a training step on the device (augmented there, or replayed as a CUDA graph),
an epoch of them with its progress bar and time estimate, the losses read back from the device every SYNC_EVERY
steps, the stop request (Ctrl-C, SIGTERM), the loss over labelled entries, and the DDP and compiled wrappers. bench.py
times these, as train.py runs them.
"""

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cxr14.cuda_graphs import GraphedStep, graph_support
from cxr14.devices import (
    autocast_dtype,
    compile_support,
    device_name,
    dtype_name,
    select_device,
    use_channels_last,
)
from cxr14.distributed import setup_distributed, sum_over_ranks
from cxr14.run_folder import EpochTotals, Position, TensorBoard, Training
from cxr14.settings import Settings
from cxr14.weights_files import pretrained_source
from model import cast_frozen, derived_buffers, init_head_bias
from transforms import augment_batch, augmentation_params, normalize

# the loop reads the loss back from the device (and agrees on a stop request) once every this many steps: each read
# waits for the GPU to finish its queued work, so reading every step would leave it idle between steps
SYNC_EVERY = 10


# the run prints its time estimate once this many seconds of training, or a tenth of the epoch, have passed
ETA_AFTER_SECONDS = 20


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
        learning_rates.append(head_learning_rate(training.optimizer))
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
    logits: np.ndarray = None  # float64, in the validation rows' order: what the end's fit reuses (fitting.py)
    features: np.ndarray = None  # float32, the OOD features of the same pass (model.ood_features_and_logits)


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


def compiled(net, wanted, device, log):
    """torch.compile(net) when `wanted` (COMPILE) and this device can compile; else the net, saying why."""
    if not wanted:
        return net
    possible, why = compile_support(device)
    if not possible:
        log(f"COMPILE: {why}; training without compiling")
        return net
    return torch.compile(net)


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


def data_parallel(net, world_size, device):
    """The network in DistributedDataParallel under torchrun; else the network."""
    if world_size == 1:
        return net
    ignored = derived_buffers(net)  # the same on every process: not broadcast every step
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ignored)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def auroc_by_dataset(validation, datasets):
    """{dataset: the mean validation AUROC over its own films} of a union (`datasets`: each validation film's)."""
    from cxr14.metrics import auroc_per_finding, mean_auroc

    return {
        name: mean_auroc(
            auroc_per_finding(validation.targets[datasets == name], validation.probabilities[datasets == name])
        )
        for name in dict.fromkeys(datasets)
    }


def warn_about_settings(settings, log):
    """Settings that run but waste the run: said at the start, with the fix."""
    model_settings, data = settings.model, settings.data
    if pretrained_source(model_settings.pretrained) == "none" and model_settings.trainable_layers != "all":
        log(
            f"warning: PRETRAINED = none with TRAINABLE_LAYERS = {model_settings.trainable_layers!r}: the frozen "
            "blocks keep random weights and pass little of use on. Train them: --trainable_layers all"
        )
    if data.image_size > data.load_size:
        log(
            f"warning: IMAGE_SIZE {data.image_size} is larger than LOAD_SIZE {data.load_size}: every crop "
            f"is upscaled, which adds no detail. Set LOAD_SIZE to about IMAGE_SIZE / 0.875 (and rebuild the cache)."
        )


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
    kept: dict = field(default_factory=dict)  # {epoch: Validation} of the epochs best.pth or best_auroc.pth hold now


def place_run(settings):
    """(rank, world size, device, autocast dtype, channels_last) of this process, said once: the device from DEVICE,
    one per process under torchrun."""
    rank, world_size, device = setup_distributed(select_device(settings.run.device))
    dtype = autocast_dtype(device, settings.run.amp)
    channels_last = use_channels_last(device, settings.run.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if rank == 0:
        print(
            f"device: {device} ({device_name(device)}); autocast {dtype or 'off (fp32)'}; channels_last "
            f"{channels_last}; augmentation on the {settings.loader.augment_on}; {world_size} process(es)"
        )
    return rank, world_size, device, dtype, channels_last


def warn_about_precision(checkpoint, dtype, log):
    """A resume in another precision than the run trained in (AMP, or another GPU) goes on, saying that it is no
    longer the exact continuation a resume in the same precision is."""
    then, now = checkpoint.get("amp_dtype"), dtype_name(dtype)
    if then is not None and then != now:
        log(
            f"warning: this run trained in {then} and goes on in {now} (AMP or the device changed): the weights "
            f"continue, but not exactly as an uninterrupted {then} run would. Resume with the same AMP setting on "
            "the same kind of device for an exact continuation."
        )


def ready_to_train(net, counts, pos_weight, device, dtype, channels_last):
    """model.py's network ready for its first step: the head's bias at the weighted base rate of the training split's
    (positives, negatives) `counts`, on the device in its memory layout, the frozen blocks cast to `dtype` once."""
    init_head_bias(net, *counts, pos_weight)
    net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    cast_frozen(net, dtype or torch.float32)
    return net


def head_learning_rate(optimizer):
    """The learning rate of the head: the highest of the groups (model.parameter_groups' LAYER_DECAY lowers the
    others'), which the schedules scale alike."""
    return max(group["lr"] for group in optimizer.param_groups)


def fused_optimizer(device):
    """Whether AdamW runs as one kernel for all parameters here: on this CPU 18 ms a step instead of 44 for the whole
    ResNet-50; on CUDA it also takes GradScaler's scale and inf check on the device, so fp16 steps need no wait."""
    return device.type in ("cuda", "cpu")


def loss_scaler(device, dtype):
    """The GradScaler of a run: enabled under fp16 alone (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
