"""The one-time preprocessed image cache: decode and resize every image once, not every epoch.

    python cache.py --data_dir data/nih [--size 256] [--workers N]
    python cache.py --dataset chexpert --data_dir data/CheXpert-v1.0-small     # any dataset train.py reads

Writes DATA_DIR/cache_SIZE/ (another dataset's: cache_DATASET_SIZE/): images.npy (uint8, N x SIZE x SIZE, read
memory-mapped: a worker's RAM stays small and the OS page cache serves repeated epochs), index.csv (the image name
of each row) and done.npy (which rows are written). Interrupted, it resumes where it stopped. The pixels are exactly
those of the file path (the same films.load_image, for PNG, JPEG and DICOM), so training on the cache equals
training on the files. Full NIH at 256 px: 112,120 x 256 x 256 bytes = 7.3 GB. Each dataset's cache lies in its own
folder, keyed by its own names (NIH's image names, the others' paths below their folder: CheXpert's
train/patient00001/study1/view1_frontal.jpg), and holds the frontal films train.py reads of it; a union reads each
dataset's.

When the images of a run fit comfortably in the device's memory (CACHE_ON_DEVICE in train.py), DeviceBatches
holds them there and draws batches by index: no DataLoader, no workers, no host-to-device copy per step.
"""

import argparse

import numpy as np
from tqdm import tqdm

from cxr14.configurator import Side, flag_type
from cxr14.errors import one_line_errors
from cxr14.films import load_image
from cxr14.pixels import cache_folder, decoding_pool, open_cache, save_cache_progress
from cxr14.processes import usable_cpus
from cxr14.training_films import TRAINING_DATASETS, cache_films

CHUNK = 256  # images per task: large enough to amortise the task, small enough to resume with little lost


def _fill_rows(task):
    """In a worker process: decode, resize and write some rows of the memory-mapped array."""
    images_path, size, rows, paths = task
    images = np.load(images_path, mmap_mode="r+")
    for row, path in zip(rows, paths):
        images[row] = load_image(path, size)
    images.flush()
    return rows


def build_cache(data_dir, size=256, csv_path="", workers=None, drop_missing=False, dataset="nih"):
    """Write (or finish) the cache of every film of the dataset a run may read; returns its folder."""
    labels = cache_films(dataset, data_dir, csv_path, drop_missing)
    folder = cache_folder(data_dir, size, dataset)
    images_path, done = open_cache(folder, labels["image_name"], size)
    todo = np.flatnonzero(~done)
    paths = labels["path"].to_numpy()
    tasks = [(images_path, size, rows, paths[rows]) for rows in np.array_split(todo, max(1, len(todo) // CHUNK))]
    workers = workers or usable_cpus()
    bar = tqdm(total=len(done), initial=int(done.sum()), desc=f"caching at {size} px", unit="img")
    with decoding_pool(workers) as pool:
        for rows in pool.imap_unordered(_fill_rows, [task for task in tasks if len(task[2])]):
            done[rows] = True
            save_cache_progress(folder, done)
            bar.update(len(rows))
    bar.close()
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset", default="nih", choices=TRAINING_DATASETS, help="the dataset in data_dir (default: nih)"
    )
    parser.add_argument("--data_dir", required=True, help="dataset folder (label CSV and images)")
    parser.add_argument(
        "--size", type=flag_type(Side()), default=256, help="side in pixels; train.py's LOAD_SIZE (default: 256)"
    )
    parser.add_argument("--csv", default="", help="label file (default: the dataset's, as train.py finds it)")
    parser.add_argument("--workers", type=int, help="processes (default: one per CPU core)")
    parser.add_argument("--drop_missing_images", action="store_true", help="cache the images present")
    args = parser.parse_args(argv)
    kept = "the rows written so far are kept, and the same command resumes where this one stopped"
    with one_line_errors(interrupted=kept):
        folder = build_cache(args.data_dir, args.size, args.csv, args.workers, args.drop_missing_images, args.dataset)
    print(f"cache ready: {folder} ({(folder / 'images.npy').stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
