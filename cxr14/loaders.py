"""A training run's batches: from the cached images held in device memory when they fit there (CACHE_ON_DEVICE: no
DataLoader, no workers, no copy per step), else from DataLoader workers that read the cache or decode the films.
Training images leave as loaded, with their augmentation seeds (augmented on the device, AUGMENT_ON = "device"),
or augmented in the workers; validation images leave as evaluation crops (films.eval_crop)."""

import signal
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cxr14.errors import DataError
from cxr14.films import eval_crop, five_views
from cxr14.pixels import CachedImages, all_cached, dataset_images, images_on_device, memory_for_images, sources_of
from cxr14.processes import worker_count
from cxr14.training_films import dataset_names, dataset_weights, image_groups
from dataset import FINDINGS
from transforms import WorkerAugment, mix_seed


def make_loaders(data, loader, labels, split, device, rank, world_size, log):
    """(training batches, validation batches) of a settings.DataSettings and LoaderSettings: from images held in
    device memory when they fit there (CACHE_ON_DEVICE), else from DataLoader workers that read the cache (each
    dataset's own) or decode the films."""
    rows = {part: labels[split == part] for part in ("train", "val")}
    if len(rows["train"]) < loader.batch_size * world_size or len(rows["val"]) == 0:
        raise DataError(f"{len(rows['train'])} training / {len(rows['val'])} validation images: too few for a batch.")
    images = {
        part: dataset_images(image_groups(rows[part], data), data.load_size, data.cache, strict=True) for part in rows
    }
    cached = all(all_cached(part) for part in images.values())
    targets = {part: rows[part][list(FINDINGS)].to_numpy() for part in rows}
    train_sampler = SeededSampler(epoch_order(data, rows["train"], world_size, rank), data.seed)
    val_sampler = DistributedSampler(range(len(rows["val"])), world_size, rank, shuffle=False)
    crop = partial(eval_crop, image_size=data.image_size)
    count = sum(len(part) for part in rows.values())
    if cache_on_device(loader, data.load_size, cached, count, device, log):
        on_device = {part: images_on_device(images[part], device, crop if part == "val" else None) for part in rows}
        return (
            DeviceBatches(on_device["train"], targets["train"], train_sampler, loader.batch_size, drop_last=True),
            DeviceBatches(on_device["val"], targets["val"], val_sampler, loader.batch_size),
        )
    log(f"images: {images_said(rows['train'], images['train'])}")
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


def epoch_order(data, rows, world_size, rank):
    """This process's order of the training films each epoch: a shuffle of them all (each dataset of a union in
    proportion to its size), or, with DATASET_WEIGHTS, each dataset's share of the epoch drawn (SharesSampler)."""
    weights = dataset_weights(data)
    if weights is None:
        return DistributedSampler(range(len(rows)), world_size, rank, seed=data.seed)
    datasets, names = rows["dataset"].to_numpy(), dataset_names(data)[0]
    groups = [np.flatnonzero(datasets == name) for name in names]
    empty = [name for name, group in zip(names, groups) if len(group) == 0]
    if empty:
        raise DataError(f"DATASET_WEIGHTS gives {empty[0]} a share, but it has no training film: leave it out")
    return SharesSampler(groups, weights, data.seed, world_size, rank)


class SharesSampler(torch.utils.data.Sampler):
    """An epoch of as many draws as there are training films, of which each dataset takes its weight's share: a
    dataset drawn more often than it has films is drawn whole, again and again (a fresh order each pass), one drawn
    less often is drawn without repeats. Yields (index, pass) for SeededSampler, in an order that depends on
    (seed, epoch) alone, split among processes as DistributedSampler splits (padded to an equal count)."""

    def __init__(self, groups, weights, seed, world_size=1, rank=0):
        self.groups = [np.asarray(group) for group in groups]  # none empty (epoch_order says which otherwise)
        total, shares = sum(len(group) for group in self.groups), np.asarray(weights, dtype=float)
        exact = total * shares / shares.sum()
        self.quotas = np.floor(exact).astype(int)
        largest = np.argsort(-(exact - self.quotas), kind="stable")[: total - self.quotas.sum()]
        self.quotas[largest] += 1  # largest remainders: the quotas add up to the films
        self.seed, self.world_size, self.rank, self.epoch = seed, world_size, rank, 0
        self.count = -(-total // world_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.count

    def __iter__(self):
        generator = np.random.default_rng([self.seed, self.epoch])
        indices, passes = [], []
        for group, quota in zip(self.groups, self.quotas):
            for number in range(-(-quota // len(group))):
                drawn = generator.permutation(group)[: quota - number * len(group)]
                indices.append(drawn)
                passes.append(np.full(len(drawn), number))
        indices, passes = np.concatenate(indices), np.concatenate(passes)
        order = generator.permutation(len(indices))
        order = np.concatenate([order, order[: self.count * self.world_size - len(order)]])[
            self.rank :: self.world_size
        ]
        return zip(indices[order].tolist(), passes[order].tolist())


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


def images_said(rows, images):
    """Where the run's images come from, in a line: each dataset's cache, or its files decoded."""
    names = list(dict.fromkeys(rows["dataset"]))
    said = []
    for name, source in zip(names, sources_of(images)):
        if isinstance(source, CachedImages):
            said.append(f"cache {source.path.parent}")
        elif name == "nih":
            said.append("decoding PNGs (python cache.py builds a faster cache)")
        else:
            said.append(f"decoding the films (python cache.py --dataset {name} builds a faster cache)")
    return "; ".join(f"{name}: {what}" for name, what in zip(names, said)) if len(names) > 1 else said[0]


def cache_on_device(loader, load_size, cached, count, device, log):
    """Whether to hold the run's cached images in device memory (CACHE_ON_DEVICE), saying why not when asked."""
    wanted = loader.cache_on_device
    if wanted == "off":
        return False
    if not cached or loader.augment_on != "device":
        needs = "the image cache of every dataset (python cache.py)" if not cached else 'AUGMENT_ON = "device"'
        if wanted == "on":
            raise DataError(f"CACHE_ON_DEVICE = on needs {needs}.")
        return False
    size = count * load_size**2
    room, of_what = memory_for_images(device)
    if wanted == "auto" and size > room:
        log(f"images: {size / 1e9:.2f} GB do not fit in {of_what}: reading the cache with workers instead")
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

    The order depends on (seed, epoch) and each image's augmentation seed on (seed, epoch, index, and the pass of
    a film that SharesSampler draws again), so
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
        for position, item in enumerate(self.sampler):
            if position >= self.skip:
                index, repeat = item if isinstance(item, tuple) else (item, 0)
                seed = mix_seed(self.seed, self.epoch, index)
                yield index, mix_seed(seed, repeat) if repeat else seed  # a film drawn again: other augmentation


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
