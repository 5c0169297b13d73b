"""Augmentations for training, the evaluation transform, and the device-side batch preparation.

Workers run the geometric and intensity transforms on 8-bit grayscale PIL images (Pillow's C code on uint8 is
twice as fast here as the same transforms on tensors) and hand on uint8 tensors [1, S, S]: a quarter of the
bytes of float RGB to pin and copy. prepare_batch then turns a batch into what the ImageNet backbone
expects, on the GPU when there is one: float, three channels, ImageNet mean/std.
"""

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics the pretrained ResNet-50 was trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    image_size=224,
    crop_scale=(0.7, 1.0),  # keep most of the chest: findings sit at the edges too (apices, costophrenic angles)
    crop_ratio=(0.9, 1.1),  # films are near-square; strong aspect changes distort the cardiac silhouette
    rotation_degrees=7.0,  # patient positioning varies by a few degrees, not tens
    brightness=0.2,  # exposure differs between machines and technicians
    contrast=0.2,
):
    """RandomResizedCrop, RandomRotation, ColorJitter (brightness/contrast): grayscale PIL -> uint8 [1, S, S].

    No horizontal flip: the heart lies on the patient's left, and a mirrored film shows dextrocardia, another
    anatomy; the model should learn where things are, and the NIH films are consistently oriented.
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=crop_ratio, antialias=True),
            v2.RandomRotation(rotation_degrees),
            v2.ColorJitter(brightness=brightness, contrast=contrast),
            v2.PILToTensor(),
        ]
    )


def eval_transform(image_size=224, crop_fraction=0.875):
    """Resize to image_size / crop_fraction, then centre crop: the same field of view as training on average."""
    return v2.Compose(
        [v2.Resize(round(image_size / crop_fraction), antialias=True), v2.CenterCrop(image_size), v2.PILToTensor()]
    )


def tta_transform(image_size=224, crop_fraction=0.875):
    """Test-time augmentation: the four corner crops and the centre crop, stacked as [5, 1, S, S]. No flips:
    the model never saw a mirrored chest."""
    return v2.Compose(
        [v2.Resize(round(image_size / crop_fraction), antialias=True), v2.FiveCrop(image_size), _stack_crops]
    )


def _stack_crops(crops):  # a module-level function, not a lambda: DataLoader workers pickle it on Windows
    return torch.stack([v2.functional.pil_to_tensor(crop) for crop in crops])


def prepare_batch(images, device, channels_last=False):
    """uint8 [N, 1, H, W] -> float32 [N, 3, H, W] on `device`, scaled to [0, 1] and ImageNet-normalised."""
    images = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    images = (images - mean) / std  # broadcasting the one gray channel makes the three RGB ones
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
