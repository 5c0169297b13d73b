"""Heat-map localisation: does Grad-CAM's peak fall on the drawn lesion? Slow (a 128-px model trains for minutes
on 2 CPU cores), so it runs apart from the quick suite: make test-slow, or pytest -m slow."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import train
from cxr14.films import eval_crop, fit_square, load_image
from cxr14.heat_maps import finding_masks
from cxr14.inference import TorchModel
from cxr14.pixels import index_images
from dataset import FINDINGS, read_split
from demo_data import write_demo
from helpers import ROOT

pytestmark = pytest.mark.slow
LESIONS = ["Mass", "Nodule"]
TOLERANCE = 7  # pixels at 112 px: a quarter of a layer4 cell, "inside or near" the box


@pytest.fixture(scope="module")
def heat_map_run(tmp_path_factory):
    """config/demo_128.py on fresh demo data (a data seed the settings were not tuned on)."""
    data = tmp_path_factory.mktemp("demo_128")
    write_demo(data, patients=400, size=128, seed=3)
    out = tmp_path_factory.mktemp("run_128")
    config_files = [str(ROOT / "config" / "demo.py"), str(ROOT / "config" / "demo_128.py")]
    with pytest.raises(SystemExit) as stopped:
        train.main([*config_files, f"--data_dir={data}", f"--out_dir={out}", "--device=cpu"])
    assert stopped.value.code == 0
    return data, out


def read_boxes(data_dir):
    """BBox_List_2017.csv (NIH's format: name, finding, x, y, w, h and empty columns) as a table."""
    columns = ["image_name", "finding", "x", "y", "w", "h"]
    return pd.read_csv(data_dir / "BBox_List_2017.csv", header=None, skiprows=1, usecols=range(6), names=columns)


def box_in_crop(box, native_size, config):
    """(x0, y0, x1, y1) of a drawn box in the network's input: the box's mask is letterboxed and cropped as the
    film is."""
    mask = np.zeros((native_size, native_size), np.uint8)
    mask[round(box.y) : round(box.y + box.h) + 1, round(box.x) : round(box.x + box.w) + 1] = 255
    loaded = np.asarray(fit_square(Image.fromarray(mask), config["LOAD_SIZE"]))
    ys, xs = np.nonzero(eval_crop(loaded, config["IMAGE_SIZE"]) > 127)
    return xs.min(), ys.min(), xs.max(), ys.max()


def peak(mask):
    """The centre of the heat map's highest plateau (upsampled layer4 cells at the border are flat)."""
    ys, xs = np.nonzero(mask >= mask.max() - 0.01)
    return xs.mean(), ys.mean()


def hit_rate(peaks, regions):
    x, y = peaks[:, 0], peaks[:, 1]
    x0, y0, x1, y1 = (regions[:, k] for k in range(4))
    inside = (x >= x0 - TOLERANCE) & (x <= x1 + TOLERANCE) & (y >= y0 - TOLERANCE) & (y <= y1 + TOLERANCE)
    return inside.mean()


def test_heat_map_peaks_fall_on_the_drawn_lesions(heat_map_run):
    data, out = heat_map_run
    last_epoch = sorted(out.glob("epoch_*.pth"))[-1]  # not best.pth: from scratch, validation loss is noisy
    loaded = TorchModel(last_epoch, device="cpu")
    config, model = loaded.config, loaded.net
    split = read_split(out / "split.csv")
    boxes = read_boxes(data)
    boxes = boxes[boxes.finding.isin(LESIONS) & boxes.image_name.isin(split.image_name[split.split == "test"])]
    paths = index_images(data)
    peaks, regions = [], []
    for box in boxes.itertuples():
        view = eval_crop(load_image(paths[box.image_name], config["LOAD_SIZE"]), config["IMAGE_SIZE"])
        (mask,) = finding_masks(model, view[None], [FINDINGS.index(box.finding)], "cpu")
        peaks.append(peak(mask))
        regions.append(box_in_crop(box, 128, config))
    peaks, regions = np.array(peaks), np.array(regions)
    hits = hit_rate(peaks, regions)
    # chance: the same peaks judged against other test images' lesions, which keeps where lesions and peaks
    # tend to be (both in the lung fields) and removes only the pairing
    rng = np.random.default_rng(0)
    shuffled = np.array([hit_rate(peaks, regions[rng.permutation(len(regions))]) for _ in range(1000)])
    p_value = (1 + np.sum(shuffled >= hits)) / (1 + len(shuffled))
    print(
        f"\nGrad-CAM peak on the drawn lesion: {hits:.1%} of {len(peaks)} test-split Mass/Nodule images; "
        f"shuffled pairs {shuffled.mean():.1%} (95th percentile {np.percentile(shuffled, 95):.1%}); p = {p_value:.4f}"
    )
    assert len(peaks) >= 40
    assert hits >= 2 * shuffled.mean() and p_value < 0.01
