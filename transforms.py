"""Training augmentation (RandomResizedCrop, RandomRotation, ColorJitter), the evaluation crop, normalisation.

Augmentation runs in one of two places, with the same random parameters per image:
- on the device (AUGMENT_ON = "device", the default): workers only read uint8 images; the whole batch is cropped,
  rotated and resampled in one affine_grid/grid_sample call per batch, then brightness/contrast-adjusted;
- in the DataLoader workers (AUGMENT_ON = "workers"): the same crop, rotation and jitter with Pillow.
Each image's parameters are a pure function of its seed, itself a function of (SEED, epoch, image)
(loaders.SeededSampler), so a resumed run replays the same pixels and both paths draw from the same ranges.
ImageNet normalisation always runs batched on the device. The evaluation crop is films.eval_crop (no torch there,
so that an ONNX deployment needs no PyTorch).
"""

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics the pretrained ResNet-50 was trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.7, 1.0)  # crop area / image area: keep most of the chest (findings sit at apices and angles too)
CROP_RATIO = (0.9, 1.1)  # crop aspect ratio: films are near-square; more would distort the cardiac silhouette
ROTATION_DEGREES = 7.0  # patient positioning varies by a few degrees, not tens
BRIGHTNESS = 0.2  # brightness factor in 1 +- this: exposure differs between machines and technicians
CONTRAST = 0.2  # contrast factor in 1 +- this
# No horizontal flip anywhere: the heart lies on the patient's left, and a mirrored film shows dextrocardia,
# another anatomy; NIH films are consistently oriented.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class Augmentation(NamedTuple):
    """One image's (or, field by field, a batch's) augmentation: a crop box in pixels of the loaded (LOAD_SIZE) image,
    a rotation in degrees, brightness and contrast factors. The one description both augmentation paths read."""

    centre_x: object
    centre_y: object
    width: object
    height: object
    angle: object
    brightness: object
    contrast: object


def mix_seed(seed, *parts):
    """One seed from the run's SEED and further numbers (epoch, image): (SEED, epoch) seeds an epoch's dropout, and
    (SEED, epoch, image) an image's augmentation, so each is a pure function of where training is."""
    for part in parts:
        seed = seed * 1_000_003 + part
    return seed % 2**63


def _uniforms(seeds, count):
    """`count` uniforms in [0, 1) per seed: the SplitMix64 stream of each seed, vectorised (about 1 us an image,
    against 20 us for a numpy Generator per image), identical on every platform."""
    seeds = np.asarray(seeds, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):  # the arithmetic is modulo 2**64 by design
        z = seeds + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def augmentation_params(seeds, load_size):
    """float32 [N, 7] (the fields of Augmentation, in order) for images of load_size x load_size pixels, a row per seed.

    The crop: an area of CROP_SCALE of the image at a log-uniform aspect ratio in CROP_RATIO, anywhere inside it;
    then a rotation in +-ROTATION_DEGREES, then brightness and contrast factors in 1 +- BRIGHTNESS / CONTRAST.
    """
    u = _uniforms(seeds, len(Augmentation._fields))
    area = load_size**2 * (CROP_SCALE[0] + u[:, 0] * (CROP_SCALE[1] - CROP_SCALE[0]))
    ratio = np.exp(np.log(CROP_RATIO[0]) + u[:, 1] * (np.log(CROP_RATIO[1]) - np.log(CROP_RATIO[0])))
    width = np.minimum(np.sqrt(area * ratio), load_size)
    height = np.minimum(np.sqrt(area / ratio), load_size)
    centre_x = width / 2 + u[:, 2] * (load_size - width)
    centre_y = height / 2 + u[:, 3] * (load_size - height)
    angle = (2 * u[:, 4] - 1) * ROTATION_DEGREES
    brightness = 1 + (2 * u[:, 5] - 1) * BRIGHTNESS
    contrast = 1 + (2 * u[:, 6] - 1) * CONTRAST
    return np.stack([centre_x, centre_y, width, height, angle, brightness, contrast], axis=1).astype(np.float32)


def augment_batch(images, params, image_size):
    """Device augmentation: uint8 [N, 1, L, L] and params [N, 7] (augmentation_params, on the same device) -> float
    [N, 1, S, S] in [0, 1].

    One affine map per image takes each output pixel to its source: rotate about the output's centre, then
    scale and shift into the crop box. grid_sample resamples bilinearly, as Pillow does on the worker path.
    """
    images = images.float().div_(255) if images.dtype == torch.uint8 else images
    size = images.shape[-1]
    p = Augmentation(*params.float().unbind(1))
    radians = p.angle * (math.pi / 180)
    cos, sin = radians.cos(), radians.sin()
    theta = torch.stack(
        [
            torch.stack([p.width / size * cos, -p.width / size * sin, 2 * p.centre_x / size - 1], dim=1),
            torch.stack([p.height / size * sin, p.height / size * cos, 2 * p.centre_y / size - 1], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [len(images), 1, image_size, image_size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = (out * p.brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = p.contrast.view(-1, 1, 1, 1)
    return (contrast * out + (1 - contrast) * mean).clamp_(0, 1)


class WorkerAugment:
    """Worker augmentation, the same parameters as augment_batch: uint8 [L, L] array, seed -> uint8 [S, S].

    Pillow's C code on uint8 is the fastest CPU path here (a class, not a closure: Windows workers pickle it)."""

    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, pixels, seed):
        p = Augmentation(*augmentation_params([seed], len(pixels))[0])
        box = (p.centre_x - p.width / 2, p.centre_y - p.height / 2, p.centre_x + p.width / 2, p.centre_y + p.height / 2)
        image = Image.fromarray(pixels).resize((self.image_size,) * 2, Image.Resampling.BILINEAR, box=box)
        image = image.rotate(float(p.angle), resample=Image.Resampling.BILINEAR)
        image = TF.adjust_contrast(TF.adjust_brightness(image, float(p.brightness)), float(p.contrast))
        return np.array(image)


def normalize(images, channels_last=False):
    """[N, 1, S, S] (float in [0, 1], or uint8) -> [N, 3, S, S] ImageNet-normalised: the gray channel makes the
    three RGB ones, in one multiply-add with per-channel constants kept on the device (made from Python numbers
    every batch, they would be a blocking upload to the GPU every step)."""
    scale, shift = _normalisation(images.device)
    if images.dtype == torch.uint8:
        images, scale = images.float(), scale / 255
    images = torch.addcmul(shift, images, scale)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


_NORMALISATION = {}  # device -> (scale, shift), each [1, 3, 1, 1]: (x - mean) / std = x * scale + shift


def _normalisation(device):
    if device in _NORMALISATION:
        return _NORMALISATION[device]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    constants = ((1 / std).to(device), (-mean / std).to(device))
    if type(constants[0]) is torch.Tensor:  # made while tracing (export.py's ONNX export), they are fake: not kept
        _NORMALISATION[device] = constants
    return constants
