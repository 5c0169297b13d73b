"""Grad-CAM heat maps: the raw map of a finding on the backbone's last block (model.cam_layer): in closed form from the
prediction's own forward pass where the head reads that block through a global average pool alone (ResNet-50:
model.cam_weights), else by the grad-cam library with the gradient started at that block (no input gradient, no
backward through the backbone); and the same map drawn on the film a person reads, at 512 px or more, labelled with
the finding, its probability and its threshold, with a colour scale; one sheet per film beside its top maps.
predict.py, app.py, evaluate.py's localisation and train.py's TensorBoard maps all use these.
"""

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxr14.calibration import sigmoid
from cxr14.films import crop_to_original
from cxr14.inference import crop_outputs
from model import cam_layer, cam_weights, feature_map
from transforms import normalize

DISPLAY_SHORT_SIDE = (512, 1024)  # the drawn film's short side: at least 512 px (readable), at most 1024 (file size)
HEAT_ALPHA = 0.55  # the colour's weight where the map is highest; where it is 0 the film shows unchanged
COLORMAP = "jet"  # blue (low) to red (high), the convention of Grad-CAM figures
SCALE_WIDTH = 84  # px: the colour scale beside the film
SHEET_HEIGHT = 512  # px: each panel of a sheet


class LayerGradCAM(GradCAM):
    """grad-cam's GradCAM over the network's last block (a ViT's: its patch tokens as a grid), with the autograd graph
    started at that block's output: Grad-CAM needs the gradient of the head alone, so the input needs none and no
    backward runs through the backbone, whose blocks may all be frozen. A context manager: it removes its hooks on
    exit."""

    def __init__(self, net):
        layer = cam_layer(net)
        # registered before grad-cam's hooks, so theirs see (and hook the gradient of) the restarted output; a clone,
        # which the head may change in place (DenseNet's ReLU), as it could the layer's own output
        self.restart = layer.register_forward_hook(
            lambda module, inputs, output: output.detach().requires_grad_().clone()
        )
        # a ViT's tokens on their patch grid, [N, C, h, w], as grad-cam weighs channels over cells
        super().__init__(model=net, target_layers=[layer], reshape_transform=lambda output: feature_map(net, output))

    def __exit__(self, *exc_info):
        self.restart.remove()
        return super().__exit__(*exc_info)


def grad_cam(net):
    """A Grad-CAM over the network's last block (use as a context manager: it removes its hooks on exit)."""
    return LayerGradCAM(net)


def heat_maps(cam, image, finding_indices, device):
    """Grad-CAM of several findings of one crop by the grad-cam library, in one forward and backward pass (the crop
    repeated as a batch)."""
    batch = torch.as_tensor(image).unsqueeze(0).expand(len(finding_indices), -1, -1, -1).to(device)
    return list(cam(input_tensor=normalize(batch), targets=[ClassifierOutputTarget(k) for k in finding_indices]))


def finding_masks(net, image, finding_indices, device, class_maps=None):
    """Grad-CAM of some findings of one uint8 [1, S, S] evaluation crop, each float32 [S, S] in [0, 1]: in closed
    form where the backbone has one (model.cam_weights), from `class_maps` (inference.crop_outputs's maps of this
    crop, [findings, h, w]: the prediction's own forward pass) or from a forward pass made here; else by the
    grad-cam library (heat_maps)."""
    if cam_weights(net) is None:
        with grad_cam(net) as cam:
            return heat_maps(cam, image, finding_indices, device)
    if class_maps is None:
        class_maps = crop_outputs(net, np.asarray(image)[None, 0], torch.device(device), maps=True)[2][0]
    size = tuple(np.asarray(image).shape[-2:][::-1])
    return [closed_form_mask(class_maps[k], size) for k in finding_indices]


def closed_form_mask(class_map, size):
    """A class activation map [h, w] as grad-cam turns its own maps into a mask: ReLU, scaled to [0, 1] and resized
    to `size` (width, height), then the mean over its one layer, ReLU and scaling again (BaseCAM.compute_cam_per_layer
    and aggregate_multi_layers), so the two paths' masks are equal."""
    scaled = scale_cam_image(np.maximum(np.asarray(class_map, dtype=np.float32)[None], 0), size)
    return scale_cam_image(np.maximum(scaled, 0))[0]


def display_size(original_size):
    """(width, height) the film is drawn at: its short side brought into DISPLAY_SHORT_SIDE."""
    short = min(original_size)
    scale = min(max(short, DISPLAY_SHORT_SIDE[0]), DISPLAY_SHORT_SIDE[1]) / short
    return tuple(max(1, round(side * scale)) for side in original_size)


def map_on_film(mask, original_size, size, geometry):
    """The crop's heat map resampled onto the film drawn at `size`: float32 [height, width], 0 outside the crop.
    geometry: films.crop_to_original's (scale_x, offset_x, scale_y, offset_y) from crop to film pixels."""
    scale_x, offset_x, scale_y, offset_y = geometry
    per_display_x, per_display_y = original_size[0] / size[0], original_size[1] / size[1]
    # PIL's affine transform maps each output (display) pixel to its source (crop) pixel
    coefficients = (per_display_x / scale_x, 0, -offset_x / scale_x, 0, per_display_y / scale_y, -offset_y / scale_y)
    heat = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F")
    return np.asarray(heat.transform(size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR))


def film_geometry(original, load_size, image_size):
    """How the network's crop sits on this film (for overlay): letterbox to load_size, evaluation crop."""
    return crop_to_original((original.shape[1], original.shape[0]), load_size, image_size)


def overlay(original, mask, geometry, finding, probability, threshold=None):
    """The heat map drawn on the film (uint8 [H, W]) at display size, with a caption and a colour scale: an RGB
    PIL image, with the finding, probability and threshold also in its PNG metadata (image.info["pnginfo"]).
    geometry: film_geometry(...) for a film; (1, 0, 1, 0) when `original` is the crop itself."""
    original_size = (original.shape[1], original.shape[0])
    size = display_size(original_size)
    film = np.asarray(Image.fromarray(original).resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255
    heat = np.clip(map_on_film(mask, original_size, size, geometry), 0, 1)
    colour = colormaps[COLORMAP](heat)[..., :3]
    alpha = HEAT_ALPHA * heat[..., None]
    drawn = (film[..., None] * (1 - alpha) + colour * alpha) * 255
    canvas = Image.new("RGB", (size[0] + SCALE_WIDTH, size[1]), "black")
    canvas.paste(Image.fromarray(drawn.round().astype(np.uint8)), (0, 0))
    font = ImageFont.load_default(size=max(14, size[1] // 30))
    _caption(ImageDraw.Draw(canvas, "RGBA"), size, font, caption(finding, probability, threshold))
    _colour_scale(canvas, size, ImageFont.load_default(size=max(12, size[1] // 40)))
    info = PngInfo()
    for key, value in {"finding": finding, "probability": f"{probability:.4f}", "threshold": threshold}.items():
        info.add_text(key, "none" if value is None else str(value))
    canvas.info["pnginfo"] = info
    return canvas


def caption(finding, probability, threshold=None):
    """'Effusion  p = 0.83  (threshold 0.41: above)'."""
    if threshold is None:
        return f"{finding}  p = {probability:.2f}  (no threshold: run evaluate.py)"
    side = "above" if probability >= threshold else "below"
    return f"{finding}  p = {probability:.2f}  (threshold {threshold:.2f}: {side})"


def _caption(draw, size, font, text):
    height = int(font.size * 1.6)
    draw.rectangle([0, 0, size[0], height], fill=(0, 0, 0, 170))
    draw.text((font.size // 2, height // 2), text, font=font, fill="white", anchor="lm")


def _colour_scale(canvas, size, font):
    """A vertical bar from the map's lowest (bottom) to highest (top) value beside the film, labelled."""
    top, bottom = size[1] // 8, size[1] - size[1] // 8
    ramp = np.linspace(1, 0, bottom - top)[:, None].repeat(SCALE_WIDTH // 3, axis=1)
    bar = Image.fromarray((colormaps[COLORMAP](ramp)[..., :3] * 255).astype(np.uint8))
    left = size[0] + SCALE_WIDTH // 3
    canvas.paste(bar, (left, top))
    draw = ImageDraw.Draw(canvas)
    centre = left + SCALE_WIDTH // 6
    draw.text((centre, top - 4), "high", font=font, fill="white", anchor="md")
    draw.text((centre, bottom + 4), "low", font=font, fill="white", anchor="ma")
    draw.text((centre, size[1] - 4), "Grad-CAM", font=font, fill="white", anchor="md")


def sheet(original, name, overlays):
    """One image: the film (titled with its name) beside its overlays, each SHEET_HEIGHT px high."""
    film = Image.fromarray(original).convert("RGB")
    film = film.resize((round(film.width * SHEET_HEIGHT / film.height), SHEET_HEIGHT), Image.Resampling.LANCZOS)
    font = ImageFont.load_default(size=SHEET_HEIGHT // 30)
    _caption(ImageDraw.Draw(film, "RGBA"), film.size, font, f"{name} ({original.shape[1]} x {original.shape[0]})")
    panels = [film] + [
        panel.resize((round(panel.width * SHEET_HEIGHT / panel.height), SHEET_HEIGHT), Image.Resampling.LANCZOS)
        for panel in overlays
    ]
    gap = 8
    out = Image.new("RGB", (sum(panel.width for panel in panels) + gap * (len(panels) - 1), SHEET_HEIGHT), "white")
    left = 0
    for panel in panels:
        out.paste(panel, (left, 0))
        left += panel.width + gap
    return out


def film_overlays(model, film, probabilities, top, class_maps=None):
    """[(finding, overlay image)] of a film's top findings (model: an inference.TorchModel; film: films.prepare's;
    class_maps: this film's from TorchModel.predict_with_maps, where it has them): the one heat-map drawing of
    predict.py and the page."""
    order = [int(k) for k in np.argsort(-probabilities)[:top]]
    geometry = film_geometry(film.original, model.load_size, model.image_size)
    masks = finding_masks(model.net, film.crop[None], order, model.device, class_maps)
    drawn = []
    for k, mask in zip(order, masks):
        finding = model.findings[k]
        threshold = model.thresholds.get(finding)
        drawn.append((finding, overlay(film.original, mask, geometry, finding, probabilities[k], threshold)))
    return drawn


def top_finding_overlays(net, crops, findings, device):
    """For a few evaluation crops (uint8 [S, S]): the heat map of each one's most probable finding drawn on the crop,
    as RGB uint8 arrays (TensorBoard shows them every epoch). Leaves the network in the mode it found it in."""
    was_training = net.training
    net.eval()
    drawn = []
    if len(crops):
        logits, _, class_maps = crop_outputs(net, np.stack(crops), torch.device(device), maps=True)
        for index, (crop, row) in enumerate(zip(crops, sigmoid(logits))):
            k = int(row.argmax())
            film_maps = None if class_maps is None else class_maps[index]
            (mask,) = finding_masks(net, crop[None], [k], device, film_maps)
            drawn.append(np.asarray(overlay(crop, mask, (1, 0, 1, 0), findings[k], float(row[k]))))
    net.train(was_training)
    return drawn
