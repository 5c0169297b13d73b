"""A training run's batches: from the cached images held in device memory when they fit there (CACHE_ON_DEVICE: no
DataLoader, no workers, no copy per step), else from DataLoader workers that read the cache or decode the PNGs.
Training images leave as loaded, with their augmentation seeds (augmented on the device, AUGMENT_ON = "device"),
or augmented in the workers; validation images leave as evaluation crops (films.eval_crop)."""

import signal
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset import FINDINGS
from datasets import is_nih_only
from devices import worker_count
from errors import DataError
from films import eval_crop, five_views
from images import CachedImages, FilmImages, find_cache, images_on_device, memory_for_images
from transforms import WorkerAugment, mix_seed


def make_loaders(data, loader, labels, split, device, rank, world_size, log):
    """(training batches, validation batches) of a settings.DataSettings and LoaderSettings: from images held in
    device memory when they fit there (CACHE_ON_DEVICE), else from DataLoader workers that read the cache or decode
    the PNGs."""
    cache = find_cache(data.data_dir, data.load_size, data.cache) if is_nih_only(data) else None
    rows = {part: labels[split == part] for part in ("train", "val")}
    if len(rows["train"]) < loader.batch_size * world_size or len(rows["val"]) == 0:
        raise DataError(f"{len(rows['train'])} training / {len(rows['val'])} validation images: too few for a batch.")
    if cache is None:
        images = {part: FilmImages(rows[part]["path"], data.load_size) for part in rows}
    else:
        images = {part: CachedImages(cache, rows[part]["image_name"]) for part in rows}
        if images["train"].size != data.load_size:
            size = images["train"].size
            raise DataError(f"the cache {cache} holds {size}-px images; LOAD_SIZE is {data.load_size}")
    targets = {part: rows[part][list(FINDINGS)].to_numpy() for part in rows}
    train_sampler = SeededSampler(
        DistributedSampler(range(len(rows["train"])), world_size, rank, seed=data.seed), data.seed
    )
    val_sampler = DistributedSampler(range(len(rows["val"])), world_size, rank, shuffle=False)
    crop = partial(eval_crop, image_size=data.image_size)
    count = sum(len(part) for part in rows.values())
    if cache_on_device(loader, data.load_size, cache, count, device, log):
        on_device = {part: images_on_device(images[part], device, crop if part == "val" else None) for part in rows}
        return (
            DeviceBatches(on_device["train"], targets["train"], train_sampler, loader.batch_size, drop_last=True),
            DeviceBatches(on_device["val"], targets["val"], val_sampler, loader.batch_size),
        )
    decoding = "decoding PNGs (python cache.py builds a faster cache)" if is_nih_only(data) else "decoding the films"
    log(f"images: {f'cache {cache}' if cache else decoding}")
    augment = WorkerAugment(data.image_size) if loader.augment_on == "workers" else None
    workers = worker_count(loader.num_workers)
    common = {
        "batch_size": loader.batch_size,
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        "prefetch_factor": 4 if workers else None,
        # iter(DataLoader) draws a seed from this generator, not from the global stream that dropout uses
        "generator": torch.Generator().manual_seed(data.seed),
        "worker_init_fn": leave_stop_signals_to_the_main_process,
    }
    train_set = ChestXrayDataset(images["train"], targets["train"], augment)
    val_set = ChestXrayDataset(images["val"], targets["val"], crop)
    return (
        DataLoader(train_set, sampler=train_sampler, drop_last=True, **common),
        DataLoader(val_set, sampler=val_sampler, **common),
    )


def leave_stop_signals_to_the_main_process(worker_id):
    """In each DataLoader worker: ignore SIGINT and SIGTERM. The main process catches them, stops at its next step
    and saves; a worker killed by the same signal (Ctrl-C reaches the whole process group, SLURM signals every
    process of the job) would make the main process fail with "DataLoader worker exited unexpectedly" instead.
    A worker still ends with the main process (the DataLoader shuts it down, or it sees its parent gone)."""
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def close_workers(*loaders):
    """End the loaders' worker processes now, at the end of a run. They ignore SIGTERM, and at interpreter exit
    DataLoader leaves its persistent workers to a SIGTERM from Python's own clean-up, which would then wait for them
    for ever. Asked to stop, a worker ends at once; one that does not is killed. (DataLoader has no public close;
    this uses its iterator's own shutdown.)"""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is None:
            continue
        iterator._shutdown_workers()
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
        loader._iterator = None


def cache_on_device(loader, load_size, cache, count, device, log):
    """Whether to hold the run's cached images in device memory (CACHE_ON_DEVICE), saying why not when asked."""
    wanted = loader.cache_on_device
    if wanted == "off":
        return False
    if cache is None or loader.augment_on != "device":
        needs = "the image cache (python cache.py)" if cache is None else 'AUGMENT_ON = "device"'
        if wanted == "on":
            raise DataError(f"CACHE_ON_DEVICE = on needs {needs}.")
        return False
    size = count * load_size**2
    room, of_what = memory_for_images(device)
    if wanted == "auto" and size > room:
        log(f"images: {size / 1e9:.2f} GB do not fit in {of_what}: reading the cache {cache} with workers instead")
        return False
    log(f"images: {count:,} cached images ({size / 1e9:.2f} GB) held in {device} memory; batches drawn by index")
    return True


class ChestXrayDataset(torch.utils.data.Dataset):
    """One image and its float32 targets [14]; `images` is anything indexable that returns uint8 [L, L] arrays.

    An item is an index, giving (uint8 [1, S, S], targets), or (index, seed) from SeededSampler, giving
    (image, targets, seed): the seed fixes the image's augmentation, so it depends on (SEED, epoch, image) alone
    and a resumed run sees the same pixels as an uninterrupted one, whatever the number of workers. Without a
    transform the image leaves as loaded (augmented later, batched on the device, from the seed);
    transform(pixels) makes an evaluation crop (films.eval_crop) and transform(pixels, seed) augments in the
    worker (transforms.WorkerAugment); both take and give uint8 numpy arrays.
    """

    def __init__(self, images, targets, transform=None):
        self.images = images
        self.targets = np.asarray(targets, dtype=np.float32)
        self.transform = transform
        if len(images) != len(self.targets):
            raise ValueError(f"{len(images)} images but {len(self.targets)} target rows")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        pixels, targets = self.images[index], torch.from_numpy(self.targets[index])
        if self.transform is not None:
            pixels = self.transform(pixels) if seed is None else self.transform(pixels, seed)
        image = torch.from_numpy(pixels).unsqueeze(-3)  # [1, S, S], or [crops, 1, S, S]
        return (image, targets) if seed is None else (image, targets, seed)


def evaluation_loader(images, image_size, batch_size, workers, device, five=False):
    """Batches of (evaluation crops, readable): the films' centre crops (films.eval_crop), or their five crops
    (films.five_views, test-time augmentation), in order, for inference.outputs_over."""
    view = partial(five_views if five else eval_crop, image_size=image_size)
    return DataLoader(
        ReadableFilms(images, view),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=leave_stop_signals_to_the_main_process,
    )


class ReadableFilms(torch.utils.data.Dataset):
    """Evaluation films with whether each could be read: (uint8 view, 1.0), or (zeros, 0.0) for a file that cannot
    be (a truncated PNG, say), so that one broken file does not stop a report of thousands; the caller names them."""

    def __init__(self, images, view):
        self.images, self.view = images, view

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        try:
            pixels, readable = self.view(self.images[index]), 1.0
        except DataError:
            pixels, readable = None, 0.0
        if pixels is None:
            size = getattr(self.images, "size", 32)
            pixels = np.zeros_like(self.view(np.zeros((size, size), np.uint8)))
        return torch.from_numpy(pixels).unsqueeze(-3), torch.tensor(readable)


class SeededSampler(torch.utils.data.Sampler):
    """Wraps a sampler with set_epoch (DistributedSampler) and yields (index, seed) items for ChestXrayDataset.

    The order depends on (seed, epoch) and each image's augmentation seed on (seed, epoch, index), so
    resuming at any step of any epoch replays exactly what an uninterrupted run would have seen. `skip`
    drops the first items of the epoch (the batches a resumed run has already trained on).
    """

    def __init__(self, sampler, seed):
        self.sampler, self.seed, self.epoch, self.skip = sampler, seed, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler) - self.skip

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield index, mix_seed(self.seed, self.epoch, index)


class DeviceBatches:
    """Batches of images held in device memory, drawn by index in the sampler's order: what a DataLoader over
    ChestXrayDataset (no transform) yields, i.e. (uint8 [B, 1, L, L], targets) for index samplers and
    (images, targets, seeds) for SeededSampler; the seeds stay on the host, where the augmentation parameters
    are drawn."""

    def __init__(self, images, targets, sampler, batch_size, drop_last=False):
        self.images, self.sampler = images, sampler
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32), device=images.device)
        self.batch_size, self.drop_last = batch_size, drop_last

    def __len__(self):
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self):
        items = list(self.sampler)
        seeded = bool(items) and isinstance(items[0], tuple)
        indices = torch.tensor([item[0] for item in items] if seeded else items, dtype=torch.long)
        seeds = torch.tensor([item[1] for item in items], dtype=torch.long) if seeded else None
        indices = indices.to(self.images.device)  # the epoch's order uploaded once, not a blocking copy every step
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = indices[start : start + self.batch_size]
            batch = (self.images[index].unsqueeze(1), self.targets[index])
            yield (*batch, seeds[start : start + self.batch_size]) if seeded else batch
