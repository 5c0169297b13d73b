"""Pretrained weights from a local file: read as tensors alone (safetensors, or torch.load with weights_only), taken
out of the wrappers and prefixes training checkpoints keep them under, counted against the network they are for,
and refused, naming the file, when most of that network would stay random."""

import pickle
from pathlib import Path

import torch

from cxr14.errors import CheckpointError


def pretrained_source(pretrained):
    """What a PRETRAINED value names: "none" (random init), "published" ("imagenet": the network's own published
    weights), "hub" (hf-hub:ORG/NAME) or "file" (a local weights file, weights_from_file)."""
    text = str(pretrained).strip().lower()
    if text in ("none", "false", ""):
        return "none"
    if text in ("imagenet", "true"):
        return "published"
    return "hub" if text.startswith("hf-hub:") else "file"


WRAPPERS = ("state_dict", "model", "module", "model_ema", "net")  # where training checkpoints keep the weights
MOST_MISSING = 0.5  # a weights file that leaves more than this share of the backbone's tensors random is refused


def weights_from_file(path, title, expected, head, convert=None):
    """The backbone's tensors from a weights file (.pth, .pt, .bin, .ckpt, or .safetensors): a torchvision state dict
    (or timm's, whose ResNet-50 names its tensors alike), or a training checkpoint that wraps one (WRAPPERS) under a
    prefix of its own (module., encoder., img_encoder.model., ...: the one that matches most is taken off);
    `expected`: the state dict of the network they are for (`title`), as built, whose classifier (`head`, a module
    path) is not loaded; convert(state): the network's own renaming of its published files' keys, if it has one
    (timm's checkpoint_filter_fn: EVA-X's mlp.w12, position embeddings of another image size). Says how many were
    loaded and names what is missing and unexpected; refuses, naming the file and the first missing tensors, a file
    that would leave most of the backbone random (another network, or no weights)."""
    if not Path(path).is_file():
        raise CheckpointError(f"PRETRAINED={str(path)!r} is neither 'imagenet', 'none', hf-hub:ORG/NAME nor a file.")
    try:
        state = _read_weights(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CheckpointError(
            f"{path} cannot be read as weights alone ({str(error).splitlines()[0]}): it holds Python objects besides "
            "tensors, which this project never runs. Where you trust the file, save its state dict alone "
            "(torch.save(checkpoint['state_dict'], 'weights.pth')) and give that."
        ) from None
    while isinstance(state, dict) and not _holds_tensors(state):
        state = next((state[key] for key in WRAPPERS if isinstance(state.get(key), dict)), None)
    wanted = {key: value.shape for key, value in expected.items() if not key.startswith(f"{head}.")}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no weights (a dict of tensors, or one under {', '.join(WRAPPERS)})")
    state = _without_prefix(state, wanted)
    state = convert(state) if convert else state
    loaded = {key: value for key, value in state.items() if key in wanted and value.shape == wanted[key]}
    missing = [key for key in wanted if key not in loaded]
    unexpected = [key for key in state if key not in expected]
    if len(missing) > MOST_MISSING * len(wanted):
        raise CheckpointError(
            f"{path} is not a {title} weights file: {len(missing)} of its {len(wanted)} tensors would stay random "
            f"(missing: {', '.join(missing[:3])}; the file has {', '.join(list(state)[:3]) or 'nothing'}). Give the "
            f"{title} weights, or the BACKBONE the file is for."
        )
    said = f"; missing, left as built: {', '.join(missing[:5])}" if missing else ""
    said += f"; unexpected, not used: {', '.join(unexpected[:5])}" if unexpected else ""
    print(f"PRETRAINED {path}: {len(loaded)} of {title}'s {len(wanted)} tensors loaded{said}")
    return loaded


def _read_weights(path):
    """A weights file's contents: safetensors (tensors only, by its format) or a torch.save file read with
    weights_only (a file with other Python objects is refused, never run)."""
    if Path(path).suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable .safetensors file ({error}): download it again") from None
    return torch.load(path, map_location="cpu", weights_only=True)


def _holds_tensors(state):
    return any(isinstance(value, torch.Tensor) for value in state.values())


def _without_prefix(state, wanted):
    """The state dict's keys with the prefix taken off under which most of them are the backbone's own tensors (of
    their shapes); the keys outside it stay as they are (unexpected)."""
    prefixes = {""} | {".".join(key.split(".")[:depth]) + "." for key in state for depth in (1, 2, 3)}

    def matches(prefix):
        return sum(
            key.startswith(prefix) and wanted.get(key[len(prefix) :]) == value.shape for key, value in state.items()
        )

    best = max(sorted(prefixes), key=matches)  # "" sorts first: a prefix must match more to be taken off
    return {key.removeprefix(best): value for key, value in state.items()}
