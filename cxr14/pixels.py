"""Where a run's pixels come from: image files found below a dataset folder, decoded on every access (FilmImages),
the memory-mapped cache that cache.py builds (CachedImages), or the cached images held in device memory
(images_on_device), with how much of that memory they may take. Each gives uint8 [L, L] images, letterboxed to the
run's LOAD_SIZE by films.load_image, the same pixels whichever the source. A union of datasets reads each dataset's
own cache, in its own folder and keyed by its own names (dataset_images: MixedImages).

torch is imported where a function needs it: dataset.py imports this file, and train.py's --help answers from
dataset.py's names before torch is loaded.
"""

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import DataError
from cxr14.films import IMAGE_SUFFIXES, load_image

DEVICE_SHARE = 0.25  # the images may take this share of the device's free memory (a GPU) or of the RAM (a CPU),
# divided among the processes that share it; the rest stays for activations, the optimizer and the evaluation
UPLOAD_CHUNK = 4096  # images read from the cache and copied to the device at a time: bounds the host memory used


def index_images(data_dir):
    """Map image name -> path for every image below data_dir, flat or in NIH's images_0NN/images/ folders. Folders
    linked in (images on another disk) are followed; a folder reached twice through links is read once. A name found
    twice maps to the first in path order (a folder's own files before its subfolders', names sorted), with a
    warning."""
    data_dir = Path(data_dir)
    found = {}
    duplicates = 0
    seen = set()
    for folder, subfolders, files in os.walk(data_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to one folder
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()  # a name found twice means the same file on every machine: the first in path order
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES):
                duplicates += name in found
                found.setdefault(name, Path(folder) / name)
    if duplicates:
        warnings.warn(
            f"{duplicates} image name(s) occur twice below {data_dir}; the first in path order is used.", stacklevel=2
        )
    return found


class FilmImages:
    """Films (PNG, JPEG or DICOM) decoded from their files on every access, resized to `size` (same resize as the
    cache)."""

    def __init__(self, paths, size):
        self.paths = [str(path) for path in paths]
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.paths[index], self.size)


def cache_folder(data_dir, size, dataset="nih"):
    """A dataset's cache at this size: cache_<size> for NIH, cache_<dataset>_<size> for the others, so that two
    datasets in one folder (NIH and an own CSV of its films) never share one."""
    return Path(data_dir) / (f"cache_{size}" if dataset == "nih" else f"cache_{dataset}_{size}")


def find_cache(data_dir, load_size, setting="auto", dataset="nih"):
    """The cache folder to read (CACHE: "auto" finds the dataset's cache_folder when built, "off", or a folder), or
    None to decode the films."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting)
    folder = cache_folder(data_dir, load_size, dataset)
    older = cache_folder(data_dir, load_size)
    if dataset != "nih" and not folder.is_dir() and (older / "index.csv").is_file():
        warnings.warn(
            f"{older} is NIH's cache, or one an older cache.py built for {dataset}: {dataset}'s films are read from "
            f"their files. Build {dataset}'s own: python cache.py --dataset {dataset} --data_dir {data_dir} --size "
            f"{load_size}",
            stacklevel=2,
        )
    return folder if (folder / "index.csv").is_file() else None


def open_cache(folder, names, size):
    """(the path of the cache's array, which rows are written): created, or reopened; another size or another list of
    images is refused. cache.py and download.py --cache_only fill it; CachedImages reads it."""
    images_path, index_path, done_path = folder / "images.npy", folder / "index.csv", folder / "done.npy"
    if index_path.is_file():
        if pd.read_csv(index_path)["image_name"].tolist() != list(names):
            raise DataError(
                f"{folder} was built for another list of images: delete that folder to rebuild it for this one, or "
                "train from the films without it (--cache off)"
            )
        images = np.load(images_path, mmap_mode="r+")
        if images.shape != (len(names), size, size):
            raise DataError(f"{images_path} holds {images.shape[1]}-px images, not {size}; delete it to rebuild.")
        return images_path, np.load(done_path)
    folder.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(len(names), size, size)).flush()
    save_cache_progress(folder, np.zeros(len(names), dtype=bool))  # atomic: a reader never sees half a file
    pd.DataFrame({"image_name": names}).to_csv(index_path, index=False)  # last: marks a usable folder
    return images_path, np.load(done_path)


def ignore_interrupts():
    """A decoding process's initializer (cache.py, download.py --cache_only): Ctrl-C reaches every process of the
    group, and the main process alone answers it (one line, not a traceback from each worker)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decoding_pool(workers):
    """A spawn Pool (the same on Linux, macOS and Windows) whose processes leave Ctrl-C to this one. They start with
    SIGINT ignored: a new interpreter keeps an ignored SIGINT ignored, so one still importing its modules when Ctrl-C
    comes prints no traceback; the initializer keeps it so."""
    import signal
    from multiprocessing import get_context

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return get_context("spawn").Pool(workers, ignore_interrupts)
    finally:
        signal.signal(signal.SIGINT, previous)


def save_cache_progress(folder, done):
    temporary = folder / "done.tmp.npy"
    np.save(temporary, done)
    os.replace(temporary, folder / "done.npy")  # atomic: an interruption never corrupts the progress


def cached_names(folder):
    """The image names a complete cache folder holds (empty for none, or one still being built): their films need
    no file on disk (download.py --cache_only keeps none)."""
    if folder is None or not (Path(folder) / "index.csv").is_file() or not np.load(Path(folder) / "done.npy").all():
        return set()
    return set(pd.read_csv(Path(folder) / "index.csv", dtype={"image_name": str})["image_name"])


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
            raise DataError(
                f"{len(missing)} image(s) are not in the cache {folder} (first: {missing[0]}): it was built for other "
                "films. Rebuild it with the cache.py command that names this dataset, or read the films (--cache off)"
            )
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


class MixedImages:
    """The images of several sources (a union's datasets) as one, in the run's order: item i is
    sources[which[i]][position[i]]."""

    def __init__(self, sources, which, position):
        self.sources, self.which, self.position = sources, np.asarray(which), np.asarray(position)
        sizes = {getattr(source, "size", None) for source in sources}
        self.size = sizes.pop() if len(sizes) == 1 else None

    def __len__(self):
        return len(self.which)

    def __getitem__(self, index):
        return self.sources[self.which[index]][self.position[index]]


def dataset_images(groups, load_size, setting="auto", strict=False):
    """The images of films from one or more datasets, in order. `groups`: per dataset (its name, its folder, the
    films' names in its cache, their paths, their positions in the whole). Each dataset's images come from its own
    cache (CACHE: its cache_folder when built, "off", or a folder) when it holds them all at this size, else from the
    files; `strict` (training): a cache found but incomplete, without some films, or of another size is an error,
    not a slower run in silence."""
    sources, total = [], sum(len(positions) for *_, positions in groups)
    which, position = np.zeros(total, dtype=np.int64), np.zeros(total, dtype=np.int64)
    for k, (dataset, folder, names, paths, positions) in enumerate(groups):
        sources.append(_one_dataset(find_cache(folder, load_size, setting, dataset), names, paths, load_size, strict))
        which[positions], position[positions] = k, np.arange(len(positions))
    return sources[0] if len(sources) == 1 else MixedImages(sources, which, position)


def _one_dataset(cache, names, paths, load_size, strict):
    if cache is None:
        return FilmImages(paths, load_size)
    try:
        images = CachedImages(cache, names)
    except DataError:
        if strict:
            raise
        return FilmImages(paths, load_size)  # incomplete, or without some of these images: the files then
    if images.size != load_size:
        if strict:
            raise DataError(f"the cache {cache} holds {images.size}-px images; LOAD_SIZE is {load_size}")
        return FilmImages(paths, load_size)
    return images


def sources_of(images):
    """The sources of dataset_images' images, one per dataset: CachedImages or FilmImages."""
    return images.sources if isinstance(images, MixedImages) else [images]


def all_cached(images):
    """Whether every image comes from a cache (what holding them in device memory needs)."""
    return all(isinstance(source, CachedImages) for source in sources_of(images))


def evaluation_images(rows, data_dir, load_size, setting="auto"):
    """The rows' images from the dataset's cache when one holds them all at this size (no PNG decoding), else the
    image files (rows: image_name and path columns)."""
    cache = find_cache(data_dir, load_size, setting)
    return _one_dataset(cache, rows["image_name"], rows["path"], load_size, strict=False)


def memory_for_images(device, processes=None):
    """(bytes one process's images may take on `device`, what that is a share of), or (0, why not) when it cannot be
    told. The share is divided among this machine's processes that use the same memory: all of them for the RAM
    (and an Apple GPU's unified memory), those placed on the same GPU for a GPU."""
    import torch

    from cxr14.processes import local_world_size

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


def images_on_device(images, device, view=None):
    """The images of a CachedImages (or a MixedImages of them) as one uint8 tensor [N, L, L] on `device`, or their
    view(pixels) when given (the evaluation crops: deterministic, so made once, not every epoch). Read from the
    memmaps and copied UPLOAD_CHUNK images at a time, so the host holds one chunk, not the whole set (eight ranks of
    NIH: 8 x 5.7 GB otherwise)."""
    import torch

    if isinstance(images, MixedImages):
        places = [np.flatnonzero(images.which == k) for k in range(len(images.sources))]
        parts = [(source, where, images.position[where]) for source, where in zip(images.sources, places)]
    else:
        parts = [(images, np.arange(len(images)), np.arange(len(images)))]
    parts = [(source.path, source.rows[items], where) for source, where, items in parts if len(where)]
    first = np.array(np.load(parts[0][0], mmap_mode="r")[parts[0][1][0]])
    shape = first.shape if view is None else view(first).shape
    result = torch.empty((len(images), *shape), dtype=torch.uint8, device=device)
    for path, rows, where in parts:  # each source's images: its memmap's rows, and where they go in the result
        array = np.load(path, mmap_mode="r")
        for start in range(0, len(rows), UPLOAD_CHUNK):
            chunk = array[rows[start : start + UPLOAD_CHUNK]]  # fancy indexing copies this chunk into RAM
            if view is not None:
                chunk = np.stack([view(pixels) for pixels in chunk])
            places = torch.as_tensor(where[start : start + len(chunk)], device=device)
            result[places] = torch.from_numpy(chunk).to(device)
    return result
