"""The ResNet-50 (ImageNet weights, early blocks frozen, Dropout + Linear head), inference, and checkpoint I/O: the
only file that calls torch.save / torch.load (checkpoints always load onto the CPU)."""

import os
import shutil
import tempfile
import urllib.error
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.ops import FrozenBatchNorm2d

from errors import CheckpointError

ARCHITECTURE = "resnet50"
BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4")  # in forward order; "stem" is conv1 + bn1
IMAGENET_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2  # torchvision's best ResNet-50 ImageNet weights


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same state dict), applied in the input's dtype as one multiply-add with a
    scale and shift folded from its statistics when they are loaded. torchvision's computes from fp32 buffers, so
    under bf16 autocast each frozen block's activations left it in fp32 and were converted back before every
    convolution (bench.py counts the operations of a forward pass)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__(num_features, eps)
        self.register_buffer("scale", torch.ones(1, num_features, 1, 1), persistent=False)
        self.register_buffer("shift", torch.zeros(1, num_features, 1, 1), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        with torch.no_grad():  # the statistics never change afterwards: fold them once
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            self.scale.copy_(scale.view(1, -1, 1, 1))
            self.shift.copy_((self.bias - self.running_mean * scale).view(1, -1, 1, 1))

    def forward(self, x):
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))


def build_model(num_findings, pretrained="imagenet", trainable_layers="layer4", dropout=0.5):
    """ResNet-50 with fc replaced by Dropout(dropout) -> Linear(2048, num_findings).

    pretrained: "imagenet" (torchvision download and cache), "none" (random init) or a path to a local
    ResNet-50 state dict. trainable_layers: comma-separated blocks of BLOCKS that train, or "all"; the head
    always trains. Frozen blocks get FrozenBatchNorm2d, so their statistics cannot drift in train mode.
    """
    # zero_init_residual: each residual block starts as the identity (Goyal et al. 2017), which trains a random init
    # markedly faster (the demo at 56 px, 6 epochs: test mean AUROC 0.92 against 0.88); pretrained weights overwrite it
    model = resnet50(weights=None, zero_init_residual=True)
    if str(pretrained).lower() not in ("none", "false", ""):
        model.load_state_dict(_pretrained_state_dict(pretrained))
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_findings))
    for block in frozen_blocks(trainable_layers):
        for module in [model.conv1, model.bn1] if block == "stem" else [getattr(model, block)]:
            module.requires_grad_(False)
    _freeze_batchnorm(model)
    return model


def init_head_bias(model, positives, negatives, pos_weight):
    """Start each finding's logit at the constant that minimises the pos_weight-ed BCE on the training split,
    log(pos_weight * positives / negatives), instead of 0 (the "init the last bias" advice of Karpathy's recipe
    and of RetinaNet). From 0, the first steps push the rare findings' logits down through the weights of
    features found in every image, and the head learns each finding as a lack of normal anatomy: its Grad-CAM
    is negative everywhere, an all-zero heat map. A finding with no positive (or no negative) counts one."""
    positives = np.maximum(np.asarray(positives, dtype=np.float64), 1)
    negatives = np.maximum(np.asarray(negatives, dtype=np.float64), 1)
    prior = np.log(np.asarray(pos_weight, dtype=np.float64) * positives / negatives)
    with torch.no_grad():
        model.fc[-1].bias.copy_(torch.as_tensor(prior, dtype=model.fc[-1].bias.dtype))


def frozen_blocks(trainable_layers):
    """The blocks of BLOCKS that do not train, from the TRAINABLE_LAYERS setting."""
    names = [name.strip() for name in str(trainable_layers).split(",") if name.strip()]
    if names == ["all"]:
        return []
    unknown = [name for name in names if name not in BLOCKS + ("head",)]
    if unknown:
        raise ValueError(f"trainable_layers {unknown}: use 'all' or names from {BLOCKS + ('head',)}")
    return [block for block in BLOCKS if block not in names]


def _freeze_batchnorm(module):
    """Swap each BatchNorm2d with frozen parameters for a FrozenBatchNorm holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not child.weight.requires_grad:
            frozen = FrozenBatchNorm(child.num_features, eps=child.eps)
            frozen.load_state_dict(child.state_dict(), strict=False)  # num_batches_tracked has no place there
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def _pretrained_state_dict(pretrained):
    if str(pretrained).lower() in ("imagenet", "true"):
        try:
            return IMAGENET_WEIGHTS.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name
            raise CheckpointError(
                f"could not download the ImageNet ResNet-50 weights ({IMAGENET_WEIGHTS.url}): {error}\n"
                f"  - download that file elsewhere and place it at {cached}, or\n"
                "  - set PRETRAINED to the path of a local ResNet-50 weights file (--pretrained path/to/file.pth), or\n"
                "  - set PRETRAINED to none to start from random weights (much worse on real X-rays)."
            ) from error
    path = Path(pretrained)
    if not path.is_file():
        raise CheckpointError(f"PRETRAINED={pretrained!r} is neither 'imagenet', 'none' nor an existing file.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    expected = resnet50(weights=None).state_dict().keys()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise CheckpointError(f"{path} is not a torchvision ResNet-50 state dict (keys do not match).")
    return state


# ----------------------------------------------------------------------------- inference


def unwrap(model):
    """The bare model under DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@torch.inference_mode()
def predict_logits(model, loader, prepare, dtype=None, progress=None):
    """Run the model over a loader of (uint8 images, targets); returns float32 logits and targets (CPU).

    prepare: turns a uint8 batch into the model's input on its device (transforms.eval_batch).
    """
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in progress(loader) if progress else loader:
        images = prepare(images)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        all_logits.append(logits.float())
        all_targets.append(targets)
    return torch.cat(all_logits).cpu(), torch.cat(all_targets).cpu()


# ----------------------------------------------------------------------------- checkpoints


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


def load_checkpoint(path, findings):
    """Load a checkpoint with weights_only=True (a .pth from elsewhere is code otherwise) and check that it is
    a cxr14 checkpoint of the same architecture and findings. Always onto the CPU: the split's codes and the RNG
    state must stay there (numpy, torch.set_rng_state), and the model, optimizer and scaler move their own tensors
    to the device as their state is loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors of many kinds: all mean "not a checkpoint we can trust"
        raise CheckpointError(f"cannot load {path} as a weights-only checkpoint: {error}") from error
    missing = [key for key in ("model", "config", "findings", "architecture") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a cxr14 training checkpoint (missing {missing}).")
    if checkpoint["architecture"] != ARCHITECTURE:
        raise CheckpointError(f"{path} holds a {checkpoint['architecture']!r} model; this code builds {ARCHITECTURE}.")
    if list(checkpoint["findings"]) != list(findings):
        raise CheckpointError(
            f"{path} was trained on findings {list(checkpoint['findings'])}, which differ from {list(findings)}."
        )
    return checkpoint


def model_from_checkpoint(checkpoint):
    """The trained model, rebuilt from the checkpoint's own config (no constants here to drift)."""
    config = checkpoint["config"]
    model = build_model(
        len(checkpoint["findings"]),
        pretrained="none",
        trainable_layers=config["TRAINABLE_LAYERS"],
        dropout=config["DROPOUT"],
    )
    model.load_state_dict(checkpoint["model"])
    return model
