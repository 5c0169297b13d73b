"""Checkpoint I/O, the only file that calls torch.save and torch.load on a checkpoint: written atomically (a
temporary file, then a rename), loaded with weights_only=True onto the CPU, and brought to today's format by one
function, upgrade, that every reader goes through.
"""

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from cxr14.errors import CheckpointError
from dataset import names_and_codes, read_split
from model import BACKBONES, known_backbone, ood_feature_width

FORMAT = 3  # the checkpoint format save_checkpoint writes; upgrade brings every older one to it
# Format 1 is every checkpoint written before checkpoints carried their format. Its shapes, each upgraded:
# - "architecture" where today's say "backbone" (before the setting BACKBONE, always ResNet-50);
# - a config without the settings added since, which every run before them had at these values (NIH alone):
ADDED_SINCE = {
    "BACKBONE": "resnet50",
    "DATASET": "nih",
    "UNCERTAIN": "ignore",
    "DATASET_WEIGHTS": "",
    "CUDA_GRAPHS": False,
}
# - out-of-distribution statistics fitted on the head's features alone (before the third block's halves joined
#   them): dropped, with a warning, as their distances would mean nothing;
# - no split record (the oldest): the split.csv beside the checkpoint holds its split.
# Format 2 is every checkpoint written before timm's networks: its config lacks the settings they brought, which every
# run of format 1 or 2 had at these values:
ADDED_WITH_TIMM = {"LAYER_DECAY": 1.0, "DROP_PATH": 0.0, "POOLING": "avg"}


def _write_atomically(path, write):
    """write(temporary_path) beside `path`, then rename over it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(checkpoint, path):
    """Write a checkpoint (in today's format, FORMAT) atomically."""
    checkpoint = {**checkpoint, "format": FORMAT}
    _write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))


def copy_checkpoint(source, destination):
    """best.pth from epoch_NN.pth, atomically, without serialising the state a second time: a hard link where the
    file system has them (no bytes written; checkpoints are only ever replaced, never changed in place), else a
    copy."""

    def link_or_copy(temporary):
        os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)

    _write_atomically(destination, link_or_copy)


def add_to_checkpoint(path, drop=(), **entries):
    """Rewrite a checkpoint (atomically) with entries added, e.g. the statistics inference needs, and those named in
    drop left out."""
    checkpoint = upgrade(torch.load(path, map_location="cpu", weights_only=True), path)
    save_checkpoint({**{key: value for key, value in checkpoint.items() if key not in drop}, **entries}, path)


def load_checkpoint(path, findings):
    """Load a checkpoint with weights_only=True (a .pth from elsewhere is code otherwise) and check that it is a
    cxr14 checkpoint of a backbone this code builds and of the same findings. Always onto the CPU: the split's codes
    and the RNG state must stay there (numpy, torch.set_rng_state), and the model, optimizer and scaler move their own
    tensors to the device as their state is loaded."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a checkpoint: give one file ({listed_checkpoints(path)})")
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as file:
        head = file.read(4096)
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"onnx" in head.lower()):
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: it is an ONNX model (export.py writes them), not a "
            "checkpoint: give it as --onnx"
        )
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive (legacy: a pickle stream)
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: it is not a PyTorch checkpoint (torch.save writes a zip "
            f"archive; this file starts with {head[:8]!r}). Checkpoints are the .pth files train.py writes "
            "(epoch_NN.pth, best.pth)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # of many kinds: each means "not a checkpoint of this project"
        if isinstance(error, pickle.UnpicklingError):
            what = "it holds Python objects besides tensors and numbers, and loading those would run their code"
        else:
            what = "it is not a file that torch.save wrote"
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: {what}. Checkpoints are the .pth files train.py writes "
            "(epoch_NN.pth, best.pth, interrupted.pth); load only those, or files of a source you trust."
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a cxr14 training checkpoint (it holds a {type(checkpoint).__name__}).")
    checkpoint = upgrade(checkpoint, path)
    missing = [key for key in ("model", "config", "findings", "backbone") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a cxr14 training checkpoint (missing {missing}).")
    if not known_backbone(checkpoint["backbone"]):
        raise CheckpointError(
            f"{path} holds a {checkpoint['backbone']!r} model; this code builds {', '.join(BACKBONES)}, EVA-X's and "
            "timm's."
        )
    if list(checkpoint["findings"]) != list(findings):
        raise CheckpointError(
            f"{path} was trained on findings {list(checkpoint['findings'])}, which differ from {list(findings)}."
        )
    return checkpoint


def listed_checkpoints(folder):
    """What a folder given where a checkpoint belongs holds: its .pth files (ten at most), or that it holds none."""
    found = sorted(child.name for child in Path(folder).glob("*.pth"))
    return f"its checkpoints: {', '.join(found[:10])}" if found else "it holds no .pth file"


def upgrade(checkpoint, path):
    """A checkpoint of any format this project has written, in today's (FORMAT): every reader goes through this
    (load_checkpoint, add_to_checkpoint), so no other code knows an older format. A newer format is refused."""
    version = checkpoint.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(
            f"{path} was written by a newer version of this project (checkpoint format {version}; this code reads "
            f"formats 1 to {FORMAT}). Update this repository (git pull) to read it."
        )
    if version == FORMAT:
        return checkpoint
    if version == 1:
        _upgrade_from_format_1(checkpoint, path)
    if isinstance(checkpoint.get("config"), dict):
        checkpoint["config"] = {**ADDED_WITH_TIMM, **checkpoint["config"]}
    checkpoint["format"] = FORMAT
    return checkpoint


def _upgrade_from_format_1(checkpoint, path):
    if "architecture" in checkpoint and "backbone" not in checkpoint:
        checkpoint["backbone"] = checkpoint.pop("architecture")
    checkpoint.setdefault("backbone", ADDED_SINCE["BACKBONE"])
    if isinstance(checkpoint.get("config"), dict):
        checkpoint["config"] = {**ADDED_SINCE, "BACKBONE": checkpoint["backbone"], **checkpoint["config"]}
    _drop_stale_ood(checkpoint, path)
    split_path = Path(path).parent / "split.csv"
    if checkpoint.get("split") is None and split_path.is_file():
        table = read_split(split_path)
        checkpoint["split"] = names_and_codes(table["image_name"], table["split"])


def _drop_stale_ood(checkpoint, path):
    """Format 1's OOD statistics of another width than today's features (ood_feature_width) left out, saying so."""
    ood = (checkpoint.get("inference") or {}).get("ood")
    if ood is None or checkpoint["backbone"] not in BACKBONES:
        return
    width = ood_feature_width(checkpoint["backbone"])
    if len(ood["mean"]) != width:
        print(
            f"warning: {path}'s out-of-distribution statistics were fitted on features of an older version of this "
            f"project ({len(ood['mean'])} wide, not {width}): no film is flagged. evaluate.py --checkpoint {path} "
            "fits them again and stores them in the checkpoint."
        )
        del checkpoint["inference"]["ood"]
