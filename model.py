"""The networks (BACKBONE: torchvision's ResNet-50, DenseNet-121 or ConvNeXt-Tiny; any timm network; EVA-X's
chest-X-ray ViTs), pretrained, early blocks frozen, with a Dropout + Linear head. Only this file knows a backbone's
insides: its blocks for TRAINABLE_LAYERS and LAYER_DECAY, its BatchNorm (frozen, and folded into the convolution
before it), its head, the layer Grad-CAM reads (cam_layer, and cam_weights where Grad-CAM has a closed form), its
feature maps (a ViT's tokens as a grid) and the features ood.py measures (ood_features_and_logits). A network is
rebuilt from its checkpoint alone: a timm network's name and arguments travel in it (Parts.timm)."""

import math
import urllib.error
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torchvision import models

from cxr14.errors import CheckpointError, SettingsError
from cxr14.frozen_batchnorm import fold_frozen_batchnorm, freeze_batchnorm
from cxr14.timm_networks import EVA_X, TIMM, timm_arguments, timm_network
from cxr14.weights_files import pretrained_source, weights_from_file

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


class Parts(NamedTuple):
    """What the rest of the project reads of a built network (net.parts), module paths as get_submodule takes them."""

    title: str  # its name in messages
    head: str  # the Dropout + Linear head
    cam_layer: str  # the last block, whose output Grad-CAM reads
    layout_layer: str  # a block three quarters deep, whose map's halves ood.py measures
    layout_channels: int
    features: int  # the width of the pooled features the head reads
    tokens: int = -1  # a ViT's tokens before its patches (class token...); -1: the blocks give [N, C, H, W] maps
    channels_last_maps: bool = False  # the blocks give [N, H, W, C] maps (timm's Swin)
    pooled_head: bool = False  # the head reads cam_layer through a global average pool alone: Grad-CAM's closed form
    folds: tuple = ()  # Backbone.folds
    timm: dict = None  # a timm network's {"name", "arguments"}: how to build it again; None for torchvision's


def known_backbone(backbone):
    """Whether this code builds BACKBONE (a timm name is checked against timm's list when built)."""
    return backbone in BACKBONES or backbone in EVA_X or (str(backbone).startswith(TIMM) and backbone != TIMM)


def check_backbone_settings(settings):
    """The settings a BACKBONE does not take, refused before a run writes anything (settings.ModelSettings)."""
    if settings.backbone in BACKBONES:
        if settings.drop_path or settings.pooling != "avg":
            raise SettingsError(
                f"DROP_PATH {settings.drop_path} / POOLING {settings.pooling!r}: torchvision's {settings.backbone} has "
                "no drop path and pools its last block's map; set 0 and 'avg' (they are for timm networks and EVA-X)"
            )
        return
    names = {name.strip() for name in str(settings.trainable_layers).split(",")}
    if not names <= {"all", "head"} and not str(settings.trainable_layers).strip().isdigit():
        raise SettingsError(
            f"TRAINABLE_LAYERS = {settings.trainable_layers!r} names torchvision's blocks; {settings.backbone} takes "
            "'all', 'head' or a number N of its last blocks"
        )
    if settings.backbone.startswith(TIMM):
        import timm

        if not timm.is_model(settings.backbone.removeprefix(TIMM)):
            raise SettingsError(f"BACKBONE {settings.backbone!r}: timm has no such network (timm.list_models())")


def build_model(
    num_findings,
    pretrained="imagenet",
    trainable_layers="layer4",
    dropout=0.5,
    backbone="resnet50",
    fold=True,
    image_size=224,
    drop_path=0.0,
    pooling="avg",
    timm=None,
):
    """A backbone with its classifier replaced by Dropout(dropout) -> Linear(features, num_findings).

    pretrained: "imagenet" (the network's own published weights: ImageNet's, EVA-X's for eva_x_*), "none" (random
    init), "hf-hub:ORG/NAME" (a timm network's weights from the Hugging Face Hub, by timm's loader) or a local weights
    file (weights_files.weights_from_file). trainable_layers: "all", "head", a number N (the last N blocks) or, for
    torchvision's networks, comma-separated BLOCKS; the head always trains, a ViT's patch embedding only with "all".
    Frozen BatchNorm becomes FrozenBatchNorm, so its statistics cannot drift in train mode, and with fold (bench.py
    times both) is folded into the frozen convolution before it. image_size, drop_path, pooling ("avg": the mean of a
    ViT's patch tokens; "token": its class token): timm networks; timm: Parts.timm of a checkpoint, built as it was.
    """
    if backbone in BACKBONES:
        if drop_path:
            raise SettingsError(f"DROP_PATH = {drop_path}: torchvision's {backbone} has none; set it to 0")
        net = _torchvision_network(backbone, pretrained)
    elif known_backbone(backbone):
        net, parts = timm_network(pretrained, timm or timm_arguments(backbone, image_size, drop_path, pooling))
        net.parts = Parts(**parts)
    else:
        raise CheckpointError(f"BACKBONE {backbone!r}: this code builds {', '.join([*BACKBONES, *EVA_X])} or timm/NAME")
    net.backbone = backbone  # a plain attribute, as net.parts
    _replace_head(net, dropout, num_findings)
    net.layer_ids = _layer_ids(net)
    trainable = _trainable_layers(trainable_layers, net)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(net.layer_ids[name] in trainable)
    freeze_batchnorm(net)
    if fold and net.parts.folds:
        fold_frozen_batchnorm(net, net.parts.folds)
    return net


def _torchvision_network(backbone, pretrained):
    spec = BACKBONES[backbone]
    # zero_init_residual: each residual block starts as the identity (Goyal et al. 2017), which trains a random init
    # markedly faster (measured on the demo when it ran at 56 px, 6 epochs: test mean AUROC 0.92 against 0.88);
    # pretrained weights overwrite it
    net = spec.build(weights=None, **({"zero_init_residual": True} if backbone == "resnet50" else {}))
    if pretrained_source(pretrained) != "none":
        state = _pretrained_state_dict(pretrained, backbone, net.state_dict())
        net.load_state_dict(state, strict=False)  # the head: replaced below
    net.parts = Parts(
        title=spec.title,
        head=spec.head,
        cam_layer=spec.cam_layer,
        layout_layer=spec.blocks["layer3"][-1],
        layout_channels=spec.layout_channels,
        features=spec.features,
        pooled_head=spec.pooled_head,
        folds=spec.folds,
    )
    return net


def _replace_head(net, dropout, num_findings):
    new_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.parts.features, num_findings))
    parent, _, name = net.parts.head.rpartition(".")
    setattr(net.get_submodule(parent), name, new_head)


def _layer_ids(net):
    """{parameter name: its layer}: 0 the stem (a ViT's patch embedding), 1 to L - 1 the blocks in forward order, L
    the head (and what follows the last block): torchvision's BLOCKS, timm's own groups (its layer-decay groups)."""
    if net.parts.timm is None:
        spec = BACKBONES[net.backbone]
        paths = {path: BLOCKS.index(block) for block, block_paths in spec.blocks.items() for path in block_paths}
        return {
            name: next((layer for path, layer in paths.items() if name.startswith(f"{path}.")), len(BLOCKS))
            for name, _ in net.named_parameters()
        }
    from timm.models import group_parameters

    return group_parameters(net, net.group_matcher(coarse=False), reverse=True)


def _trainable_layers(trainable_layers, net):
    """The layers (_layer_ids) TRAINABLE_LAYERS trains: the head always."""
    value, top = str(trainable_layers).strip(), max(net.layer_ids.values())
    if value == "all":
        return set(range(top + 1))
    if value.isdigit():
        return set(range(max(1, top - int(value)), top + 1))
    names = [name.strip() for name in value.split(",") if name.strip()]
    if net.parts.timm is not None and names != ["head"]:
        raise SettingsError(
            f"TRAINABLE_LAYERS = {value!r} names torchvision's blocks; {net.parts.title} takes 'all', 'head' or a "
            f"number of its last blocks (it has {top - 1})"
        )
    unknown = [name for name in names if name not in BLOCKS + ("head",)]
    if unknown or not names:
        raise SettingsError(f"TRAINABLE_LAYERS {unknown or names}: use 'all', 'head' or names from {', '.join(BLOCKS)}")
    return {BLOCKS.index(name) for name in names if name != "head"} | {top}


def parameter_groups(net, learning_rate, weight_decay, layer_decay=1.0):
    """AdamW's parameter groups of the trainable parameters: layer l of L (_layer_ids; the head is L) at learning_rate
    * layer_decay ** (L - l), as BEiT, MAE and EVA-X fine-tune. A timm network's 1-D parameters (norms, biases) and
    its no_weight_decay() names (position embeddings, class token) take no weight decay, as timm's own recipes; a
    torchvision network keeps one group, all decayed, when layer_decay is 1 (as its runs always had)."""
    bare = unwrap(net)
    trainable = [(name, parameter) for name, parameter in bare.named_parameters() if parameter.requires_grad]
    if bare.parts.timm is None and layer_decay == 1.0:
        return [{"params": [parameter for _, parameter in trainable], "lr": learning_rate}]
    top, skip = max(bare.layer_ids.values()), set(getattr(bare, "no_weight_decay", set)())
    groups = {}
    for name, parameter in trainable:
        layer = bare.layer_ids[name]
        decayed = bare.parts.timm is None or (parameter.ndim > 1 and name not in skip)
        group = groups.setdefault(
            (layer, decayed),
            {"params": [], "lr": learning_rate * layer_decay ** (top - layer), "weight_decay": weight_decay * decayed},
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def head(net):
    """The Dropout + Linear head of a model built by build_model."""
    return unwrap(net).get_submodule(unwrap(net).parts.head)


def cam_layer(net):
    """The module whose output Grad-CAM reads: the last block's (feature_map makes it [N, C, h, w])."""
    return unwrap(net).get_submodule(unwrap(net).parts.cam_layer)


def feature_map(net, output):
    """A block's output as [N, C, h, w]: a ViT's tokens after its prefix (class token...) laid out on the patch grid
    (square crops), timm's [N, H, W, C] maps permuted; a CNN's as they are."""
    parts = unwrap(net).parts
    if parts.tokens >= 0 and output.dim() == 3:
        patches = output[:, parts.tokens :]
        side = math.isqrt(patches.shape[1])
        return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], side, side)
    return output.permute(0, 3, 1, 2) if parts.channels_last_maps else output


def cam_weights(net):
    """The head's Linear weights [findings, channels] where the head reads cam_layer through a global average pool
    alone (Backbone.pooled_head: ResNet-50): there d logit_k / d activation_c at every cell is weight_kc / cells, so
    Grad-CAM is ReLU(sum_c weight_kc * activation_c) up to scale, read from a forward pass. None elsewhere."""
    if not unwrap(net).parts.pooled_head:
        return None
    return head(net)[-1].weight


def ood_features_and_logits(net, images):
    """(the features ood.py measures [N, ood_features_of(net)], the logits [N, findings]) from one forward pass: the
    pooled features the head reads, and a block three quarters deep's feature map (layer3, a ViT's ninth block of
    twelve) averaged over its upper and over its lower half (both halves hold the middle row of an odd number). The
    head's features alone keep no layout: a film upside down averaged to nearly a chest film's (one demo run in three
    let a fifth of them through), and the last block's cells see nearly the whole film at the demo's 64 px."""
    captured = {}
    layers = {"layout": unwrap(net).get_submodule(unwrap(net).parts.layout_layer), "head": head(net)}
    handles = [
        layers["layout"].register_forward_hook(lambda module, inputs, output: captured.update(layout=output)),
        layers["head"].register_forward_pre_hook(lambda module, inputs: captured.update(head=inputs[0])),
    ]
    try:
        logits = net(images)
    finally:
        for handle in handles:
            handle.remove()
    maps = feature_map(net, captured["layout"])
    rows = maps.shape[2]
    upper, lower = maps[:, :, : (rows + 1) // 2], maps[:, :, rows // 2 :]
    return torch.cat([captured["head"], upper.mean(dim=(2, 3)), lower.mean(dim=(2, 3))], dim=1), logits


def ood_features_of(net):
    """The width of ood_features_and_logits's features."""
    parts = unwrap(net).parts
    return parts.features + 2 * parts.layout_channels


def ood_feature_width(backbone):
    """The width of the features ood.py measures for one of torchvision's BACKBONES (checkpoints.py's format 1)."""
    spec = BACKBONES[backbone]
    return spec.features + 2 * spec.layout_channels


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


def _pretrained_state_dict(pretrained, backbone, expected):
    weights, title = BACKBONES[backbone].weights, BACKBONES[backbone].title
    if pretrained_source(pretrained) == "published":
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
    return weights_from_file(Path(pretrained), title, expected, BACKBONES[backbone].head)


def unwrap(net):
    """The bare model under DistributedDataParallel and torch.compile wrappers."""
    net = getattr(net, "module", net)
    return getattr(net, "_orig_mod", net)
