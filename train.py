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

from cxr14 import configurator
from cxr14.configurator import Above, AtLeast, Between, CommaList, Flag, OneOf, Side, Text, Weights
from dataset import POS_WEIGHT_POLICIES

LAYERS = CommaList("stem", "layer1", "layer2", "layer3", "layer4", "head", alone="all", count="blocks")  # model.BLOCKS
BACKBONES = OneOf("resnet50", "densenet121", "convnext_tiny", "eva_x_tiny", "eva_x_small", "eva_x_base", prefix="timm/")
DATASETS = CommaList("nih", "chexpert", "mimic", "padchest", "vindr", "rsna", "csv")  # training_films.TRAINING_DATASETS

# ----------------------------------------------------------------------------- settings (python train.py --help)
# NAME: what it may be = its default  # what it means. Edit a default here, or override it with a config file or
# --name value; every value is checked against what it may be before the run writes or reads anything.
DATASET: DATASETS = "nih"  # the films to train on, or a union: nih,chexpert (training_films.py)
DATA_DIR: Text = "data/nih"  # the dataset's folder (label CSV and images); for a union one per dataset, comma-separated
CSV: Text = ""  # label file; empty: the dataset's own (NIH: Data_Entry_2017*.csv); a union: its csv member's
UNCERTAIN: OneOf("ignore", "zeros", "ones") = "ignore"  # CheXpert/MIMIC -1: unlabelled (U-Ignore), negative, positive
DATASET_WEIGHTS: Weights = ""  # a union's share of each epoch per dataset: empty, by size; 1,1: equal shares
BACKBONE: BACKBONES = "resnet50"  # torchvision's (model.BACKBONES), EVA-X's ViTs (model.EVA_X), or timm/NAME (timm's)
IMAGE_SIZE: Side() = 224  # side of the square crop the network sees
LOAD_SIZE: Side() = 256  # images are letterboxed to this square on load; training crops are taken from it
CACHE: Text = "auto"  # "auto": each dataset's cache in DATA_DIR when built (cache.py), "off" (read films), or a folder
BATCH_SIZE: AtLeast(1) = 64  # images per step on each GPU
EPOCHS: AtLeast(1) = 10  # passes over the training split
LEARNING_RATE: Above(0.0) = 1e-5  # AdamW learning rate; low, as suits fine-tuning pretrained weights
WEIGHT_DECAY: AtLeast(0.0) = 1e-4  # AdamW decoupled weight decay
DROPOUT: Between(0.0, 1.0) = 0.5  # dropout before the final Linear layer
PRETRAINED: Text = "imagenet"  # "imagenet" (the network's own: ImageNet's, EVA-X's), "none", hf-hub:ORG/NAME, or a file
TRAINABLE_LAYERS: LAYERS = "layer4"  # blocks that train besides the head: torchvision's layer1-4, or the last N blocks
LAYER_DECAY: Between(0.0, 1.0, low_included=False, high_included=True) = 1.0  # block l of L learns at LR * this^(L-l)
DROP_PATH: Between(0.0, 1.0) = 0.0  # stochastic depth of timm networks and EVA-X (drop_path_rate); torchvision: 0
POOLING: OneOf("avg", "token") = "avg"  # a ViT's features: the mean of its patch tokens (EVA-X), or its class token
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
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr14.checkpoints import save_checkpoint
from cxr14.configurator import check_out_folder
from cxr14.distributed import gather_rows, shut_down
from cxr14.errors import SettingsError, one_line_errors
from cxr14.inference import predict_logits
from cxr14.loaders import close_workers, make_loaders
from cxr14.loop import (
    LabelledBCE,
    Run,
    StopRequest,
    Validation,
    auroc_by_dataset,
    compiled,
    data_parallel,
    fused_optimizer,
    graphed_step,
    head_learning_rate,
    loss_scaler,
    make_loop,
    place_run,
    ready_to_train,
    train_epoch,
    warn_about_precision,
    warn_about_settings,
)
from cxr14.run_folder import (
    HEAT_MAP_IMAGES,
    EpochMetrics,
    EpochTotals,
    Position,
    TensorBoard,
    Training,
    best_epochs,
    finished,
    open_run,
    restore,
    save_epoch,
    summary,
    training_state,
    write_run_folder,
)
from cxr14.settings import from_config
from cxr14.training_films import (
    dataset_names,
    dataset_weights,
    load_split_labels,
    refuse_unlabelled,
    sampling,
    say_films,
)
from cxr14.weights_files import pretrained_source
from dataset import FINDINGS, count_positives, pos_weight_from_counts, split_record
from model import build_model, check_backbone_settings, parameter_groups
from transforms import mix_seed, normalize

# No matplotlib, scikit-learn or grad-cam up here: each DataLoader worker on Windows re-imports this file, and they
# are imported where used (validation's AUROC, the TensorBoard heat maps), so a worker stays small.


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
    dataset_names(data)  # DATASET and DATA_DIR paired, one folder per dataset
    dataset_weights(data)
    pretrained, source = str(model_settings.pretrained), pretrained_source(model_settings.pretrained)
    if source == "file" and not Path(pretrained).is_file():
        raise SettingsError(f"PRETRAINED = {pretrained!r}: use imagenet, none, hf-hub:ORG/NAME or a weights file")
    if source == "hub" and not model_settings.backbone.startswith("timm/"):
        raise SettingsError(f"PRETRAINED = {pretrained!r}: Hugging Face Hub weights are for a BACKBONE timm/NAME")
    check_backbone_settings(model_settings)


# ----------------------------------------------------------------------------- what trains


def build_training(settings, counts, pos_weight, device, dtype, channels_last, steps):
    """A run_folder.Training: the model (model.py; its head's bias at the weighted base rate) on the device, AdamW on
    its trainable parameters, the scheduler (`steps` per epoch), BCEWithLogitsLoss with pos_weight, and the loss
    scaler (fp16 only)."""
    model_settings, training_settings = settings.model, settings.training
    net = build_model(
        len(FINDINGS),
        model_settings.pretrained,
        model_settings.trainable_layers,
        model_settings.dropout,
        model_settings.backbone,
        image_size=settings.data.image_size,
        drop_path=model_settings.drop_path,
        pooling=model_settings.pooling,
    )
    net = ready_to_train(net, counts, pos_weight, device, dtype, channels_last)
    learning_rate = training_settings.learning_rate
    optimizer = torch.optim.AdamW(
        parameter_groups(net, learning_rate, training_settings.weight_decay, training_settings.layer_decay),
        lr=learning_rate,
        weight_decay=training_settings.weight_decay,
        fused=fused_optimizer(device),
    )
    scheduler = make_scheduler(optimizer, training_settings, steps)
    criterion = LabelledBCE(pos_weight=torch.tensor(pos_weight, dtype=torch.float32, device=device))
    return Training(net, optimizer, scheduler, loss_scaler(device, dtype), criterion)


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


# ----------------------------------------------------------------------------- the loop


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
            from cxr14.fitting import fit_run_statistics  # scikit-learn: not in DataLoader workers

            batch_size, amp = settings.loader.batch_size, settings.run.amp
            fitted = (run.run_dir, settings.data, batch_size, amp, run.labels, run.split, run.device, run.log)
            fit_run_statistics(*fitted, kept=run.kept)
    return code


def start_run(settings):
    """The Run a new or resumed run starts from, with its folder written; None when the run has finished."""
    check_out_folder(settings.run.out_dir, "OUT_DIR")  # before any work: not after the data has been read
    rank, world_size, device, dtype, channels_last = place_run(settings)
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    run_dir = Path(settings.run.out_dir)
    resume_path, checkpoint = open_run(settings, run_dir, is_main, log)
    if resume_path is not None and checkpoint is None:
        return None
    warn_about_settings(settings, log)
    torch.manual_seed(settings.data.seed)
    films = load_split_labels(settings.data, checkpoint, resume_path)
    labels, split = films.rows, films.split
    say_films(settings.data, films, log)
    counts = count_positives(labels[split == "train"][list(FINDINGS)].to_numpy())  # the training split's, only
    refuse_unlabelled(counts, films.sources)
    pos_weight = pos_weight_from_counts(*counts, settings.training.pos_weight, settings.training.pos_weight_cap)
    batches = make_loaders(settings.data, settings.loader, labels, split, device, rank, world_size, log)
    steps = len(batches[0])
    training = build_training(settings, counts, pos_weight, device, dtype, channels_last, steps)
    training.split = split_record(labels, split, films.sources)
    history, position, totals = [], Position(), EpochTotals()
    if checkpoint is not None:
        history, position, totals = restore(training, checkpoint, device)
        log(f"resumed from {resume_path} at epoch {position.epoch}, step {position.step}")
        warn_about_precision(checkpoint, dtype, log)
    if is_main and (checkpoint is None or not (run_dir / "split.csv").is_file()):
        write_run_folder(run_dir, labels, split, settings, pos_weight)  # only now: the run is known to start
    validation_net = data_parallel(training.net, world_size, device)
    net = compiled(validation_net, settings.run.compile, device, log)
    done = (position.epoch - 1) * steps + position.step
    tensorboard = TensorBoard(run_dir, is_main and settings.run.tensorboard, done + 1, log)  # purge what a crash left
    loop = make_loop(settings, device, dtype, channels_last, world_size, steps, training, tensorboard, is_main)
    loop.graphed = graphed_step(settings.run.cuda_graphs, net, training, loop, log)
    parts = (labels, split, *batches, training, net, validation_net, loop, tensorboard, history, position, totals)
    return Run(settings, run_dir, device, is_main, log, *parts)


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
            lr=head_learning_rate(training.optimizer),
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
            keep_best_validations(run, epoch, validation)
        ended = finished(run.history, Position(epoch + 1, 0), metrics.lr, settings.training)
        if ended:
            log(f"training ends: {ended}")
            break
    return 0


def validate(net, loader, pos_weight, loop):
    """A Validation of the model on the validation batches."""
    # scikit-learn: imported here, not in every DataLoader worker
    from cxr14.metrics import auroc_per_finding, mean_auroc

    device, world_size, crops = loop.device, loop.world_size, []

    def prepare(images):
        if len(crops) < HEAT_MAP_IMAGES:
            crops.extend(images[: HEAT_MAP_IMAGES - len(crops), 0].cpu().numpy())
        return normalize(images.to(device, non_blocking=True), loop.channels_last)

    def progress(batches):
        return tqdm(batches, desc="  validation", leave=False, disable=not loop.show_progress)

    # the OOD features come from the same pass: the run's end fits its statistics on them (cxr14/fitting.py)
    logits, targets, features = predict_logits(net, loader, prepare, loop.dtype, progress, features=True)
    indices = torch.tensor(list(loader.sampler))  # DistributedSampler pads ranks to equal size: de-duplicate
    indices = gather_rows(indices, device, world_size).numpy()
    _, first = np.unique(indices, return_index=True)
    logits, targets, features = (gather_rows(part, device, world_size)[first] for part in (logits, targets, features))
    loss = LabelledBCE(pos_weight=pos_weight.cpu())(logits, targets).item()
    probabilities, targets = torch.sigmoid(logits).numpy(), targets.numpy()
    aurocs = auroc_per_finding(targets, probabilities)
    outputs = {"logits": logits.double().numpy(), "features": features.numpy()}  # float32: 140 MB at NIH's size
    return Validation(loss, aurocs, mean_auroc(aurocs), targets, probabilities, crops, **outputs)


def keep_best_validations(run, epoch, validation):
    """Keep this epoch's validation outputs while best.pth or best_auroc.pth holds it: the run's end fits the
    statistics of those checkpoints on them instead of predicting the validation films again."""
    best = set(best_epochs(run.history))
    run.kept = {kept: outputs for kept, outputs in {**run.kept, epoch: validation}.items() if kept in best}


def save_and_log_epoch(run, metrics, validation):
    """Rank 0, after an epoch: its checkpoints, metrics.csv and curves, and its TensorBoard figures and heat maps."""
    settings, loop = run.settings, run.loop
    position = Position(metrics.epoch + 1, 0)
    state = training_state(run.training, settings, run.history, position, run.totals, run.device, loop.dtype)
    save_epoch(run.run_dir, run.history, state, settings.run.keep_training_state)
    global_step = metrics.epoch * loop.steps_per_epoch
    run.tensorboard.epoch(global_step, metrics, validation.targets, validation.probabilities)
    if run.tensorboard.writer:
        from cxr14.heat_maps import top_finding_overlays  # grad-cam and matplotlib: not in DataLoader workers

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
