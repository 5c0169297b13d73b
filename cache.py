"""The one-time preprocessed image cache: decode and resize every image once, not every epoch.

    python cache.py --data_dir data/nih [--size 256] [--workers N]

Writes DATA_DIR/cache_SIZE/: images.npy (uint8, N x SIZE x SIZE, read memory-mapped: a worker's RAM stays
small and the OS page cache serves repeated epochs), index.csv (the image name of each row) and done.npy
(which rows are written). Interrupted, it resumes where it stopped. The pixels are exactly those of the PNG
path (the same dataset.load_image), so training on the cache equals training on the PNGs. Full NIH at 256 px:
112,120 x 256 x 256 bytes = 7.3 GB.

When the images of a run fit comfortably in the device's memory (CACHE_ON_DEVICE in train.py), DeviceBatches
holds them there and draws batches by index: no DataLoader, no workers, no host-to-device copy per step.
"""

import argparse
import os
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataset import attach_image_paths, find_label_file, load_image, read_labels
from devices import local_world_size, usable_cpus
from errors import DataError

CHUNK = 256  # images per task: large enough to amortise the task, small enough to resume with little lost
DEVICE_SHARE = 0.25  # the images may take this share of the device's free memory (a GPU) or of the RAM (a CPU),
# divided among the processes that share it; the rest stays for activations, the optimizer and the evaluation
UPLOAD_CHUNK = 4096  # images read from the cache and copied to the device at a time: bounds the host memory used


def cache_folder(data_dir, size):
    return Path(data_dir) / f"cache_{size}"


def find_cache(data_dir, load_size, setting="auto"):
    """The cache folder to read (CACHE: "auto" finds DATA_DIR/cache_<LOAD_SIZE> when built, "off", or a folder), or
    None to decode the PNGs."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting)
    folder = cache_folder(data_dir, load_size)
    return folder if (folder / "index.csv").is_file() else None


def _fill_rows(task):
    """In a worker process: decode, resize and write some rows of the memory-mapped array."""
    images_path, size, rows, paths = task
    images = np.load(images_path, mmap_mode="r+")
    for row, path in zip(rows, paths):
        images[row] = load_image(path, size)
    images.flush()
    return rows


def _open_array(folder, names, size):
    """The cache's array and progress, created or reopened; refuses another size or another image list."""
    images_path, index_path, done_path = folder / "images.npy", folder / "index.csv", folder / "done.npy"
    if index_path.is_file():
        if pd.read_csv(index_path)["image_name"].tolist() != list(names):
            raise DataError(f"{folder} was built for another list of images; delete it to rebuild.")
        images = np.load(images_path, mmap_mode="r+")
        if images.shape != (len(names), size, size):
            raise DataError(f"{images_path} holds {images.shape[1]}-px images, not {size}; delete it to rebuild.")
        return images_path, np.load(done_path)
    folder.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(len(names), size, size)).flush()
    np.save(done_path, np.zeros(len(names), dtype=bool))
    pd.DataFrame({"image_name": names}).to_csv(index_path, index=False)  # last: marks a usable folder
    return images_path, np.load(done_path)


def _save_progress(folder, done):
    temporary = folder / "done.tmp.npy"
    np.save(temporary, done)
    os.replace(temporary, folder / "done.npy")  # atomic: an interruption never corrupts the progress


def build_cache(data_dir, size=256, csv_path="", workers=None, drop_missing=False):
    """Write (or finish) the cache of every image in the label file; returns its folder."""
    labels = attach_image_paths(read_labels(find_label_file(data_dir, csv_path)), data_dir, drop_missing)
    folder = cache_folder(data_dir, size)
    images_path, done = _open_array(folder, labels["image_name"], size)
    todo = np.flatnonzero(~done)
    paths = labels["path"].to_numpy()
    tasks = [(images_path, size, rows, paths[rows]) for rows in np.array_split(todo, max(1, len(todo) // CHUNK))]
    workers = workers or usable_cpus()
    bar = tqdm(total=len(done), initial=int(done.sum()), desc=f"caching at {size} px", unit="img")
    with get_context("spawn").Pool(workers) as pool:  # spawn: the same behaviour on Linux, macOS and Windows
        for rows in pool.imap_unordered(_fill_rows, [task for task in tasks if len(task[2])]):
            done[rows] = True
            _save_progress(folder, done)
            bar.update(len(rows))
    bar.close()
    return folder


class CachedImages:
    """Images of a cache folder by row, memory-mapped lazily in each worker (the array is never pickled)."""

    def __init__(self, folder, image_names):
        folder = Path(folder)
        if not (folder / "index.csv").is_file():
            raise DataError(f"no image cache in {folder}; build it with: python cache.py --data_dir DATA_DIR")
        if not np.load(folder / "done.npy").all():
            raise DataError(f"the cache in {folder} is incomplete; finish it with the same python cache.py command.")
        row_of = pd.Series(np.arange(len(index := pd.read_csv(folder / "index.csv"))), index=index["image_name"])
        missing = pd.Index(image_names).difference(row_of.index)
        if len(missing):
            raise DataError(f"{len(missing)} image(s) are not in the cache {folder} (first: {missing[0]}); rebuild it.")
        self.path = folder / "images.npy"
        self.rows = row_of.loc[list(image_names)].to_numpy()
        self.size = np.load(self.path, mmap_mode="r").shape[1]
        self._images = None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return np.array(self._images[self.rows[index]])  # a private, writable copy of one image (S*S bytes)

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


def memory_for_images(device, processes=None):
    """(bytes one process's images may take on `device`, what that is a share of), or (0, why not) when it cannot be
    told. The share is divided among this machine's processes that use the same memory: all of them for the RAM
    (and an Apple GPU's unified memory), those placed on the same GPU for a GPU."""
    processes = local_world_size() if processes is None else processes
    if device.type == "cuda":
        sharing = -(-processes // max(torch.cuda.device_count(), 1))
        free, _ = torch.cuda.mem_get_info(device)
        room, of_what = DEVICE_SHARE * free, f"{DEVICE_SHARE:.0%} of the {free / 1e9:.1f} GB free on {device}"
    elif device.type == "mps":
        sharing, free = processes, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        room, of_what = DEVICE_SHARE * free, f"{DEVICE_SHARE:.0%} of the {free / 1e9:.1f} GB free for the Apple GPU"
    elif device.type == "cpu" and "SC_PHYS_PAGES" in getattr(os, "sysconf_names", {}):  # Linux, macOS
        sharing, total = processes, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        room, of_what = DEVICE_SHARE * total, f"{DEVICE_SHARE:.0%} of the {total / 1e9:.1f} GB of RAM"
    else:
        return 0, f"the free memory of {device} cannot be told here"
    if sharing > 1:
        return room / sharing, f"{of_what}, shared by {sharing} processes"
    return room, of_what


def images_on_device(cached_images, device, view=None):
    """The rows of a CachedImages as one uint8 tensor [N, L, L] on `device`, or their view(pixels) when given (the
    evaluation crops: deterministic, so made once, not every epoch). Read from the memmap and copied UPLOAD_CHUNK
    images at a time, so the host holds one chunk, not the whole set (eight ranks of NIH: 8 x 5.7 GB otherwise)."""
    array, rows = np.load(cached_images.path, mmap_mode="r"), cached_images.rows
    shape = array.shape[1:] if view is None else view(np.array(array[rows[0]])).shape
    images = torch.empty((len(rows), *shape), dtype=torch.uint8, device=device)
    for start in range(0, len(rows), UPLOAD_CHUNK):
        chunk = array[rows[start : start + UPLOAD_CHUNK]]  # fancy indexing copies this chunk into RAM
        if view is not None:
            chunk = np.stack([view(pixels) for pixels in chunk])
        images[start : start + len(chunk)].copy_(torch.from_numpy(chunk))
    return images


class DeviceBatches:
    """Batches of images held in device memory, drawn by index in the sampler's order: what a DataLoader over
    dataset.ChestXrayDataset (no transform) yields, i.e. (uint8 [B, 1, L, L], targets) for index samplers and
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="dataset folder (label CSV and images)")
    parser.add_argument("--size", type=int, default=256, help="side in pixels; train.py's LOAD_SIZE (default: 256)")
    parser.add_argument("--csv", default="", help="label file (default: the Data_Entry_2017*.csv in data_dir)")
    parser.add_argument("--workers", type=int, help="processes (default: one per CPU core)")
    parser.add_argument("--drop_missing_images", action="store_true", help="cache the images present")
    args = parser.parse_args(argv)
    try:
        folder = build_cache(args.data_dir, args.size, args.csv, args.workers, args.drop_missing_images)
    except DataError as error:
        sys.exit(f"error: {error}")
    print(f"cache ready: {folder} ({(folder / 'images.npy').stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
