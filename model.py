"""The networks (BACKBONE: torchvision's ResNet-50, DenseNet-121 or ConvNeXt-Tiny, ImageNet weights, early blocks
frozen, a Dropout + Linear head) and checkpoint I/O: the only file that calls torch.save / torch.load (checkpoints
always load onto the CPU). Only this file knows a backbone's insides: its blocks for TRAINABLE_LAYERS, its BatchNorm
(frozen, and folded into the convolution before it), its head, the layer Grad-CAM reads (cam_layer, and cam_weights
where Grad-CAM has a closed form) and the features ood.py measures (ood_features_and_logits)."""

import pickle
import urllib.error
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torchvision import models
from torchvision.ops import FrozenBatchNorm2d

from cxr14.errors import CheckpointError

BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4")  # every backbone's blocks, in forward order


class Backbone(NamedTuple):
    """What this project needs to know of a torchvision network; module paths as nn.Module.get_submodule takes them."""

    title: str  # its name in messages
    build: object  # torchvision's constructor
    weights: object  # its best ImageNet weights
    blocks: dict  # BLOCKS name -> the modules that make it
    head: str  # the classifier Linear, replaced by Dropout + Linear(features, findings)
    cam_layer: str  # the last block's output, whose activations and gradients Grad-CAM reads
    features: int  # the width of the pooled features the head reads: the last block's channels
    layout_channels: int  # the third block's (layer3's) channels, whose halves ood.py measures too
    folds: tuple = ()  # (convolution, BatchNorm) child names of one module where the BatchNorm reads the conv alone
    pooled_head: bool = False  # the head reads cam_layer through a global average pool alone: Grad-CAM's closed form


BACKBONES = {
    "resnet50": Backbone(
        "ResNet-50",
        models.resnet50,
        models.ResNet50_Weights.IMAGENET1K_V2,
        {
            "stem": ("conv1", "bn1"),
            "layer1": ("layer1",),
            "layer2": ("layer2",),
            "layer3": ("layer3",),
            "layer4": ("layer4",),
        },
        head="fc",
        cam_layer="layer4",
        features=2048,
        layout_channels=1024,
        folds=(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("0", "1")),  # the stem, blocks, downsample
        pooled_head=True,
    ),
    "densenet121": Backbone(  # CheXNet's network; a transition (norm, conv, pool) starts the next block
        "DenseNet-121",
        models.densenet121,
        models.DenseNet121_Weights.IMAGENET1K_V1,
        {
            "stem": ("features.conv0", "features.norm0"),
            "layer1": ("features.denseblock1",),
            "layer2": ("features.transition1", "features.denseblock2"),
            "layer3": ("features.transition2", "features.denseblock3"),
            "layer4": ("features.transition3", "features.denseblock4", "features.norm5"),
        },
        head="classifier",
        cam_layer="features",
        features=1024,
        layout_channels=1024,
        folds=(("conv0", "norm0"), ("conv1", "norm2")),  # the stem; a dense layer's bottleneck (norm1 precedes it)
    ),
    "convnext_tiny": Backbone(  # LayerNorm, no BatchNorm; a downsampling layer starts each later stage
        "ConvNeXt-Tiny",
        models.convnext_tiny,
        models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
        {
            "stem": ("features.0",),
            "layer1": ("features.1",),
            "layer2": ("features.2", "features.3"),
            "layer3": ("features.4", "features.5"),
            "layer4": ("features.6", "features.7"),
        },
        head="classifier.2",
        cam_layer="features.7",
        features=768,
        layout_channels=384,
    ),
}


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same state dict), applied in the input's dtype as one multiply-add with a
    scale and shift folded from its statistics when they are loaded. torchvision's computes from fp32 buffers, so
    under bf16 autocast each frozen block's activations left it in fp32 and were converted back before every
    convolution (bench.py counts the operations of a forward pass)."""

    DERIVED = ("scale", "shift")  # buffers made from the statistics: cast_frozen and derived_buffers read this

    def __init__(self, num_features, eps=1e-5):
        super().__init__(num_features, eps)
        self.register_buffer("scale", torch.ones(1, num_features, 1, 1), persistent=False)
        self.register_buffer("shift", torch.zeros(1, num_features, 1, 1), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refold()

    def refold(self):
        """The scale and shift from the statistics, as new tensors: a model built on the meta device gets real ones
        when its weights are assigned. They keep the dtype cast_frozen gave them."""
        scale, shift = self.scale_and_shift()
        self.scale = scale.view(1, -1, 1, 1).to(self.scale.dtype)
        self.shift = shift.view(1, -1, 1, 1).to(self.shift.dtype)

    def scale_and_shift(self):
        """(scale, shift) per channel in fp32, from the statistics alone: the same whatever dtype the buffers were
        cast to, so that a resumed run folds exactly as the fresh one did."""
        with torch.no_grad():  # the statistics never change afterwards: fold them once
            scale = self.weight.float() * (self.running_var.float() + self.eps).rsqrt()
            return scale, self.bias.float() - self.running_mean.float() * scale

    def forward(self, x):
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))


class FoldedAway(FrozenBatchNorm):
    """A frozen BatchNorm whose FoldedConv applies it: the identity, with the same state dict (checkpoints keep
    their format, and the statistics stay where torchvision keeps them)."""

    def forward(self, x):
        return x


class FoldedConv(nn.Conv2d):
    """A frozen convolution with the frozen BatchNorm that reads it folded in: weight * scale per output channel,
    shift as its bias, held in the dtype the blocks run in (cast_frozen). One convolution instead of a convolution,
    a multiply-add and, under autocast, a cast of the weight on every step (autocast caches casts only of tensors that
    require grad). Same state dict as the Conv2d: the folded weights are not saved."""

    DERIVED = ("folded_weight", "folded_bias")  # made from the weights: cast_frozen and derived_buffers read this

    def __init__(self, conv, batchnorm):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.batchnorm = (batchnorm,)  # a tuple: not a child module, so its state stays the FoldedAway's alone
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)
        self.refold()

    def refold(self):
        batchnorm = self.batchnorm[0]
        dtype = self.weight.dtype if self.folded_weight is None else self.folded_weight.dtype
        scale, shift = batchnorm.scale_and_shift()
        with torch.no_grad():
            bias = shift if self.bias is None else shift + self.bias.float() * scale
            folded = self.weight.float() * scale.view(-1, 1, 1, 1)
            self.folded_weight = torch.empty_like(self.weight, dtype=dtype).copy_(folded)  # the weight's layout
            self.folded_bias = bias.to(dtype)

    def forward(self, x):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight, bias = self.folded_weight, self.folded_bias
        if weight.dtype != dtype:  # a pass in another precision than the blocks were cast to: correct, one cast more
            weight, bias = weight.to(dtype), bias.to(dtype)
        return self._conv_forward(x, weight, bias)


def fold_frozen_batchnorm(net):
    """Fold each frozen BatchNorm into the frozen convolution it reads, where the backbone has such pairs
    (Backbone.folds); refolded whenever the model's weights are loaded. The trainable blocks keep theirs."""
    pairs = BACKBONES[net.backbone].folds
    for module in list(net.modules()):
        for conv_name, batchnorm_name in pairs:
            conv, batchnorm = getattr(module, conv_name, None), getattr(module, batchnorm_name, None)
            frozen = type(batchnorm) is FrozenBatchNorm and type(conv) is nn.Conv2d and not conv.weight.requires_grad
            if not frozen:
                continue
            folded_away = FoldedAway(batchnorm.weight.numel(), batchnorm.eps)
            for name in ("weight", "bias", "running_mean", "running_var", "scale", "shift"):
                setattr(folded_away, name, getattr(batchnorm, name))
            setattr(module, batchnorm_name, folded_away)
            setattr(module, conv_name, FoldedConv(conv, folded_away))
    net.register_load_state_dict_post_hook(lambda module, incompatible: _refold(module))


def _refold(net):
    for module in net.modules():
        if isinstance(module, FoldedConv):
            module.refold()


def derived_buffers(net):
    """The names of the buffers made from the frozen blocks' weights (folded weights, BatchNorm scales): equal on
    every process, so DistributedDataParallel need not broadcast them (8.5M values a step for ResNet-50)."""
    return [
        f"{name}.{buffer}" if name else buffer
        for name, module in unwrap(net).named_modules()
        for buffer in getattr(module, "DERIVED", ())
    ]


def cast_frozen(net, dtype):
    """The frozen blocks' folded weights and BatchNorm scales in `dtype`, once: the autocast dtype of the run (bf16
    or fp16), or float32. Their fp32 originals, which checkpoints hold, are left as they are."""
    for module in unwrap(net).modules():
        for buffer in getattr(module, "DERIVED", ()):
            setattr(module, buffer, getattr(module, buffer).to(dtype))


def build_model(
    num_findings, pretrained="imagenet", trainable_layers="layer4", dropout=0.5, backbone="resnet50", fold=True
):
    """A backbone of BACKBONES with its classifier replaced by Dropout(dropout) -> Linear(features, num_findings).

    pretrained: "imagenet" (torchvision download and cache), "none" (random init) or a path to a local weights file of
    the same network (weights_from_file: a state dict, or a training checkpoint that wraps one). trainable_layers:
    comma-separated BLOCKS that train, "all" or "head"; the head always trains. Frozen blocks' BatchNorm becomes
    FrozenBatchNorm, so its statistics cannot drift in train mode, and with fold (bench.py times both) is folded into
    the frozen convolution before it.
    """
    spec = backbone_spec(backbone)
    # zero_init_residual: each residual block starts as the identity (Goyal et al. 2017), which trains a random init
    # markedly faster (measured on the demo when it ran at 56 px, 6 epochs: test mean AUROC 0.92 against 0.88);
    # pretrained weights overwrite it
    net = spec.build(weights=None, **({"zero_init_residual": True} if backbone == "resnet50" else {}))
    if str(pretrained).lower() not in ("none", "false", ""):
        state = _pretrained_state_dict(pretrained, backbone, net.state_dict())
        net.load_state_dict(state, strict=False)  # the head: replaced below
    net.backbone = backbone  # a plain attribute: cam_layer and ood_features_of read it
    new_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(spec.features, num_findings))
    parent, _, name = spec.head.rpartition(".")
    setattr(net.get_submodule(parent), name, new_head)
    for block in frozen_blocks(trainable_layers):
        for path in spec.blocks[block]:
            net.get_submodule(path).requires_grad_(False)
    _freeze_batchnorm(net)
    if fold:
        fold_frozen_batchnorm(net)
    return net


def backbone_spec(backbone):
    if backbone not in BACKBONES:
        raise CheckpointError(f"backbone {backbone!r}: this code builds {', '.join(BACKBONES)}")
    return BACKBONES[backbone]


def head(net):
    """The Dropout + Linear head of a model built by build_model."""
    return unwrap(net).get_submodule(BACKBONES[unwrap(net).backbone].head)


def cam_layer(net):
    """The module whose output Grad-CAM reads: the last block's (layer4's) feature map."""
    return unwrap(net).get_submodule(BACKBONES[unwrap(net).backbone].cam_layer)


def cam_weights(net):
    """The head's Linear weights [findings, channels] where the head reads cam_layer through a global average pool
    alone (Backbone.pooled_head: ResNet-50): there d logit_k / d activation_c at every cell is weight_kc / cells, so
    Grad-CAM is ReLU(sum_c weight_kc * activation_c) up to scale, read from a forward pass. None elsewhere."""
    if not BACKBONES[unwrap(net).backbone].pooled_head:
        return None
    return head(net)[-1].weight


def ood_features_and_logits(net, images):
    """(the features ood.py measures [N, ood_features_of(net)], the logits [N, findings]) from one forward pass: the
    pooled last-block features the head reads, and the third block's feature map averaged over its upper and over
    its lower half (both halves hold the middle row of an odd number). The head's features alone keep no layout: a
    film upside down averaged to nearly a chest film's (one demo run in three let a fifth of them through), and the
    last block's cells see nearly the whole film at the demo's 64 px, the third block's less of it."""
    captured = {}
    layers = {"layout": _layout_layer(net), "head": head(net)}
    handles = [
        layers["layout"].register_forward_hook(lambda module, inputs, output: captured.update(layout=output)),
        layers["head"].register_forward_pre_hook(lambda module, inputs: captured.update(head=inputs[0])),
    ]
    try:
        logits = net(images)
    finally:
        for handle in handles:
            handle.remove()
    maps = captured["layout"]
    rows = maps.shape[2]
    upper, lower = maps[:, :, : (rows + 1) // 2], maps[:, :, rows // 2 :]
    return torch.cat([captured["head"], upper.mean(dim=(2, 3)), lower.mean(dim=(2, 3))], dim=1), logits


def ood_features_of(net):
    """The width of ood_features_and_logits's features."""
    return ood_feature_width(unwrap(net).backbone)


def ood_feature_width(backbone):
    """The width of the features ood.py measures for a BACKBONE: the head's, and the third block's two halves."""
    spec = BACKBONES[backbone]
    return spec.features + 2 * spec.layout_channels


def _layout_layer(net):
    return unwrap(net).get_submodule(BACKBONES[unwrap(net).backbone].blocks["layer3"][-1])


def init_head_bias(net, positives, negatives, pos_weight):
    """Start each finding's logit at the constant that minimises the pos_weight-ed BCE on the training split,
    log(pos_weight * positives / negatives), instead of 0 (the "init the last bias" advice of Karpathy's recipe
    and of RetinaNet). From 0, the first steps push the rare findings' logits down through the weights of
    features found in every image, and the head learns each finding as a lack of normal anatomy: its Grad-CAM
    is negative everywhere, an all-zero heat map. A finding with no positive (or no negative) counts one."""
    positives = np.maximum(np.asarray(positives, dtype=np.float64), 1)
    negatives = np.maximum(np.asarray(negatives, dtype=np.float64), 1)
    prior = np.log(np.asarray(pos_weight, dtype=np.float64) * positives / negatives)
    bias = head(net)[-1].bias
    with torch.no_grad():
        bias.copy_(torch.as_tensor(prior, dtype=bias.dtype))


def frozen_blocks(trainable_layers):
    """The blocks of BLOCKS that do not train, from the TRAINABLE_LAYERS setting."""
    names = [name.strip() for name in str(trainable_layers).split(",") if name.strip()]
    if names == ["all"]:
        return []
    unknown = [name for name in names if name not in BLOCKS + ("head",)]
    if unknown or not names:
        raise ValueError(f"trainable_layers {unknown or names}: use 'all', 'head' or names from {', '.join(BLOCKS)}")
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


def _pretrained_state_dict(pretrained, backbone, expected):
    weights, title = BACKBONES[backbone].weights, BACKBONES[backbone].title
    if str(pretrained).lower() in ("imagenet", "true"):
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise CheckpointError(
                f"could not download the ImageNet {title} weights ({weights.url}): {error}\n"
                f"  - download that file elsewhere and place it at {cached}, or\n"
                f"  - set PRETRAINED to a local {title} weights file (--pretrained path/to/file.pth), or\n"
                "  - set PRETRAINED to none to start from random weights (much worse on real X-rays)."
            ) from error
    path = Path(pretrained)
    if not path.is_file():
        raise CheckpointError(f"PRETRAINED={pretrained!r} is neither 'imagenet', 'none' nor an existing file.")
    return weights_from_file(path, backbone, expected)


WRAPPERS = ("state_dict", "model", "module", "model_ema", "net")  # where training checkpoints keep the weights
MOST_MISSING = 0.5  # a weights file that leaves more than this share of the backbone's tensors random is refused


def weights_from_file(path, backbone, expected):
    """The backbone's tensors from a weights file (.pth, .pt, .bin, .ckpt, or .safetensors): a torchvision state dict
    (or timm's, whose ResNet-50 names its tensors alike), or a training checkpoint that wraps one (WRAPPERS) under a
    prefix of its own (module., encoder., img_encoder.model., ...: the one that matches most is taken off);
    `expected`: the state dict of the network they are for, as built. Says how many were loaded and names what is
    missing and unexpected; refuses, naming the file and the first missing tensors, a file that would leave most of
    the backbone random (another network, or no weights)."""
    spec = BACKBONES[backbone]
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
    head = f"{spec.head}."
    wanted = {key: value.shape for key, value in expected.items() if not key.startswith(head)}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no weights (a dict of tensors, or one under {', '.join(WRAPPERS)})")
    state = _without_prefix(state, wanted)
    loaded = {key: value for key, value in state.items() if key in wanted and value.shape == wanted[key]}
    missing = [key for key in wanted if key not in loaded]
    unexpected = [key for key in state if key not in expected]
    if len(missing) > MOST_MISSING * len(wanted):
        raise CheckpointError(
            f"{path} is not a {spec.title} weights file: {len(missing)} of its {len(wanted)} tensors would stay random "
            f"(missing: {', '.join(missing[:3])}; the file has {', '.join(list(state)[:3]) or 'nothing'}). Give the "
            f"{spec.title} weights, or the BACKBONE the file is for."
        )
    said = f"; missing, left as built: {', '.join(missing[:5])}" if missing else ""
    said += f"; unexpected, not used: {', '.join(unexpected[:5])}" if unexpected else ""
    print(f"PRETRAINED {path}: {len(loaded)} of {spec.title}'s {len(wanted)} tensors loaded{said}")
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


def unwrap(net):
    """The bare model under DistributedDataParallel and torch.compile wrappers."""
    net = getattr(net, "module", net)
    return getattr(net, "_orig_mod", net)


# ----------------------------------------------------------------------------- checkpoints
