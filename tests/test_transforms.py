import numpy as np
import pytest
import torch
from PIL import Image

import transforms
from cxr14.films import crop_to_original, eval_crop, fit_square, five_views
from transforms import WorkerAugment, augment_batch, augmentation_params, normalize


def test_parameters_are_a_function_of_the_seed_and_cover_their_ranges():
    seeds = np.arange(20_000) * 7919 + 3
    params = augmentation_params(seeds, 256)
    assert params.shape == (20_000, 7) and params.dtype == np.float32
    assert np.array_equal(params, augmentation_params(seeds, 256))
    assert not np.array_equal(params[:10], augmentation_params(seeds[:10] + 1, 256))
    centre_x, centre_y, width, height, angle, brightness, contrast = params.T
    area = width * height / 256**2
    ratio = width / height
    for values, (low, high) in [
        (area, transforms.CROP_SCALE),
        (ratio, transforms.CROP_RATIO),
        (angle, (-transforms.ROTATION_DEGREES, transforms.ROTATION_DEGREES)),
        (brightness, (1 - transforms.BRIGHTNESS, 1 + transforms.BRIGHTNESS)),
        (contrast, (1 - transforms.CONTRAST, 1 + transforms.CONTRAST)),
    ]:
        span = high - low
        assert values.min() >= low - 1e-4 and values.max() <= high + 1e-4  # within the range ...
        assert values.min() < low + 0.02 * span and values.max() > high - 0.02 * span  # ... and all of it
        assert abs(np.median(values) - (low + high) / 2) < 0.05 * span
    assert (centre_x - width / 2 >= -1e-3).all() and (centre_x + width / 2 <= 256 + 1e-3).all()  # inside the image
    assert (centre_y - height / 2 >= -1e-3).all() and (centre_y + height / 2 <= 256 + 1e-3).all()


@pytest.fixture(scope="module")
def film(demo_dir):
    """A 64-px demo film, letterboxed to 64."""
    path = next(demo_dir.rglob("00000002_000.png"))
    return np.array(fit_square(Image.open(path), 64))


def test_device_and_worker_augmentation_draw_the_same_image(film):
    """The same seed gives the same crop, rotation and jitter on both paths (Pillow vs grid_sample resampling)."""
    seeds = np.arange(16) * 1_000_003 + 11
    workers = np.stack([WorkerAugment(48)(film, seed) for seed in seeds]).astype(np.float32) / 255
    params = torch.from_numpy(augmentation_params(seeds, 64))
    device = augment_batch(torch.from_numpy(film).expand(16, 1, 64, 64), params, 48)[:, 0].numpy()
    assert workers.shape == device.shape == (16, 48, 48)
    for worker_image, device_image in zip(workers, device):
        assert np.abs(worker_image - device_image).mean() < 0.03  # about 2 gray levels of 255 measured
        assert np.corrcoef(worker_image.ravel(), device_image.ravel())[0, 1] > 0.95
    # a rotation of the other sign, or a shifted crop, would not match: the comparison has teeth
    flipped = params.clone()
    flipped[:, 4] *= -1
    other = augment_batch(torch.from_numpy(film).expand(16, 1, 64, 64), flipped, 48)[:, 0].numpy()
    assert np.mean([np.abs(w - o).mean() for w, o in zip(workers, other)]) > 2 * np.mean(
        [np.abs(w - d).mean() for w, d in zip(workers, device)]
    )


def test_the_evaluation_view_is_deterministic_and_crops_the_centre(film):
    view = eval_crop(film, 56)  # 56 = 64 x 0.875: no resampling, the centre 56 x 56
    assert view.dtype == np.uint8 and np.array_equal(view, film[4:60, 4:60])
    resized = eval_crop(film, 32)  # 32 / 0.875 = 37 px: resized, then the centre
    assert resized.shape == (32, 32) and np.array_equal(resized, eval_crop(film, 32))
    crops = five_views(film, 56)
    assert crops.shape == (5, 56, 56) and np.array_equal(crops[4], view) and np.array_equal(crops[0], film[:56, :56])


@pytest.mark.parametrize("height, width", [(200, 100), (100, 200), (300, 220), (64, 64)])
@pytest.mark.parametrize("image_size", [48, 56])  # resized after the letterbox, and a plain centre crop
def test_crop_coordinates_map_back_to_the_original_film(height, width, image_size):
    """A bright rectangle drawn on an original, letterboxed to 64 and cropped: its centre in the crop (the
    intensity-weighted centroid, exact to a fraction of a pixel) maps back through crop_to_original to its centre in
    the original within a quarter of a loaded pixel. A letterbox pasted one pixel off is a whole loaded pixel."""
    original = np.zeros((height, width), np.uint8)
    top, bottom, left, right = height * 6 // 10, height * 7 // 10, width * 3 // 10, width * 5 // 10
    original[top:bottom, left:right] = 255
    crop = eval_crop(np.asarray(fit_square(Image.fromarray(original), 64)), image_size).astype(np.float64)
    ys, xs = np.mgrid[:image_size, :image_size] + 0.5  # pixel centres, in the crop's edge coordinates
    centre_x, centre_y = (crop * xs).sum() / crop.sum(), (crop * ys).sum() / crop.sum()
    scale_x, offset_x, scale_y, offset_y = crop_to_original((width, height), 64, image_size)
    loaded_pixel = max(height, width) / 64  # original pixels per loaded pixel
    assert abs(scale_x * centre_x + offset_x - (left + right) / 2) < loaded_pixel / 4
    assert abs(scale_y * centre_y + offset_y - (top + bottom) / 2) < loaded_pixel / 4


def test_normalize_makes_three_imagenet_channels():
    images = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = normalize(images, channels_last=True)
    assert out.shape == (2, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    expected = (1 - torch.tensor(transforms.IMAGENET_MEAN)) / torch.tensor(transforms.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_a_first_normalize_while_tracing_leaves_no_fake_tensors_for_later_inference(monkeypatch):
    """export.py's ONNX export traces under fake tensors; had that first call cached its constants, every later
    normalize in the process would hand out fake tensors (".numpy() is not supported for tensor subclasses")."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(transforms, "_NORMALISATION", {})
    with FakeTensorMode() as mode:
        traced = normalize(mode.from_tensor(torch.zeros(1, 1, 4, 4, dtype=torch.uint8)))
    assert type(traced) is not torch.Tensor  # it did run under the fake mode
    out = normalize(torch.full((1, 1, 4, 4), 255, dtype=torch.uint8))
    assert type(out) is torch.Tensor
    expected = (1 - torch.tensor(transforms.IMAGENET_MEAN)) / torch.tensor(transforms.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0].numpy(), expected.numpy())
