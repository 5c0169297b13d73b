"""Grad-CAM without an input gradient: in closed form where the head reads the last block through a global average
pool alone (ResNet-50), and by the grad-cam library with its graph started at that block elsewhere; both equal to
what the grad-cam library computes with a gradient through the whole network."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxr14.heat_maps import finding_masks, grad_cam, heat_maps
from cxr14.inference import crop_outputs
from model import build_model, cam_layer, cam_weights
from transforms import normalize


def library_masks(net, crop, finding_indices):
    """The grad-cam library as its README uses it: the input requires grad, the backward runs through everything."""
    batch = torch.as_tensor(crop).unsqueeze(0).expand(len(finding_indices), -1, -1, -1)
    with GradCAM(model=net, target_layers=[cam_layer(net)]) as cam:
        targets = [ClassifierOutputTarget(k) for k in finding_indices]
        return cam(input_tensor=normalize(batch).requires_grad_(True), targets=targets)


def crops(count, size=96, seed=0):
    """Films with structure (bright blobs on a gradient), so that the maps have one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    films = []
    for _ in range(count):
        film = 60 + 80 * y / size
        for _ in range(3):
            cy, cx, radius = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(4, 14)]
            film += 120 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
        films.append(np.clip(film + rng.normal(0, 8, film.shape), 0, 255).astype(np.uint8))
    return np.stack(films)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = build_model(14, "none", "layer4").eval()
    with torch.no_grad():  # a head whose findings differ from one another, as a trained one's
        net.fc[1].weight.normal_(0, 0.05)
    return net


def test_the_closed_form_equals_grad_cam_on_resnet50(resnet):
    """From the prediction's own forward pass (crop_outputs's maps) and from one of its own, the closed form's masks
    equal the library's to 1e-4, for several findings of several films; and it needs no gradient at all."""
    assert cam_weights(resnet) is not None
    films = crops(3)
    findings = [0, 5, 9, 13]
    _, _, class_maps = crop_outputs(resnet, films, torch.device("cpu"), maps=True)
    assert class_maps.shape == (3, 14, 3, 3)  # 96 px: layer4 is 3 x 3
    for index, film in enumerate(films):
        expected = library_masks(resnet, film[None], findings)
        assert sum(mask.max() > 0.5 for mask in expected) >= 2  # maps, not all zeros (the test could fail)
        for given in (class_maps[index], None):
            with torch.no_grad():  # no gradient anywhere
                found = finding_masks(resnet, film[None], findings, "cpu", given)
            np.testing.assert_allclose(np.stack(found), expected, atol=1e-4)
    # a prediction under bf16 autocast (the CPU's and the GPU's default) gives its maps in fp32, near the fp32 ones
    _, _, bf16_maps = crop_outputs(resnet, films, torch.device("cpu"), torch.bfloat16, maps=True)
    assert bf16_maps.dtype == np.float32
    np.testing.assert_allclose(bf16_maps, class_maps, atol=0.05 * np.abs(class_maps).max())


@pytest.mark.parametrize("trainable_layers", ["head", "all"])
def test_grad_cam_elsewhere_starts_its_gradient_at_the_last_block(trainable_layers):
    """DenseNet-121 (its head reads the last block through a ReLU: no closed form): the library's maps, with no
    input gradient and no backward through the backbone (its first convolution gets no gradient even when it
    trains), also when every block is frozen."""
    torch.manual_seed(0)
    net = build_model(14, "none", trainable_layers, 0.5, "densenet121").eval()
    with torch.no_grad():
        net.classifier[1].weight.normal_(0, 0.05)
    assert cam_weights(net) is None
    film = crops(1, size=64)[0][None]
    findings = [1, 7]
    expected = library_masks(net, film, findings) if trainable_layers == "all" else None
    net.zero_grad(set_to_none=True)
    with grad_cam(net) as cam:
        found = heat_maps(cam, film, findings, "cpu")
    assert net.features.conv0.weight.grad is None
    assert sum(mask.max() > 0.5 for mask in found) >= 1
    np.testing.assert_allclose(np.stack(finding_masks(net, film, findings, "cpu")), np.stack(found), atol=1e-6)
    if expected is not None:
        np.testing.assert_allclose(np.stack(found), expected, atol=1e-4)


def test_grad_cam_of_a_vit_reads_its_last_blocks_patch_tokens_on_their_grid():
    """EVA-X's ViT-Ti at 64 px (a 4 x 4 grid of patches after its class token): our masks, with the gradient started
    at the last block, equal the grad-cam library's as its README does a ViT (the input requiring grad, a
    reshape_transform that drops the class token and lays the tokens on the grid)."""
    torch.manual_seed(0)
    net = build_model(14, "none", "all", 0.5, "eva_x_tiny", image_size=64).eval()
    with torch.no_grad():
        net.head[1].weight.normal_(0, 0.5)

    def tokens_on_grid(tensor):
        return tensor[:, 1:, :].reshape(tensor.shape[0], 4, 4, tensor.shape[2]).permute(0, 3, 1, 2)

    film = crops(1, size=64)[0][None]
    findings = [2, 11]
    batch = torch.as_tensor(film).unsqueeze(0).expand(len(findings), -1, -1, -1)
    with GradCAM(model=net, target_layers=[net.blocks[-1]], reshape_transform=tokens_on_grid) as cam:
        expected = cam(
            input_tensor=normalize(batch).requires_grad_(True), targets=[ClassifierOutputTarget(k) for k in findings]
        )
    assert cam_weights(net) is None and cam_layer(net) is net.blocks[-1]
    assert all(mask.max() > 0.5 for mask in expected)  # maps, not all zeros (the test could fail)
    found = finding_masks(net, film, findings, "cpu")
    np.testing.assert_allclose(np.stack(found), expected, atol=1e-4)
