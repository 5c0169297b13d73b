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

import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import configurator
from dataset import (
    FINDINGS,
    DataError,
    attach_image_paths,
    count_positives,
    find_label_file,
    make_split,
    pos_weight_from_counts,
    read_labels,
    saved_split,
    split_record,
)
from distributed import any_rank, gather_rows, setup_distributed, shut_down
from heatmaps import top_finding_overlays
from loaders import make_loaders
from metrics import auroc_per_finding, mean_auroc
from model import (
    CheckpointError,
    autocast_dtype,
    build_model,
    frozen_blocks,
    init_head_bias,
    predict_logits,
    save_checkpoint,
    select_device,
    use_channels_last,
)
from run_folder import (
    HEAT_MAP_IMAGES,
    TensorBoard,
    finished,
    open_run,
    restore,
    save_epoch,
    summary,
    training_state,
    write_run_folder,
)
from transforms import augment_batch, augmentation_params, normalize

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
LR_SCHEDULE = "plateau"  # "plateau": ReduceLROnPlateau on validation loss; "cosine": warmup, then cosine decay to 0
LR_PATIENCE = 1  # plateau: epochs without a lower validation loss before the learning rate drops
LR_FACTOR = 0.1  # plateau: the factor the learning rate is multiplied by then
WARMUP_EPOCHS = 0.0  # cosine: epochs of linear warmup from 0 (per step)
MIN_LEARNING_RATE = 1e-8  # plateau: the run ends when the learning rate has been cut below this (it would not learn)
EARLY_STOPPING_PATIENCE = 3  # epochs without a lower validation loss before training stops; 0: never stop early
VAL_FRACTION = 0.1  # share of the (train_val) patients held out for validation
TEST_FRACTION = 0.2  # share of patients held out for testing when there are no official split lists
DROP_MISSING_IMAGES = False  # train on the images present when some in the CSV are missing (else an error)
NUM_WORKERS = -1  # DataLoader worker processes per GPU; -1: the CPU cores per GPU less one
AUGMENT_ON = "device"  # "device": crop, rotation, jitter batched on the GPU (or CPU); "workers": in DataLoader workers
CACHE_ON_DEVICE = "auto"  # "auto": hold the cached images in device memory when they fit (no DataLoader); "on"; "off"
AMP = True  # mixed precision: bf16 on CUDA (fp16 with loss scaling on older GPUs) and on CPUs with native bf16
CHANNELS_LAST = True  # NHWC memory layout on CUDA and the CPU (faster convolutions)
COMPILE = False  # torch.compile the model (faster steps after a slow first one)
TENSORBOARD = True  # write TensorBoard events to OUT_DIR (tensorboard --logdir checkpoints)
SEED = 0  # seeds the split, the data order, augmentation and dropout
DEVICE = "auto"  # "auto" (cuda, else mps, else cpu), or a torch device such as "cuda:1" or "cpu"
OUT_DIR = "checkpoints/resnet50"  # the run folder: checkpoints, metrics.csv, split.csv, config.json, plots
RESUME = ""  # "" (a new run), "last" (the newest checkpoint in OUT_DIR) or a checkpoint path
# -----------------------------------------------------------------------------


# the run prints its estimated time per epoch after this many steps
ETA_AFTER_STEPS = 50


def settings():
    """{NAME: (default, comment)} of the constants above (configurator.py reads this file for --help)."""
    return configurator.settings(__file__, globals())


def parse_config(argv):
    return configurator.parse_config(argv, settings(), __doc__)


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


def load_split_labels(config, checkpoint, checkpoint_path):
    """(label file, labels with image paths, split per row): a new split for a new run; for a resumed run the
    checkpoint's own (checked against the split.csv beside it)."""
    csv_path = find_label_file(config["DATA_DIR"], config["CSV"])
    labels = attach_image_paths(read_labels(csv_path), config["DATA_DIR"], config["DROP_MISSING_IMAGES"])
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


def make_scheduler(optimizer, config, steps_per_epoch):
    """ReduceLROnPlateau (stepped per epoch on validation loss), or linear warmup then cosine decay (per step)."""
    if config["LR_SCHEDULE"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config["LR_FACTOR"], patience=config["LR_PATIENCE"]
        )
    if config["LR_SCHEDULE"] != "cosine":
        raise DataError(f"LR_SCHEDULE is {config['LR_SCHEDULE']!r}: use plateau or cosine.")
    warmup, total = config["WARMUP_EPOCHS"] * steps_per_epoch, max(config["EPOCHS"] * steps_per_epoch, 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_input(images, seeds, context):
    """A training batch as the model takes it: augmented on the device from each image's seed (or already in the
    workers), normalised, in the chosen memory layout."""
    images = images.to(context["device"], non_blocking=True)
    if context["augment_on"] == "device":
        params = torch.from_numpy(augmentation_params(seeds.numpy(), images.shape[-1]))
        images = augment_batch(images, params.to(context["device"], non_blocking=True), context["image_size"])
    return normalize(images, context["channels_last"])


def train_epoch(model, loader, optimizer, scaler, criterion, context, epoch, step, totals, stop):
    """One epoch from `step`; returns the steps done. Stops early (without error) when a stop is requested."""
    model.train()
    device, dtype, world_size = context["device"], context["dtype"], context["world_size"]
    bar = tqdm(loader, desc=f"epoch {epoch} train", initial=step, total=step + len(loader), disable=context["rank"])
    started, first_step = time.perf_counter(), step
    for images, targets, seeds in bar:
        images = model_input(images, seeds, context)
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
        if context.get("step_scheduler"):
            context["step_scheduler"].step()
        step += 1
        loss_value = loss.item()  # the step's one wait for the device
        totals["loss_sum"] += loss_value * len(targets)
        totals["images"] += len(targets)
        seconds = time.perf_counter() - started
        rate, learning_rate = (step - first_step) * len(targets) * world_size / seconds, optimizer.param_groups[0]["lr"]
        average = totals["loss_sum"] / totals["images"]
        bar.set_postfix(loss=f"{average:.4f}", lr=f"{learning_rate:.1e}", img_s=f"{rate:.0f}", refresh=False)
        if context.get("tensorboard"):
            context["tensorboard"].step(
                (epoch - 1) * context["steps_per_epoch"] + step, loss_value, learning_rate, rate
            )
        if step - first_step == ETA_AFTER_STEPS and not context["rank"]:
            estimate = seconds / ETA_AFTER_STEPS * (first_step + len(loader))
            bar.write(f"epoch {epoch}: about {estimate / 60:.1f} min of training per epoch at {rate:.0f} img/s")
        if any_rank(stop.signal is not None, device, world_size):
            break
    bar.close()
    return step


def validate(model, loader, pos_weight, context):
    """Validation loss (same weighting as training), per-finding AUROC, targets and probabilities, gathered over all
    ranks; and this rank's first few validation crops (for the heat maps)."""
    device, world_size, crops = context["device"], context["world_size"], []

    def prepare(images):
        if len(crops) < HEAT_MAP_IMAGES:
            crops.extend(images[: HEAT_MAP_IMAGES - len(crops), 0].cpu().numpy())
        return normalize(images.to(device, non_blocking=True), context["channels_last"])

    def progress(batches):
        return tqdm(batches, desc="  validation", leave=False, disable=context["rank"])

    logits, targets = predict_logits(model, loader, prepare, context["dtype"], progress)
    indices = torch.tensor(list(loader.sampler))  # DistributedSampler pads ranks to equal size: de-duplicate
    indices = gather_rows(indices, device, world_size).numpy()
    _, first = np.unique(indices, return_index=True)
    logits = gather_rows(logits, device, world_size)[first]
    targets = gather_rows(targets, device, world_size)[first]
    loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight.cpu()).item()
    probabilities = torch.sigmoid(logits).numpy()
    return loss, auroc_per_finding(targets.numpy(), probabilities), targets.numpy(), probabilities, crops


def build_training(config, counts, pos_weight, device, dtype, channels_last, steps_per_epoch):
    """The model (head bias at the weighted base rate), AdamW on its trainable parameters, the scheduler, the loss
    scaler (fp16 only) and the pos_weight-ed loss."""
    model = build_model(len(FINDINGS), config["PRETRAINED"], config["TRAINABLE_LAYERS"], config["DROPOUT"])
    init_head_bias(model, *counts, pos_weight)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # fused: one kernel for all parameters (on this CPU 18 ms a step instead of 44 for the whole ResNet-50)
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        trainable, lr=config["LEARNING_RATE"], weight_decay=config["WEIGHT_DECAY"], fused=fused
    )
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": make_scheduler(optimizer, config, steps_per_epoch),
        "scaler": torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        "criterion": torch.nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(pos_weight, dtype=torch.float32, device=device)
        ),
    }


def train(config):
    rank, world_size, device = setup_distributed(select_device(config["DEVICE"]))
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    run_dir = Path(config["OUT_DIR"])
    resume_path, checkpoint = open_run(config, run_dir, device, is_main, log)
    if resume_path is not None and checkpoint is None:
        return 0  # finished, and said so
    warn_about_settings(config, log)
    torch.manual_seed(config["SEED"])
    dtype = autocast_dtype(device, config["AMP"])
    channels_last = use_channels_last(device, config["CHANNELS_LAST"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    log(
        f"device: {device} ({name}); autocast {dtype or 'off (fp32)'}; channels_last {channels_last}; "
        f"augmentation on the {'device' if config['AUGMENT_ON'] == 'device' else 'workers'}; {world_size} process(es)"
    )

    csv_path, labels, split = load_split_labels(config, checkpoint, resume_path)
    counts = count_positives(labels[split == "train"][list(FINDINGS)].to_numpy())
    pos_weight = pos_weight_from_counts(*counts, config["POS_WEIGHT"], config["POS_WEIGHT_CAP"])
    for part in ("train", "val", "test"):
        rows = labels[split == part]
        log(f"{part:>5}: {len(rows):>7,} images, {rows['patient_id'].nunique():>6,} patients")
    if is_main and (checkpoint is None or not (run_dir / "split.csv").is_file()):
        write_run_folder(run_dir, labels, split, config, pos_weight)
    train_loader, val_loader = make_loaders(config, labels, split, device, rank, world_size, log)
    steps_per_epoch = len(train_loader)
    parts = build_training(config, counts, pos_weight, device, dtype, channels_last, steps_per_epoch)
    parts["split"] = split_record(labels, split, csv_path)
    history, position, totals = [], {"epoch": 1, "step": 0}, {"loss_sum": 0.0, "images": 0}
    if checkpoint is not None:
        history, position, totals = restore(parts, checkpoint)
        log(f"resumed from {resume_path} at epoch {position['epoch']}, step {position['step']}")
    model = parts["model"]
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config["COMPILE"]:
        model = torch.compile(model)
    done = (position["epoch"] - 1) * steps_per_epoch + position["step"]
    tensorboard = TensorBoard(run_dir, is_main and config["TENSORBOARD"], done + 1, log)  # purge what a crash left
    context = {
        "device": device,
        "dtype": dtype,
        "world_size": world_size,
        "rank": rank,
        "channels_last": channels_last,
        "augment_on": config["AUGMENT_ON"],
        "image_size": config["IMAGE_SIZE"],
        "step_scheduler": parts["scheduler"] if config["LR_SCHEDULE"] == "cosine" else None,
        "tensorboard": tensorboard,
        "steps_per_epoch": steps_per_epoch,
    }
    optimizer, criterion = parts["optimizer"], parts["criterion"]

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
                model, train_loader, optimizer, parts["scaler"], criterion, context, epoch, first_step, totals, stop
            )
            if stop.signal is not None or step < first_step + len(train_loader):
                if is_main:
                    state = training_state(parts, config, history, {"epoch": epoch, "step": step}, totals)
                    save_checkpoint(state, run_dir / "interrupted.pth")
                log(
                    f"stopped at epoch {epoch}, step {step}: saved {run_dir / 'interrupted.pth'}; continue with "
                    "the same command plus --resume last"
                )
                return 128 + (stop.signal or 0)
            val_loss, aurocs, targets, probabilities, crops = validate(model, val_loader, criterion.pos_weight, context)
            if config["LR_SCHEDULE"] == "plateau":
                parts["scheduler"].step(val_loss)
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
                state = training_state(parts, config, history, {"epoch": epoch + 1, "step": 0}, totals)
                save_epoch(run_dir, history, state)
                tensorboard.epoch(epoch * steps_per_epoch, row, FINDINGS, targets, probabilities)
                if tensorboard.writer:
                    drawn = top_finding_overlays(parts["model"], crops, FINDINGS, device)
                    tensorboard.heat_maps(epoch * steps_per_epoch, drawn)
            ended = finished(history, {"epoch": epoch + 1, "step": 0}, row["lr"], config)
            if ended:
                log(f"training ends: {ended}")
                break
    finally:
        stop.restore()
        tensorboard.close(config, history)
    if history:
        log(summary(history, run_dir))
    return 0


def main(argv=None):
    config = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        code = train(config)
    except (DataError, CheckpointError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    finally:
        shut_down()
    sys.exit(code)


if __name__ == "__main__":
    main()
