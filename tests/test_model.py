import urllib.error

import pytest
import torch
from torchvision.models import resnet50
from torchvision.ops import FrozenBatchNorm2d

import model as model_module
from cxr14 import timm_networks
from cxr14.checkpoints import load_checkpoint, save_checkpoint
from cxr14.errors import SettingsError
from cxr14.inference import model_from_checkpoint
from dataset import FINDINGS
from model import CheckpointError, build_model, init_head_bias


def trainable_blocks(net):
    return {name.split(".")[0] for name, parameter in net.named_parameters() if parameter.requires_grad}


def test_head_bias_starts_at_the_minimum_of_the_weighted_loss():
    """At the initial bias, the pos_weight-ed BCE of a constant prediction has zero gradient on the labels it was
    computed from, for each pos_weight policy (a finding with no positive just gets a strongly negative bias)."""
    from dataset import count_positives, pos_weight_from_counts

    generator = torch.Generator().manual_seed(0)
    prevalence = torch.linspace(0.002, 0.6, 14)
    targets = (torch.rand(5000, 14, generator=generator) < prevalence).float()
    targets[:, -1] = 0
    positives, negatives = count_positives(targets.numpy())
    for policy in ("ratio", "sqrt", "none"):
        with pytest.warns(UserWarning, match="Hernia"):
            pos_weight = pos_weight_from_counts(positives, negatives, policy)
        net = build_model(14, pretrained="none")
        init_head_bias(net, positives, negatives, pos_weight)
        bias = net.fc[1].bias.detach().clone().requires_grad_(True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            bias.expand_as(targets), targets, pos_weight=torch.as_tensor(pos_weight, dtype=torch.float32)
        )
        (gradient,) = torch.autograd.grad(loss, bias)
        assert gradient[:-1].abs().max() < 1e-6, policy
        assert bias[-1] < -8  # log(1 / 5000): the absent finding is predicted absent


def test_only_layer4_and_the_head_train_by_default():
    net = build_model(14, pretrained="none")
    assert trainable_blocks(net) == {"layer4", "fc"}
    assert isinstance(net.fc[0], torch.nn.Dropout) and net.fc[0].p == 0.5
    assert isinstance(net.fc[1], torch.nn.Linear) and net.fc[1].out_features == 14
    assert trainable_blocks(build_model(14, "none", "layer3,layer4")) == {"layer3", "layer4", "fc"}
    assert trainable_blocks(build_model(14, "none", "all")) == {
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "fc",
    }
    assert trainable_blocks(build_model(14, "none", "head")) == {"fc"}
    assert trainable_blocks(build_model(14, "none", "2")) == {"layer3", "layer4", "fc"}  # the last two blocks
    with pytest.raises(SettingsError, match="layer5"):
        build_model(14, "none", "layer5")


def test_frozen_layers_and_their_batchnorm_do_not_move_in_training():
    torch.manual_seed(0)
    net = build_model(14, pretrained="none", trainable_layers="layer4")
    frozen_bn = [
        m
        for name, m in net.named_modules()
        if name.startswith(("bn1", "layer1", "layer2", "layer3")) and "bn" in name.split(".")[-1]
    ]
    assert frozen_bn and all(isinstance(m, FrozenBatchNorm2d) for m in frozen_bn)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    kept = {name: buffer.clone() for name, buffer in net.named_buffers() if name.endswith("folded_weight")}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    for _ in range(2):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net(torch.randn(4, 3, 64, 64) * 3 + 1), torch.ones(4, 14)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = net.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved, "nothing trained"
    assert all(name.startswith(("layer4", "fc")) for name in moved), sorted(moved)[:5]
    assert "layer4.0.bn1.running_mean" in moved  # the trainable block's BatchNorm does update (test can fail)
    assert "layer3.0.bn1.running_mean" not in moved
    folded = {name: buffer for name, buffer in net.named_buffers() if name.endswith("folded_weight")}
    assert len(folded) == 43 and all(torch.equal(folded[name], kept[name]) for name in folded)


def test_output_shape_and_eval_is_deterministic():
    net = build_model(14, pretrained="none").eval()
    images = torch.randn(3, 3, 64, 64)
    assert net(images).shape == (3, 14)
    assert torch.equal(net(images), net(images))  # dropout off in eval


def checkpoint_of(net, **changes):
    return {
        "model": net.state_dict(),
        "config": {"TRAINABLE_LAYERS": "layer4", "DROPOUT": 0.5, "DROP_PATH": 0.0, "POOLING": "avg"},
        "findings": list(FINDINGS),
        "backbone": "resnet50",
        **changes,
    }


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    net = build_model(14, pretrained="none").eval()
    save_checkpoint(checkpoint_of(net), tmp_path / "run" / "epoch_01.pth")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["epoch_01.pth"]  # no temporary left behind
    restored = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "epoch_01.pth", FINDINGS)).eval()
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(net(images), restored(images))


def test_a_checkpoint_that_names_its_backbone_architecture_still_loads(tmp_path):
    """Checkpoints written before the key took the setting's name (BACKBONE) call it "architecture"."""
    net = build_model(14, pretrained="none", backbone="densenet121").eval()
    older = {key: value for key, value in checkpoint_of(net).items() if key != "backbone"}
    older["architecture"] = "densenet121"
    torch.save(older, tmp_path / "older.pth")
    loaded = load_checkpoint(tmp_path / "older.pth", FINDINGS)
    assert loaded["backbone"] == "densenet121" and "architecture" not in loaded
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(net(images), model_from_checkpoint(loaded).eval()(images))


class NotATensor:
    pass


def test_checkpoint_mismatches_and_unsafe_files_are_clear_errors(tmp_path):
    net = build_model(14, pretrained="none")
    save_checkpoint(checkpoint_of(net, findings=list(FINDINGS[:13]) + ["Covid"]), tmp_path / "findings.pth")
    with pytest.raises(CheckpointError, match="Covid"):
        load_checkpoint(tmp_path / "findings.pth", FINDINGS)
    save_checkpoint(checkpoint_of(net, backbone="vit_b_16"), tmp_path / "arch.pth")
    with pytest.raises(CheckpointError, match="vit_b_16"):
        load_checkpoint(tmp_path / "arch.pth", FINDINGS)
    torch.save({"model": NotATensor()}, tmp_path / "pickle.pth")  # arbitrary objects: refused, never executed
    with pytest.raises(CheckpointError, match="not a checkpoint of this project") as error:
        load_checkpoint(tmp_path / "pickle.pth", FINDINGS)
    assert "weights_only=False" not in str(error.value)  # never the advice to load it anyway
    (tmp_path / "notes.pth").write_text("my notes", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "notes.pth", FINDINGS)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "other.pth", FINDINGS)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth", FINDINGS)


def test_offline_imagenet_download_says_what_to_do(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as error:
        build_model(14, pretrained="imagenet")
    message = str(error.value)
    assert model_module.BACKBONES["resnet50"].weights.url in message and "--pretrained" in message and "none" in message
    assert str(tmp_path) in message  # where to place the file


def test_pretrained_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    net = build_model(14, pretrained=tmp_path / "resnet50.pth")
    assert torch.equal(net.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    assert torch.equal(net.layer1[0].bn1.running_var, reference.layer1[0].bn1.running_var)  # frozen BN keeps stats
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="not a ResNet-50 weights file"):
        build_model(14, pretrained=tmp_path / "wrong.pth")


def test_pretrained_weights_wrapped_and_prefixed_as_training_checkpoints_keep_them_load_and_are_counted(
    tmp_path, capsys
):
    """A chest-X-ray-pretrained ResNet-50 as papers publish it: under state_dict, its keys prefixed (DDP's module.,
    the image encoder's), with its own projection head; and one that lacks a few tensors."""
    torch.manual_seed(4)
    reference = resnet50(weights=None)
    backbone = {key: value for key, value in reference.state_dict().items() if not key.startswith("fc.")}
    wrapped = {f"module.img_encoder.model.{key}": value for key, value in backbone.items()}
    wrapped["module.projection.weight"] = torch.zeros(128, 2048)
    torch.save({"state_dict": wrapped, "epoch": 50, "optimizer": {}}, tmp_path / "mgca_like.ckpt")
    net = build_model(14, pretrained=tmp_path / "mgca_like.ckpt")
    assert torch.equal(net.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert torch.equal(net.conv1.weight, reference.conv1.weight)
    said = capsys.readouterr().out
    assert f"{len(backbone)} of ResNet-50's {len(backbone)} tensors loaded" in said and "projection.weight" in said
    partial = {"model": {key: value for key, value in backbone.items() if not key.startswith("layer4.2.")}}
    torch.save(partial, tmp_path / "partial.pth")
    build_model(14, pretrained=tmp_path / "partial.pth")
    lacking = len([key for key in backbone if key.startswith("layer4.2.")])
    assert (
        f"{len(backbone) - lacking} of ResNet-50's {len(backbone)} tensors loaded; missing" in capsys.readouterr().out
    )


def test_a_safetensors_file_as_timm_and_hugging_face_publish_weights_loads_and_a_damaged_one_is_named(tmp_path, capsys):
    """timm's ResNet-50 names its 320 tensors as torchvision's does (checked with timm 1.0.29), so its
    .safetensors file is such a file."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    reference = resnet50(weights=None)
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, tmp_path / "r50.safetensors")
    net = build_model(14, pretrained=tmp_path / "r50.safetensors")
    assert torch.equal(net.layer3[5].conv2.weight, reference.layer3[5].conv2.weight)
    assert "318 of ResNet-50's 318 tensors loaded" in capsys.readouterr().out
    (tmp_path / "damaged.safetensors").write_bytes((tmp_path / "r50.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="damaged.safetensors is not a readable .safetensors file"):
        build_model(14, pretrained=tmp_path / "damaged.safetensors")


def test_a_densenet_file_given_to_a_resnet_is_refused_in_one_line_naming_the_missing_tensors(tmp_path):
    from torchvision.models import densenet121

    torch.save(densenet121(weights=None).state_dict(), tmp_path / "densenet121.pth")
    with pytest.raises(CheckpointError) as refused:
        build_model(14, pretrained=tmp_path / "densenet121.pth")
    message = str(refused.value)
    assert "densenet121.pth is not a ResNet-50 weights file" in message and "\n" not in message
    assert "missing: conv1.weight, bn1.weight, bn1.bias" in message and "features.conv0.weight" in message


@pytest.mark.parametrize("backbone", sorted(model_module.BACKBONES))
def test_every_backbone_has_its_blocks_head_features_and_heat_map_layer(backbone):
    net = build_model(14, "none", "layer4", 0.5, backbone).eval()
    spec = model_module.BACKBONES[backbone]
    frozen = [path for block in ("stem", "layer1", "layer2", "layer3") for path in spec.blocks[block]]
    assert all(not p.requires_grad for path in frozen for p in net.get_submodule(path).parameters())
    assert all(p.requires_grad for path in spec.blocks["layer4"] for p in net.get_submodule(path).parameters())
    assert not [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad]
    images = torch.randn(2, 3, 64, 64)
    features, logits = model_module.ood_features_and_logits(net, images)
    width = spec.features + 2 * spec.layout_channels
    assert logits.shape == (2, 14) and features.shape == (2, width) and torch.equal(logits, net(images))
    assert model_module.ood_features_of(net) == width
    assert model_module.cam_layer(net) is net.get_submodule(spec.cam_layer)


def test_the_ood_features_are_the_heads_input_and_the_third_blocks_upper_and_lower_halves():
    """At 80 px layer3's map is 5 x 5: the upper half is rows 0-2, the lower rows 2-4 (the middle row in both)."""
    net = build_model(14, "none", "layer4", 0.5).eval()
    images = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        features, logits = model_module.ood_features_and_logits(net, images)
        stem = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        layer3 = net.layer3(net.layer2(net.layer1(stem)))
        pooled = net.layer4(layer3).mean(dim=(2, 3))
    assert layer3.shape[2] == 5
    expected = torch.cat([pooled, layer3[:, :, :3].mean(dim=(2, 3)), layer3[:, :, 2:].mean(dim=(2, 3))], dim=1)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(logits, net.fc(pooled))


def test_the_settings_offer_exactly_the_backbones_and_blocks_model_builds():
    """train.py declares its settings' values without importing model.py (so that --help needs no torch): the two
    must agree."""
    import train
    from cxr14.configurator import rules

    allowed = rules(train)
    for name in [*model_module.BACKBONES, *model_module.EVA_X, "timm/convnext_small.fb_in22k"]:
        allowed["BACKBONE"].validate("BACKBONE", name)
        assert model_module.known_backbone(name)
    for wrong in ("vgg16", "timm/", "eva_x_huge"):
        with pytest.raises(Exception, match="one of"):
            allowed["BACKBONE"].validate("BACKBONE", wrong)
        assert not model_module.known_backbone(wrong)
    for block in [*model_module.BLOCKS, "3"]:
        allowed["TRAINABLE_LAYERS"].validate("TRAINABLE_LAYERS", block)
    with pytest.raises(Exception, match="the last N blocks"):
        allowed["TRAINABLE_LAYERS"].validate("TRAINABLE_LAYERS", "0")
    assert allowed["BACKBONE"].allowed.count("'") == 2 * (len(model_module.BACKBONES) + len(model_module.EVA_X))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_batchnorm_equals_batchnorm_in_evaluation_on_the_same_buffers(dtype):
    from cxr14.frozen_batchnorm import FrozenBatchNorm

    generator = torch.Generator().manual_seed(0)
    state = {
        "weight": torch.rand(8, generator=generator) + 0.5,
        "bias": torch.randn(8, generator=generator),
        "running_mean": torch.randn(8, generator=generator),
        "running_var": torch.rand(8, generator=generator) * 3 + 0.1,
    }
    ours, reference = FrozenBatchNorm(8), torch.nn.BatchNorm2d(8).eval()
    ours.load_state_dict(state)
    reference.load_state_dict(state, strict=False)
    x = torch.randn(2, 8, 5, 5, generator=generator)
    with torch.no_grad():
        expected = reference(x)
        if dtype == torch.float32:
            torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
            torchvisions = FrozenBatchNorm2d(8)
            torchvisions.load_state_dict(state)
            torch.testing.assert_close(ours(x), torchvisions(x), atol=1e-5, rtol=1e-5)
        else:  # under autocast the frozen blocks run in bf16: the activations' dtype, bf16's precision
            with torch.autocast("cpu", dtype=torch.bfloat16):
                found = ours(x.to(torch.bfloat16))
            assert found.dtype == torch.bfloat16
            torch.testing.assert_close(found.float(), expected, atol=3e-2, rtol=2e-2)


def test_a_checkpoint_of_the_same_findings_in_another_order_is_refused(tmp_path):
    from cxr14.checkpoints import load_checkpoint
    from cxr14.errors import CheckpointError

    swapped = list(FINDINGS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    checkpoint = {"model": {}, "config": {}, "findings": swapped, "architecture": "resnet50"}
    torch.save(checkpoint, tmp_path / "swapped.pth")
    with pytest.raises(CheckpointError, match="differ"):
        load_checkpoint(tmp_path / "swapped.pth", FINDINGS)
    torch.save({**checkpoint, "findings": list(FINDINGS)}, tmp_path / "same.pth")
    assert load_checkpoint(tmp_path / "same.pth", FINDINGS)["findings"] == list(FINDINGS)


def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path):
    import numpy as np

    from cxr14.checkpoints import load_checkpoint
    from cxr14.errors import CheckpointError

    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch" + b"\x00" * 50)
    (tmp_path / "run").mkdir()
    torch.save({"x": torch.ones(1)}, tmp_path / "run" / "best.pth")
    said = {
        "random.pth": "is not a PyTorch checkpoint",
        "model.onnx": "is an ONNX model (export.py writes them), not a checkpoint: give it as --onnx",
        "run": "is a folder, not a checkpoint: give one file (its checkpoints: best.pth)",
    }
    for name, message in said.items():
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(tmp_path / name, FINDINGS)
        assert message in str(error.value) and "would run their code" not in str(error.value), name


def _with_random_batchnorm_statistics(net, seed=0):
    """Statistics unlike BatchNorm's initial ones (mean 0, variance 1, weight 1, bias 0), where folding is the
    identity and a wrong fold would go unseen."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(count, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.2)
    return net


@pytest.mark.parametrize("backbone", ["resnet50", "densenet121"])
def test_folding_the_frozen_batchnorm_computes_torchvisions_network(backbone, tmp_path):
    """The frozen blocks' BatchNorm folded into the convolution before it (43 pairs in each): the same outputs as
    torchvision's own network on the same weights, the same state dict (checkpoints keep their format), folded again
    when other weights are loaded, and under bf16 autocast fewer operations."""
    from torchvision import models

    from cxr14.frozen_batchnorm import FoldedConv
    from cxr14.timing import OperationCount
    from model import cast_frozen

    torch.manual_seed(0)
    reference = _with_random_batchnorm_statistics(getattr(models, backbone)(weights=None)).eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    net = build_model(14, str(tmp_path / "weights.pth"), "layer4", 0.5, backbone).eval()
    unfolded = build_model(14, str(tmp_path / "weights.pth"), "layer4", 0.5, backbone, fold=False).eval()
    assert sum(isinstance(module, FoldedConv) for module in net.modules()) == 43
    assert list(net.state_dict()) == list(unfolded.state_dict())
    head = model_module.BACKBONES[backbone].head
    setattr(reference, head, model_module.head(net))  # the same head: the backbones are compared
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)
        torch.testing.assert_close(net(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

        changed = {name: value.clone() for name, value in net.state_dict().items()}
        for name in changed:
            if name.endswith("running_var") and ".1." not in name:  # frozen and trainable BatchNorm alike
                changed[name] *= 3
        net.load_state_dict(changed)
        reference.load_state_dict(changed)
        expected = reference(images)
        torch.testing.assert_close(net(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

        cast_frozen(net, torch.bfloat16)
        cast_frozen(unfolded, torch.bfloat16)
        unfolded.load_state_dict(changed)
        counts = {}
        for name, each in (("folded", net), ("unfolded", unfolded)):
            with torch.autocast("cpu", dtype=torch.bfloat16), OperationCount() as count:
                found = each(images).float()
            counts[name] = count.operations
            torch.testing.assert_close(found, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    assert counts["folded"] < counts["unfolded"] - 43  # at least one operation fewer per folded pair


def test_a_model_from_a_checkpoint_is_built_on_the_meta_device_and_equals_the_saved_one():
    """No 25M random numbers drawn to be overwritten: every tensor comes from the checkpoint, none is left on the
    meta device, the frozen blocks stay frozen and folded, and the outputs are the saved model's."""
    torch.manual_seed(0)
    saved = _with_random_batchnorm_statistics(build_model(14, "none", "layer4")).eval()
    drawn = []
    initialise = torch.nn.init.kaiming_normal_  # torchvision's initialisation of every convolution
    try:
        torch.nn.init.kaiming_normal_ = lambda tensor, *args, **kwargs: drawn.append(tensor.device.type) or tensor
        rebuilt = model_from_checkpoint(checkpoint_of(saved)).eval()
    finally:
        torch.nn.init.kaiming_normal_ = initialise
    assert len(drawn) == 53 and set(drawn) == {"meta"}  # the random initialisation touched meta tensors only
    tensors = dict(rebuilt.named_parameters()) | dict(rebuilt.named_buffers())
    assert not [name for name, tensor in tensors.items() if tensor.is_meta]
    assert [p.requires_grad for p in rebuilt.parameters()] == [p.requires_grad for p in saved.parameters()]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), saved(images))


EVA_TINY = {"embed_dim": 192, "num_heads": 3, "patch_size": 16, "mlp_ratio": 4 * 2 / 3, "swiglu_mlp": True}


def test_eva_x_is_timms_eva_with_the_published_arguments_and_its_checkpoint_rebuilds_it_without_them(monkeypatch):
    """eva_x_tiny/small/base: hustvl/EVA-X's eva_x.py arguments on timm's Eva (widths, heads, SwiGLU, rotary
    embedding, base's unfused qkv); a checkpoint carries them, so a network is rebuilt from it even when the code's
    constants change."""
    from timm.models.eva import Eva

    widths = {"eva_x_tiny": (192, 3), "eva_x_small": (384, 6), "eva_x_base": (768, 12)}
    for name, (width, heads) in widths.items():
        arguments = timm_networks.timm_arguments(name, 224, 0.0, "avg")["arguments"]
        assert (arguments["embed_dim"], arguments["num_heads"], arguments["depth"], arguments["patch_size"]) == (
            width,
            heads,
            12,
            16,
        )
        assert (
            arguments["swiglu_mlp"]
            and arguments["use_rot_pos_emb"]
            and arguments.get("qkv_fused", True) == (name != "eva_x_base")
        )
    torch.manual_seed(0)
    net = build_model(14, "none", "all", 0.5, "eva_x_tiny", image_size=64).eval()
    assert isinstance(net, Eva) and net.rope is not None and len(net.blocks) == 12
    saved = {**checkpoint_of(net), "backbone": "eva_x_tiny", "timm": net.parts.timm, "format": 3}
    saved["config"] = {**saved["config"], "IMAGE_SIZE": 64, "TRAINABLE_LAYERS": "all"}
    monkeypatch.setitem(timm_networks.EVA_X_COMMON, "depth", 2)  # the code's constants change; the checkpoint's hold
    rebuilt = model_from_checkpoint(saved).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), net(images))


def test_a_weights_file_in_eva_xs_own_key_layout_loads_every_backbone_tensor_and_computes_the_same(tmp_path, capsys):
    """A file written as EVA-X's .pt files are (a `model` wrapper, its pretraining's mlp.w12, attn.inner_attn_ln,
    norm and mask_token), from a network with an attention norm (EVA-X's key for it) and two blocks: through timm's
    key-renaming filter, no backbone tensor is missing, and the outputs equal the network's own."""
    arguments = {**timm_networks.EVA_X_COMMON, **EVA_TINY, "depth": 2, "scale_attn_inner": True, "img_size": 64}
    layout = {"name": "eva_x_tiny", "arguments": {**arguments, "drop_path_rate": 0.0, "global_pool": "avg"}}
    torch.manual_seed(0)
    source = build_model(14, "none", "all", 0.5, "eva_x_tiny", timm=layout).eval()
    renamed = {}
    for key, value in source.state_dict().items():
        if key.startswith("head."):
            continue
        key = key.replace("mlp.fc1", "mlp.w12").replace("attn.norm", "attn.inner_attn_ln")
        renamed[key.replace("fc_norm", "norm")] = value
    assert any("mlp.w12" in key for key in renamed) and any("inner_attn_ln" in key for key in renamed)
    renamed["mask_token"] = torch.zeros(1, 1, 192)
    torch.save({"model": renamed, "epoch": 600}, tmp_path / "eva_x_tiny_patch16_merged520k_mim.pt")
    loaded = build_model(14, tmp_path / "eva_x_tiny_patch16_merged520k_mim.pt", "all", 0.5, "eva_x_tiny", timm=layout)
    said = capsys.readouterr().out
    total = len([key for key in source.state_dict() if not key.startswith("head.")])
    assert f"{total} of eva_x_tiny's {total} tensors loaded" in said and "missing" not in said, said
    loaded.head.load_state_dict(source.head.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), source(images))


def test_a_timm_resnet50_file_loads_into_timm_resnet50(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    published = timm.create_model("resnet50", pretrained=False).eval()  # ImageNet's 1,000 classes
    save_file(published.state_dict(), str(tmp_path / "model.safetensors"))
    net = build_model(14, tmp_path / "model.safetensors", "all", 0.5, "timm/resnet50").eval()
    said = capsys.readouterr().out
    total = len([key for key in published.state_dict() if not key.startswith("fc.")])
    assert f"{total} of timm/resnet50's {total} tensors loaded" in said and "missing" not in said, said
    assert "unexpected, not used: fc.bias, fc.weight" in said
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            net.forward_head(net.forward_features(images), pre_logits=True),
            published.forward_head(published.forward_features(images), pre_logits=True),
        )


def test_layer_decay_gives_each_block_its_documented_rate_and_timms_weight_decay_exclusions():
    """LAYER_DECAY 0.5 on EVA-X's ViT-Ti (12 blocks): the patch embedding, class token and position embedding at
    lr * 0.5^13, block i at lr * 0.5^(12 - i), the head and its norm at lr; no weight decay on 1-D parameters and
    the position embedding and class token (timm's no_weight_decay). A torchvision ResNet-50 keeps one group."""
    net = build_model(14, "none", "all", 0.5, "eva_x_tiny", image_size=64)
    names = {id(parameter): name for name, parameter in net.named_parameters()}
    seen = 0
    for group in model_module.parameter_groups(net, 1e-3, 0.05, 0.5):
        for parameter in group["params"]:
            name = names[id(parameter)]
            if name.startswith("blocks."):
                depth = 12 - int(name.split(".")[1])
            else:
                depth = 0 if name.startswith(("head.", "fc_norm.")) else 13
            assert group["lr"] == pytest.approx(1e-3 * 0.5**depth), name
            no_decay = parameter.ndim == 1 or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen += 1
    assert seen == len(names)
    resnet = build_model(14, "none", "layer4")
    groups = model_module.parameter_groups(resnet, 1e-3, 0.05)
    assert len(groups) == 1 and len(groups[0]["params"]) == sum(p.requires_grad for p in resnet.parameters())


def test_a_vits_frozen_blocks_stay_bit_identical_after_a_step_and_the_last_n_train():
    """TRAINABLE_LAYERS 4 on EVA-X's ViT-Ti: blocks 8-11 and the head train; the patch embedding and blocks 0-7 are
    bit-identical after an AdamW step with weight decay (and DROP_PATH on)."""
    torch.manual_seed(0)
    net = build_model(14, "none", "4", 0.5, "eva_x_tiny", image_size=64, drop_path=0.2).train()
    before = {name: parameter.detach().clone() for name, parameter in net.named_parameters()}
    optimizer = torch.optim.AdamW(model_module.parameter_groups(net, 1e-2, 0.05, 0.65), lr=1e-2)
    loss = net(torch.randn(4, 3, 64, 64)).square().mean()
    loss.backward()
    optimizer.step()
    for name, parameter in net.named_parameters():
        trains = name.startswith(("head.", "fc_norm.")) or (name.startswith("blocks.") and int(name.split(".")[1]) >= 8)
        assert parameter.requires_grad == trains, name
        assert torch.equal(parameter, before[name]) != trains, name
    with pytest.raises(SettingsError, match="takes 'all', 'head' or a number of its last blocks"):
        build_model(14, "none", "layer4", 0.5, "eva_x_tiny", image_size=64)


def test_a_vits_ood_features_are_its_pooled_features_and_its_ninth_blocks_token_grid_halves():
    """Against timm's own forward_intermediates (the ninth block's patch tokens as an NCHW map) and forward_head's
    pre-logits: the head's input, then the upper and lower halves' means of a map 4 rows high at 64 px."""
    torch.manual_seed(0)
    net = build_model(14, "none", "all", 0.5, "eva_x_tiny", image_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, logits = model_module.ood_features_and_logits(net, images)
        pooled = net.forward_head(net.forward_features(images), pre_logits=True)
        grid = net.forward_intermediates(images, indices=[8], intermediates_only=True, output_fmt="NCHW")[0]
    assert grid.shape == (2, 192, 4, 4) and features.shape == (2, model_module.ood_features_of(net)) == (2, 576)
    expected = torch.cat([pooled, grid[:, :, :2].mean(dim=(2, 3)), grid[:, :, 2:].mean(dim=(2, 3))], dim=1)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(logits, net.head(pooled))


def test_hf_hub_weights_come_through_timms_own_loader_and_eva_x_through_the_hub_and_offline_is_one_message(
    tmp_path, monkeypatch, capsys
):
    """The Hugging Face Hub stood in for by local files (no network here): hf-hub:ORG/NAME asks timm's loader for
    ORG/NAME's weights and loads them into timm/resnet18; eva_x_tiny's PRETRAINED "imagenet" asks for EVA-X's own
    file from MapleF/eva_x; a download that fails is one CheckpointError saying what to do offline."""
    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    published = timm.create_model("resnet18", pretrained=False).eval()
    save_file(published.state_dict(), str(tmp_path / "model.safetensors"))
    asked = []

    def hub(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr("timm.models._hub.hf_hub_download", hub)
    net = build_model(14, "hf-hub:someone/cxr-resnet18", "all", 0.5, "timm/resnet18").eval()
    assert asked == [("someone/cxr-resnet18", "model.safetensors")]
    assert "PRETRAINED hf-hub:someone/cxr-resnet18: all" in capsys.readouterr().out
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(images), published.forward_features(images))

    source = build_model(14, "none", "all", 0.5, "eva_x_tiny", image_size=64)
    state = {key: value for key, value in source.state_dict().items() if not key.startswith("head.")}
    torch.save({"model": state}, tmp_path / "eva_x_tiny_patch16_merged520k_mim.pt")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    loaded = build_model(14, "imagenet", "all", 0.5, "eva_x_tiny", image_size=64)
    assert asked[-1] == ("MapleF/eva_x", "eva_x_tiny_patch16_merged520k_mim.pt")
    assert torch.equal(loaded.blocks[5].mlp.fc1.weight, source.blocks[5].mlp.fc1.weight)

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach huggingface.co")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="could not download EVA-X's weights") as refused:
        build_model(14, "imagenet", "all", 0.5, "eva_x_tiny", image_size=64)
    assert "set PRETRAINED to its path" in str(refused.value) and "eva_x_tiny_patch16_merged520k_mim.pt" in str(
        refused.value
    )
