"""What a training run writes into its folder (OUT_DIR), and finds there to resume: checkpoints written atomically
(epoch_NN.pth, best.pth, best_auroc.pth, interrupted.pth), split.csv, config.json and pos_weight.json,
metrics.csv and training_curves.png every epoch, the summary table at the end, and TensorBoard events
(tensorboard --logdir checkpoints): losses, learning rate, images/s, validation AUROC per finding,
precision-recall curves, a few validation heat maps per epoch, and the settings as hparams. Only rank 0 writes; a
resumed run appends to its events without duplicated steps. Also the records of a run's state: what trains
(Training), where it is (Position, EpochTotals) and what each epoch measured (EpochMetrics).
"""

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.checkpoints import copy_checkpoint, listed_checkpoints, load_checkpoint, save_checkpoint
from cxr14.devices import dtype_name, rng_state, set_rng_state
from cxr14.errors import CheckpointError, DataError
from cxr14.settings import from_config
from dataset import FINDINGS, save_split
from model import unwrap

HEAT_MAP_IMAGES = 4  # validation films drawn with the heat map of their top finding, per epoch
LOG_EVERY = 10  # training steps between TensorBoard points
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "epoch_totals")  # what only a resume needs

BY_NAME = {"aurocs": "auroc_", "dataset_aurocs": "val_auroc_"}  # EpochMetrics' dicts: their columns' prefixes
NOT_SCALARS = ("epoch", "seconds")  # EpochMetrics' fields that TensorBoard does not plot

# the settings a resumed run must share with its start, or it is another experiment
RUN_DEFINING = (
    "DATASET",
    "UNCERTAIN",
    "DATASET_WEIGHTS",
    "BACKBONE",
    "IMAGE_SIZE",
    "LOAD_SIZE",
    "BATCH_SIZE",
    "TRAINABLE_LAYERS",
    "DROPOUT",
    "DROP_PATH",
    "POOLING",
    "LAYER_DECAY",
    "POS_WEIGHT",
    "POS_WEIGHT_CAP",
    "SEED",
)


@dataclass
class Training:
    """What trains: built once per run (train.build_training), saved in every checkpoint, restored on resume."""

    net: object  # the bare network (DDP and torch.compile wrap it elsewhere)
    optimizer: object
    scheduler: object
    scaler: object  # GradScaler: enabled under fp16 only
    criterion: object  # the pos_weight-ed BCEWithLogitsLoss
    split: dict = None  # dataset.split_record: every checkpoint carries the run's split


@dataclass
class Position:
    """Where training continues: an epoch, and the steps of it already done."""

    epoch: int = 1
    step: int = 0


@dataclass
class EpochTotals:
    """The training loss of the epoch so far, summed over the images of every rank."""

    loss_sum: float = 0.0
    images: int = 0

    def mean(self):
        return self.loss_sum / max(self.images, 1)


@dataclass
class EpochMetrics:
    """One epoch of a run. Each field is a column of metrics.csv and a checkpoint's history (row()), and the
    numeric ones a TensorBoard scalar (scalars()); the curves and the summary read the same fields."""

    epoch: int
    train_loss: float
    val_loss: float
    val_mean_auroc: float
    lr: float
    seconds: float
    aurocs: dict = field(default_factory=dict)  # finding: validation AUROC
    dataset_aurocs: dict = field(default_factory=dict)  # a union's dataset: the mean validation AUROC of its films

    def scalars(self):
        """{field: value} of the epoch's figures (what TensorBoard plots per epoch)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in (*NOT_SCALARS, *BY_NAME)}
        return {**values, **{f"val_auroc_{name}": value for name, value in self.dataset_aurocs.items()}}

    def row(self):
        """The flat row of metrics.csv and of a checkpoint's history (auroc_FINDING and val_auroc_DATASET columns)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in BY_NAME}
        for name, prefix in BY_NAME.items():
            values.update({f"{prefix}{key}": float(value) for key, value in getattr(self, name).items()})
        return values

    @classmethod
    def from_row(cls, row):
        """The record of a metrics.csv or history row; a field an older run did not write is NaN."""
        names = [f.name for f in fields(cls) if f.name not in BY_NAME]
        by_name = {
            name: {key[len(prefix) :]: value for key, value in row.items() if key.startswith(prefix)}
            for name, prefix in BY_NAME.items()
        }
        return cls(**{name: row.get(name, float("nan")) for name in names}, **by_name)


def best_epoch(history):
    """The EpochMetrics of the epoch of lowest validation loss (best.pth's) in a run's history rows."""
    return min((EpochMetrics.from_row(row) for row in history), key=lambda metrics: metrics.val_loss)


def saved_settings(settings, saved_config, path):
    """The Settings a checkpoint's run started with: its config (checkpoints.upgrade fills in the settings added
    since format 1), with today's values for any setting it still lacks."""
    return from_config({**settings.as_config(), **saved_config}, path)


def check_same_run(settings, saved, path):
    """Refuses to resume a checkpoint trained with other RUN_DEFINING settings than `settings` (both Settings)."""
    changed = {
        name: (saved.value(name), settings.value(name))
        for name in RUN_DEFINING
        if saved.value(name) != settings.value(name)
    }
    if changed:
        differences = ", ".join(f"{name.lower()} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise CheckpointError(
            f"{path} was trained with other settings ({differences}). Resume with the settings the run started "
            f"with (they are in {Path(path).parent / 'config.json'}), e.g. the same config file, plus --resume last."
        )


def finished(history, position, learning_rate, training):
    """Why a run at this Position has ended under these settings.TrainingSettings (early stop, all epochs, learning
    rate floor), or None. Judged from the settings, so raising EPOCHS or the patience continues a finished run."""
    if position.step == 0 and position.epoch > training.epochs:
        return f"all {training.epochs} epochs are done"
    if history and position.step == 0:
        best = best_epoch(history).epoch
        if 0 < training.early_stopping_patience <= history[-1]["epoch"] - best:
            return f"early stop: no lower validation loss for {history[-1]['epoch'] - best} epochs (best: {best})"
    if training.lr_schedule == "plateau" and learning_rate < training.min_learning_rate:
        return f"the learning rate was cut to {learning_rate:.1e}, below MIN_LEARNING_RATE; more epochs would not learn"
    return None


def training_state(training, settings, history, position, epoch_totals, device, dtype):
    """Everything a resumed run needs; plain types and tensors only, so weights_only loading accepts it."""
    net = unwrap(training.net)
    return {
        "model": net.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "scaler": training.scaler.state_dict(),
        "config": settings.as_config(),  # a plain mapping: older and newer code both read it
        "findings": list(FINDINGS),
        "backbone": net.backbone,  # BACKBONE (as "architecture" in older checkpoints)
        "timm": net.parts.timm,  # a timm network's name and arguments: built again from these alone; else None
        "split": training.split,  # the images of each part: the checkpoint evaluates and resumes on its own
        "epoch": history[-1]["epoch"] if history else 0,
        "metrics": history[-1] if history else {},
        "history": history,
        "position": asdict(position),  # where training continues
        "epoch_totals": asdict(epoch_totals),  # the running loss of a part-done epoch
        "rng": rng_state(device),  # the CPU's and the GPU's: dropout replays after a mid-epoch resume
        "amp_dtype": dtype_name(dtype),  # what trained it: bf16, fp16 or fp32
    }


def open_run(settings, run_dir, is_main, log):
    """(checkpoint path, checkpoint) to resume from, or (None, None) for a new run; (path, None) when the checkpoint's
    run has finished under these settings. Refuses to mix two runs in one folder. Writes nothing: a run that then
    fails to start leaves no folder behind."""
    resume_path = resolve_resume(settings.run.resume, run_dir)
    elsewhere = resume_path is not None and resume_path.parent.resolve() != run_dir.resolve()
    if (resume_path is None or elsewhere) and any(run_dir.glob("*.pth")):
        raise DataError(f"{run_dir} already holds a run. Continue it with --resume last, or set another --out_dir.")
    if is_main:
        remove_stale_temporaries(run_dir, log)
    if resume_path is None:
        return None, None
    checkpoint = load_checkpoint(resume_path, FINDINGS)  # onto the CPU; restore() moves what the device needs
    started_with = saved_settings(settings, checkpoint["config"], resume_path)
    check_same_run(settings, started_with, resume_path)
    learning_rate = checkpoint["history"][-1]["lr"] if checkpoint["history"] else settings.training.learning_rate
    state = (checkpoint["history"], Position(**checkpoint["position"]), learning_rate)
    ended_then, ended_now = finished(*state, started_with.training), finished(*state, settings.training)
    if ended_now:
        log(f"{resume_path}: this run has finished ({ended_now}). Raise --epochs or the patience to continue it.")
        return resume_path, None
    missing = [name for name in TRAINING_STATE if name not in checkpoint]
    if missing:
        newest = resolve_resume("last", resume_path.parent) if resume_path.parent.is_dir() else None
        raise CheckpointError(
            f"{resume_path} keeps the model alone, not the optimizer's state that an exact resume needs "
            f"(KEEP_TRAINING_STATE = 'newest' keeps it in the newest checkpoint only). Resume from "
            f"{newest or 'the newest epoch_NN.pth or interrupted.pth'}; set KEEP_TRAINING_STATE = all in a run to "
            "keep it in every epoch's checkpoint."
        )
    if ended_then:
        log(f"continuing a run that had finished ({ended_then}), as the raised settings allow")
    return resume_path, checkpoint


def restore(training, checkpoint, device):
    """Load a checkpoint's training state into a Training (its tensors already on `device`: each load_state_dict
    copies the CPU checkpoint's tensors to its own); (history, Position, EpochTotals)."""
    unwrap(training.net).load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    training.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:  # {} when saved disabled (bf16, fp32): an fp16 run resuming it starts a fresh scale
        training.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"], device)
    return checkpoint["history"], Position(**checkpoint["position"]), EpochTotals(**checkpoint["epoch_totals"])


def resolve_resume(resume, run_dir):
    """The checkpoint RESUME names: None for a new run ("", or "auto" in a folder without checkpoints), the run's
    latest state ("last", and "auto" in a folder with checkpoints: a requeued cluster job continues, its first start
    begins), or a path. The latest state is interrupted.pth when there is one (a completed epoch removes it), else the
    epoch_NN.pth of the highest NN."""
    epochs = sorted(run_dir.glob("epoch_*.pth"))
    latest = run_dir / "interrupted.pth" if (run_dir / "interrupted.pth").is_file() else (epochs or [None])[-1]
    if resume == "auto":
        resume = "last" if latest else ""
    if not resume:
        return None
    if resume != "last":
        path = Path(resume)
        if path.is_dir():
            raise CheckpointError(
                f"--resume {path} is a folder, not a checkpoint: give one file ({listed_checkpoints(path)}), or "
                "--resume last with --out_dir set to the run's folder"
            )
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint")
        return path
    if latest is None:
        raise CheckpointError(f"--resume last: no epoch_*.pth or interrupted.pth in {run_dir}")
    return latest


def remove_stale_temporaries(run_dir, log):
    """Temporary files of checkpoint writes that a kill -9 interrupted (checkpoint-sized): never read, so removed."""
    for stale in run_dir.glob("*.pth*.tmp"):
        stale.unlink(missing_ok=True)
        log(f"removed {stale}, left by an interrupted checkpoint write")


def write_run_folder(run_dir, labels, split, settings, pos_weight):
    """split.csv, config.json and pos_weight.json: written by a new run, and by a resumed run in a new folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_split(labels, split, run_dir / "split.csv")
    (run_dir / "config.json").write_text(json.dumps(settings.as_config(), indent=2) + "\n", encoding="utf-8")
    (run_dir / "pos_weight.json").write_text(
        json.dumps(dict(zip(FINDINGS, pos_weight.tolist())), indent=2), encoding="utf-8"
    )


def best_epochs(history):
    """(the epoch best.pth holds: lowest validation loss, the epoch best_auroc.pth holds: highest mean validation
    AUROC, None while no AUROC is defined)."""
    aurocs = [row["val_mean_auroc"] for row in history]
    best_auroc = history[int(np.nanargmax(aurocs))]["epoch"] if np.isfinite(aurocs).any() else None
    return best_epoch(history).epoch, best_auroc


def save_epoch(run_dir, history, state, keep_training_state="newest"):
    """epoch_NN.pth with the full state, best.pth and best_auroc.pth; the previous epoch's checkpoint then keeps the
    model alone unless keep_training_state is "all" (the optimizer's moments are most of a checkpoint's size)."""
    epoch = history[-1]["epoch"]
    path = run_dir / f"epoch_{epoch:02d}.pth"
    save_checkpoint(state, path)
    best_loss, best_auroc = best_epochs(history)
    if best_loss == epoch:
        copy_checkpoint(path, run_dir / "best.pth")
    if best_auroc == epoch:
        copy_checkpoint(path, run_dir / "best_auroc.pth")
    previous = run_dir / f"epoch_{epoch - 1:02d}.pth"
    if keep_training_state == "newest" and previous.is_file():
        slim = load_checkpoint(previous, FINDINGS)
        if any(name in slim for name in TRAINING_STATE):
            save_checkpoint({key: value for key, value in slim.items() if key not in TRAINING_STATE}, previous)
            for best, name in ((best_loss, "best.pth"), (best_auroc, "best_auroc.pth")):
                if best == epoch - 1:  # a link to (or copy of) the full previous file: now the slim one
                    copy_checkpoint(previous, run_dir / name)
    (run_dir / "interrupted.pth").unlink(missing_ok=True)  # superseded by a later, complete epoch
    write_metrics(run_dir, history)


def write_metrics(run_dir, history):
    """metrics.csv and training_curves.png (loss, validation AUROC and learning rate by epoch; best epoch marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame([EpochMetrics.from_row(row).row() for row in history])
    table.to_csv(run_dir / "metrics.csv", index=False)
    best = best_epoch(history).epoch
    figure, (loss_axes, auroc_axes, rate_axes) = plt.subplots(1, 3, figsize=(14, 4))
    loss_axes.plot(table.epoch, table.train_loss, "o-", label="train")
    loss_axes.plot(table.epoch, table.val_loss, "o-", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="weighted BCE loss", title="Loss")
    auroc_axes.plot(table.epoch, table.val_mean_auroc, "o-", color="C2")
    auroc_axes.set(xlabel="epoch", ylabel="mean AUROC (14 findings)", title="Validation AUROC")
    rate_axes.plot(table.epoch, table.lr, "o-", color="C4")
    rate_axes.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="Learning rate", ylim=(0, None))
    for axes in (loss_axes, auroc_axes):
        axes.axvline(best, color="gray", linestyle=":", label=f"best epoch ({best}, lowest validation loss)")
    loss_axes.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "training_curves.png", dpi=100)
    plt.close(figure)


SUMMARY_COLUMNS = (  # (EpochMetrics field, header, format) of the table printed at the end of training
    ("epoch", "epoch", "{:>5}"),
    ("train_loss", "train loss", "{:>11.4f}"),
    ("val_loss", "val loss", "{:>9.4f}"),
    ("val_mean_auroc", "val AUROC", "{:>10.4f}"),
    ("lr", "lr", "{:>9.1e}"),
    ("seconds", "time", "{:>6.0f}s"),
)


def summary(history, run_dir):
    """The table printed at the end of training, with the best epoch marked."""
    epochs = [EpochMetrics.from_row(row) for row in history]
    best = best_epoch(history)
    datasets = list(dict.fromkeys(name for metrics in epochs for name in metrics.dataset_aurocs))  # a union's
    columns = list(SUMMARY_COLUMNS) + [(name, f"{name} AUROC", f"{{:>{len(name) + 6}.4f}}") for name in datasets]
    widths = [len(fmt.format(0)) for _, _, fmt in columns]
    lines = [" ".join(f"{header:>{width}}" for (_, header, _), width in zip(columns, widths))]
    for metrics in epochs:
        values = {**vars(metrics), **metrics.dataset_aurocs}  # a dataset's name never is a field's
        cells = " ".join(fmt.format(values.get(name, float("nan"))) for name, _, fmt in columns)
        lines.append(cells + ("  <- best" if metrics.epoch == best.epoch else ""))
    lines.append(
        f"best epoch {best.epoch}: val loss {best.val_loss:.4f}, mean AUROC {best.val_mean_auroc:.4f} "
        f"-> {run_dir / 'best.pth'}"
    )
    return "\n".join(lines)


class TensorBoard:
    """TensorBoard events in the run folder, or nothing when off, not rank 0, or the package is missing."""

    def __init__(self, run_dir, enabled, purge_step, log):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("TensorBoard: the tensorboard package is not installed (pip install tensorboard); no events written")
            return
        with warnings.catch_warnings():  # tensorboard's own imports warn about deprecated APIs
            warnings.simplefilter("ignore")
            # purge_step: a resumed run drops the events a crash left after its checkpoint, so no step is doubled
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        log(f"TensorBoard: tensorboard --logdir {run_dir.parent}")

    def step(self, global_step, loss, learning_rate, images_per_second):
        if self.writer and global_step % LOG_EVERY == 0:
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("train/learning_rate", learning_rate, global_step)
            self.writer.add_scalar("train/images_per_second", images_per_second, global_step)

    def epoch(self, global_step, metrics, targets, probabilities):
        """An epoch's EpochMetrics, each finding's validation AUROC and precision-recall curve."""
        if not self.writer:
            return
        for name, value in metrics.scalars().items():
            self.writer.add_scalar(f"epoch/{name}", value, global_step)
        for k, (finding, auroc) in enumerate(metrics.aurocs.items()):
            if np.isfinite(auroc):
                self.writer.add_scalar(f"val_auroc/{finding}", auroc, global_step)
            if 0 < targets[:, k].sum() < len(targets):
                self.writer.add_pr_curve(f"val_pr/{finding}", targets[:, k], probabilities[:, k], global_step)
        self.writer.flush()

    def heat_maps(self, global_step, images):
        """RGB uint8 [H, W, 3] images of validation heat maps."""
        if self.writer:
            for k, image in enumerate(images):
                self.writer.add_image(f"val_heat_map/{k}", image, global_step, dataformats="HWC")

    def close(self, settings, history, dtype):
        """The run's settings as hparams (AMP as the dtype that trained: fp32 where autocast was off) beside its best
        validation loss and AUROC."""
        if not self.writer:
            return
        if history:
            best = best_epoch(history)
            settings = settings.as_config()
            hparams = {name: value for name, value in settings.items() if isinstance(value, (int, float, str, bool))}
            hparams["AMP"] = dtype_name(dtype)
            metrics = {"hparam/best_val_loss": best.val_loss, "hparam/best_val_mean_auroc": best.val_mean_auroc}
            self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.close()
