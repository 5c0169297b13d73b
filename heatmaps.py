"""Grad-CAM heat maps: the raw map of a finding (the grad-cam library on the backbone's last block, model.cam_layer),
and the same map drawn on the film a person reads, at 512 px or more, labelled with the finding, its probability and
its threshold, with a colour scale; one sheet per film beside its top maps. predict.py, app.py, evaluate.py's
localisation and train.py's TensorBoard maps all use these.
"""

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from films import crop_to_original
from inference import crop_probabilities
from model import cam_layer
from transforms import normalize

DISPLAY_SHORT_SIDE = (512, 1024)  # the drawn film's short side: at least 512 px (readable), at most 1024 (file size)
HEAT_ALPHA = 0.55  # the colour's weight where the map is highest; where it is 0 the film shows unchanged
COLORMAP = "jet"  # blue (low) to red (high), the convention of Grad-CAM figures
SCALE_WIDTH = 84  # px: the colour scale beside the film
SHEET_HEIGHT = 512  # px: each panel of a sheet


def grad_cam(net):
    """A Grad-CAM over the network's last block (use as a context manager: it removes its hooks on exit)."""
    return GradCAM(model=net, target_layers=[cam_layer(net)])


def heat_map(cam, image, finding_index, device):
    """Grad-CAM of one finding for one uint8 [1, S, S] evaluation crop: float32 [S, S] in [0, 1] (all 0 where no
    location raises the finding's score)."""
    return heat_maps(cam, image, [finding_index], device)[0]


def heat_maps(cam, image, finding_indices, device):
    """Grad-CAM of several findings of one crop, in one forward and backward pass (the crop repeated as a batch)."""
    batch = torch.as_tensor(image).unsqueeze(0).expand(len(finding_indices), -1, -1, -1).to(device)
    input_tensor = normalize(batch).requires_grad_(True)  # a gradient even when the last block is frozen
    return list(cam(input_tensor=input_tensor, targets=[ClassifierOutputTarget(k) for k in finding_indices]))


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


def film_overlays(model, film, probabilities, top):
    """[(finding, overlay image)] of a film's top findings (model: an inference.TorchModel; film: films.prepare's):
    the one heat-map drawing of predict.py and the page."""
    order = [int(k) for k in np.argsort(-probabilities)[:top]]
    geometry = film_geometry(film.original, model.load_size, model.image_size)
    with grad_cam(model.net) as cam:
        masks = heat_maps(cam, film.crop[None], order, model.device)
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
    probabilities = crop_probabilities(net, np.stack(crops), device) if len(crops) else []
    with grad_cam(net) as cam:
        for crop, row in zip(crops, probabilities):
            k = int(row.argmax())
            mask = heat_map(cam, crop[None], k, device)
            drawn.append(np.asarray(overlay(crop, mask, (1, 0, 1, 0), findings[k], float(row[k]))))
    net.train(was_training)
    return drawn
