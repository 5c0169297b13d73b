"""Frozen BatchNorm, fast: FrozenBatchNorm (torchvision's, applied as one multiply-add in the input's dtype), and the
folding of a frozen BatchNorm into the frozen convolution before it (FoldedConv), for the frozen blocks of a network.
Checkpoints keep torchvision's state dict: what is folded is derived, never saved."""

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


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


def fold_frozen_batchnorm(net, pairs):
    """Fold each frozen BatchNorm into the frozen convolution it reads, where the network has such pairs: (convolution,
    BatchNorm) child names of one module where the BatchNorm reads the convolution alone (model.Backbone.folds);
    refolded whenever the model's weights are loaded. The trainable blocks keep theirs."""
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


def freeze_batchnorm(module):
    """Swap each BatchNorm2d with frozen parameters for a FrozenBatchNorm holding the same statistics; timm's
    BatchNorm with its activation (BatchNormAct2d) for timm's frozen twin, which keeps the activation."""
    for name, child in module.named_children():
        if not isinstance(child, nn.BatchNorm2d) or child.weight is None or child.weight.requires_grad:
            freeze_batchnorm(child)
        elif type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm(child.num_features, eps=child.eps)
            frozen.load_state_dict(child.state_dict(), strict=False)  # num_batches_tracked has no place there
            setattr(module, name, frozen)
        else:
            from timm.layers import freeze_batch_norm_2d

            setattr(module, name, freeze_batch_norm_2d(child))
