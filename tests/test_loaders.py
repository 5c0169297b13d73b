"""loaders.py: a run's batches, the same from images held in device memory as from DataLoader workers, and a setup
that cannot give them refused before training starts."""

import shutil
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader

import train
from cache import build_cache
from cxr14.errors import DataError
from cxr14.loaders import DeviceBatches, make_loaders
from helpers import tiny_settings as tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cached(demo_dir, tmp_path_factory):
    """A copy of the demo data with its 40-px cache (the shared demo folder stays without one)."""
    data = tmp_path_factory.mktemp("cached") / "data"
    shutil.copytree(demo_dir, data)
    build_cache(data, 40, workers=1)
    return data


def loaders_of(data, tmp_path, **loader_changes):
    settings = train.parse_settings(tiny(data, tmp_path / "run"))
    films = train.load_split_labels(settings.data, None, None)
    labels, split = films.rows, films.split
    loader = replace(settings.loader, **loader_changes)
    return make_loaders(settings.data, loader, labels, split, CPU, 0, 1, print)


def test_batches_held_in_device_memory_equal_those_of_dataloader_workers(cached, tmp_path):
    on_device = loaders_of(cached, tmp_path, cache_on_device="on")
    from_workers = loaders_of(cached, tmp_path, cache_on_device="off", num_workers=1)
    assert all(isinstance(batches, DeviceBatches) for batches in on_device)
    assert all(isinstance(batches, DataLoader) for batches in from_workers)
    for epoch in (1, 2):
        for train_batches in (on_device[0], from_workers[0]):
            train_batches.sampler.set_epoch(epoch, skip=16)  # a resumed epoch: its first batch already trained
        for (images, targets, seeds), (images_w, targets_w, seeds_w) in zip(on_device[0], from_workers[0]):
            assert torch.equal(images, images_w) and torch.equal(targets, targets_w) and torch.equal(seeds, seeds_w)
    assert len(on_device[0]) == len(from_workers[0]) > 1
    crops = torch.cat([images for images, _ in on_device[1]])
    crops_w = torch.cat([images for images, _ in from_workers[1]])
    assert crops.shape[-1] == 32 and torch.equal(crops, crops_w)  # validation: evaluation crops, in order


def test_a_setup_that_cannot_give_batches_is_refused_naming_why(demo_dir, cached, tmp_path):
    with pytest.raises(DataError, match="CACHE_ON_DEVICE = on needs the image cache"):
        loaders_of(demo_dir, tmp_path, cache_on_device="on")
    with pytest.raises(DataError, match='CACHE_ON_DEVICE = on needs AUGMENT_ON = "device"'):
        loaders_of(cached, tmp_path, cache_on_device="on", augment_on="workers")
    with pytest.raises(DataError, match="too few for a batch"):
        loaders_of(demo_dir, tmp_path, batch_size=100_000)
    settings = train.parse_settings(tiny(cached, tmp_path / "run", load_size=48, cache=cached / "cache_40"))
    films = train.load_split_labels(settings.data, None, None)
    labels, split = films.rows, films.split
    with pytest.raises(DataError, match="holds 40-px images; LOAD_SIZE is 48"):
        make_loaders(settings.data, settings.loader, labels, split, CPU, 0, 1, print)
