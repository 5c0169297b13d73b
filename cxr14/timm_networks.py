"""timm's networks as BACKBONE builds them: any of timm's by name (timm/NAME), and EVA-X's chest-X-ray ViTs on timm's
Eva with the arguments hustvl/EVA-X publishes; their pretrained weights (timm's own loader, the Hugging Face Hub, a
local file through the network's own key-renaming filter); and what model.py's Parts needs to know of them."""

import sys
from pathlib import Path

from cxr14.errors import CheckpointError, SettingsError
from cxr14.weights_files import pretrained_source, weights_from_file

TIMM = "timm/"  # BACKBONE = "timm/NAME": the network timm.create_model builds by NAME (timm.list_models())
EVA_X_COMMON = {  # hustvl/EVA-X classification/models/eva_x.py: timm's Eva with these arguments (MIT license)
    "patch_size": 16,
    "depth": 12,
    "mlp_ratio": 4 * 2 / 3,
    "swiglu_mlp": True,
    "use_rot_pos_emb": True,
    "ref_feat_shape": (14, 14),  # the rotary embedding's reference grid: 224 px / 16
}
EVA_X = {  # BACKBONE -> (its own arguments, its published weights on the Hugging Face Hub, MapleF/eva_x)
    "eva_x_tiny": ({"embed_dim": 192, "num_heads": 3}, "eva_x_tiny_patch16_merged520k_mim.pt"),
    "eva_x_small": ({"embed_dim": 384, "num_heads": 6}, "eva_x_small_patch16_merged520k_mim.pt"),
    "eva_x_base": (
        {"embed_dim": 768, "num_heads": 12, "qkv_fused": False, "scale_mlp": True},
        "eva_x_base_patch16_merged520k_mim.pt",
    ),
}
EVA_X_HUB = "MapleF/eva_x"  # where EVA-X's authors publish its weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # transforms.normalize's: a timm network's own weights may expect another


def timm_arguments(backbone, image_size, drop_path, pooling):
    """{"name", "arguments"} that build a timm network again: EVA-X's on timm's Eva, or timm.create_model's."""
    common = {"img_size": image_size, "drop_path_rate": drop_path, "global_pool": pooling}
    if backbone in EVA_X:
        return {"name": backbone, "arguments": {**EVA_X_COMMON, **EVA_X[backbone][0], **common}}
    return {"name": backbone, "arguments": common}


def timm_network(pretrained, built):
    """(a timm network, num_classes 0, as `built` (timm_arguments's) says, with its weights as `pretrained` says;
    model.Parts's fields of it)."""
    import timm

    name, arguments = built["name"], dict(built["arguments"])
    source = pretrained_source(pretrained)
    if name in EVA_X:
        from timm.models.eva import Eva

        net = Eva(num_classes=0, **arguments)
    else:
        model_name = name.removeprefix(TIMM)
        if not timm.is_model(model_name):
            raise SettingsError(f"BACKBONE {name!r}: timm {timm.__version__} has no such network (timm.list_models())")
        hub = {"pretrained_cfg_overlay": {"hf_hub_id": str(pretrained)[len("hf-hub:") :]}} if source == "hub" else {}
        net = create_timm(timm, model_name, arguments, source in ("published", "hub"), hub, pretrained)
        built = {"name": name, "arguments": arguments}  # as timm took them: a CNN takes no image size
    parts = timm_parts(net, name, built)
    if source == "published" and name in EVA_X:
        pretrained, source = eva_x_weights(name), "file"
    if source == "file":
        convert = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
        state = weights_from_file(
            Path(pretrained), name, net.state_dict(), parts["head"], convert and (lambda s: convert(s, net))
        )
        net.load_state_dict(state, strict=False)
    return net, parts


def create_timm(timm, model_name, arguments, pretrained, hub, source):
    """timm.create_model, its weights downloaded by timm when `pretrained`; a network that takes no image size (a CNN)
    is built without one (`arguments` keeps what it took)."""
    try:
        try:
            net = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **hub, **arguments)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
            arguments.pop("img_size")
            net = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **hub, **arguments)
    except (OSError, RuntimeError) as error:  # no connection, no such hub repository, another network's weights
        raise CheckpointError(
            f"could not load the {source} weights of timm's {model_name}: {str(error).splitlines()[0]}\n"
            "  - on a machine without internet, download them elsewhere (huggingface-cli download ORG/NAME) and set "
            "PRETRAINED to the model.safetensors file, or\n"
            "  - set PRETRAINED to none to start from random weights (much worse on real X-rays)."
        ) from error
    except (AssertionError, ValueError, TypeError) as error:  # timm's checks of its arguments (a global_pool...)
        raise SettingsError(f"timm's {model_name} refuses {arguments}: {error}") from None
    if pretrained:  # timm loads strictly: a missing or unexpected tensor (the classifier aside) stops it
        print(f"PRETRAINED {source}: all {len(net.state_dict())} of timm's {model_name}'s tensors loaded by timm")
    mean = tuple(getattr(net, "pretrained_cfg", {}).get("mean", IMAGENET_MEAN))
    if pretrained and any(abs(ours - theirs) > 1e-3 for ours, theirs in zip(IMAGENET_MEAN, mean)):
        print(
            f"note: timm's {model_name} weights were trained on films normalised with mean {mean}; this project "
            "normalises with ImageNet's (transforms.normalize): fine-tuning adapts, its first steps start a little off"
        )
    return net


def eva_x_weights(name):
    """EVA-X's published weights for BACKBONE `name`, downloaded once into the Hugging Face cache."""
    from huggingface_hub import hf_hub_download

    filename = EVA_X[name][1]
    try:
        return hf_hub_download(EVA_X_HUB, filename)
    except Exception as error:  # of many kinds (offline, no such file, a proxy): each means "not downloaded"
        raise CheckpointError(
            f"could not download EVA-X's weights ({EVA_X_HUB}, {filename}): {str(error).splitlines()[0]}\n"
            f"  - download https://huggingface.co/{EVA_X_HUB}/blob/main/{filename} elsewhere and set PRETRAINED to "
            "its path, or\n  - set PRETRAINED to none to start from random weights."
        ) from error


def timm_parts(net, name, built):
    """model.Parts's fields of a timm network: its classifier's path, its last block (feature_info's last), a block
    three quarters deep (a ViT's ninth of twelve, a CNN's third stage of four), its prefix tokens if a ViT."""
    classifier = net.get_classifier()
    head_path = next(path for path, module in net.named_modules() if module is classifier and path)
    info = net.feature_info.get_dicts() if hasattr(net.feature_info, "get_dicts") else list(net.feature_info)
    tokens = getattr(net, "num_prefix_tokens", -1) if hasattr(net, "patch_embed") and hasattr(net, "blocks") else -1
    layout = info[(3 * len(info)) // 4 - 1] if tokens >= 0 else info[-2]
    return {
        "title": name,
        "head": head_path,
        "cam_layer": info[-1]["module"],
        "layout_layer": layout["module"],
        "layout_channels": layout["num_chs"],
        "features": net.num_features,
        "tokens": tokens,
        "channels_last_maps": getattr(net, "output_fmt", "NCHW") == "NHWC",
        "timm": built,
    }
