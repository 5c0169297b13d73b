"""NIH ChestX-ray14 from NIH's server to training, in one command: downloaded, verified, resumable, extracted.

    python download.py --out data/nih                                # the 12 archives, verified and extracted
    python download.py --out data/nih --cache_only --load_size 256   # decoded straight into the cache; no PNG kept
    python download.py --out data/nih --manifest FILE                # another list of files (a mirror, a test server)

The files are those of a manifest (nih_files.csv: name, url, md5, bytes). Each downloads to NAME.part and resumes
where it stopped after a dropped connection, a Ctrl-C or a reboot; its size and MD5 are checked before it is used
(a file that fails is moved aside and fetched once more). Archives are checked member by member (nothing outside
--out is ever written) and extracted in NIH's layout (images/00000001_000.png ...), or with --cache_only decoded
into DATA_DIR/cache_SIZE (what cache.py builds, the same pixels), no PNG written: train.py and evaluate.py then run
from the cache alone. Each archive is deleted once extracted or cached (--keep_archives keeps them). A second run
with everything in place downloads nothing (sizes checked; MD5s too with --verify). NIH publishes no stable link for
its four small files (the label file, the two split lists, the boxes): the run names them and where to get them.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cxr14.archives import (
    BY_HAND_FROM,
    Unreadable,
    cache_archive,
    extract,
    fetch,
    free_bytes,
    mismatch,
    part_size_or_zero,
    read_manifest,
)
from cxr14.configurator import AtLeast, Side, check_out_folder, flag_type
from cxr14.errors import DataError, one_line_errors
from cxr14.pixels import cache_folder, decoding_pool

MANIFEST = Path(__file__).resolve().parent / "cxr14" / "nih_files.csv"  # NIH's own addresses, MD5s and sizes
LABEL_ROWS = 112_120  # rows of NIH's full label file
STATE = ".download"  # inside --out: what each archive became (its files, or its cache rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the dataset folder (train.py's DATA_DIR)")
    parser.add_argument("--manifest", default=str(MANIFEST), help="the list of files (default: cxr14/nih_files.csv)")
    parser.add_argument(
        "--cache_only", action="store_true", help="decode the films into the cache at --load_size; keep no PNG"
    )
    parser.add_argument(
        "--load_size", type=flag_type(Side()), default=256, help="the cache's side (train.py's LOAD_SIZE; 256)"
    )
    parser.add_argument("--verify", action="store_true", help="check the MD5 of files already in place too")
    parser.add_argument("--keep_archives", action="store_true", help="keep each .tar.gz after extracting it")
    parser.add_argument(
        "--workers", type=flag_type(AtLeast(1)), help="processes decoding films with --cache_only (default: all CPUs)"
    )
    return parser.parse_args(argv)


def small_file(entry, out, args):
    """A file that is not an archive: in place (checked), downloaded, or named as one to place by hand."""
    path = out / entry.name
    if path.is_file():
        wrong = mismatch(entry, path, check_md5=args.verify)
        if wrong is None:
            return "in place"
        if not entry.url:
            raise DataError(f"{path}: {wrong}. Replace it with NIH's file from {BY_HAND_FROM}")
        print(f"{entry.name}: {wrong}; downloading it again")
        path.unlink()
    if not entry.url:
        return "by hand"
    with byte_bar(entry, out) as bar:
        fetch(entry, out, bar)
    return "downloaded"


def check_label_file(path):
    """The label file's header and rows: read as train.py reads it (an error names the row), counted."""
    from dataset import read_labels

    labels = read_labels(path)
    if len(labels) != LABEL_ROWS:
        print(f"note: {path.name} has {len(labels):,} rows; NIH's full label file has {LABEL_ROWS:,}")
    return labels


def byte_bar(entry, out, position=0):
    """A file's progress in bytes, from what its .part already holds (speed and ETA from tqdm)."""
    have = _part_bytes(out, entry)
    return tqdm(
        total=entry.bytes,
        initial=have,
        desc=entry.name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        position=position,
        leave=position == 0,
    )


class Bars:
    """Several progress bars moved together: the file's and the whole download's."""

    def __init__(self, *bars):
        self.bars = [bar for bar in bars if bar is not None]

    def update(self, count):
        for bar in self.bars:
            bar.update(count)


def archive_state(out, entry):
    path = out / STATE / f"{entry.name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def extracted_files(out):
    """The files download.py extracted into out before (each archive's state names its own): these it may replace."""
    states = (json.loads(path.read_text(encoding="utf-8")) for path in sorted((out / STATE).glob("*.json")))
    return frozenset(name for state in states if state.get("mode") == "extracted" for name, _ in state["files"])


def refuse_cache_over_extracted(out, archives, load_size):
    """--cache_only where download.py extracted the archives before: their PNGs are here, and downloading them all
    again to decode them is the long way round. cache.py decodes the PNGs into the same array (tested byte-equal)."""
    extracted = [entry.name for entry in archives if (archive_state(out, entry) or {}).get("mode") == "extracted"]
    if extracted:
        raise DataError(
            f"{out} holds the PNGs of {len(extracted)} extracted archive(s) (first: {extracted[0]}): --cache_only "
            f"would download them again. Build the cache from the PNGs instead: python cache.py --data_dir {out} "
            f"--size {load_size} (then delete the images folders if you want no PNG kept)"
        )


def write_state(out, entry, content):
    folder = out / STATE
    folder.mkdir(exist_ok=True)
    temporary = folder / f"{entry.name}.json.tmp"
    temporary.write_text(json.dumps(content) + "\n", encoding="utf-8")
    os.replace(temporary, folder / f"{entry.name}.json")  # atomic: a run stopped here redoes the archive or not


def archive_done(out, entry, state, cache):
    """Whether the archive's films are all in place: every extracted file with its size, or every cached row done."""
    if state is None or state.get("md5") != entry.md5 or state.get("bytes") != entry.bytes:
        return False
    if state["mode"] == "extracted":
        return cache is None and all(_has_size(out / name, size) for name, size in state["files"])
    return cache is not None and state["mode"] == f"cached_{cache.size}" and bool(cache.done[state["rows"]].all())


def _part_bytes(out, entry):
    return part_size_or_zero(out / f"{entry.name}.part")


def _has_size(path, size):
    return path.is_file() and path.stat().st_size == size


class Cache:
    """The cache download.py fills: pixels.open_cache's array and progress, rows by image name."""

    def __init__(self, out, label_file, size):
        from cxr14.pixels import open_cache

        names = check_label_file(label_file)["image_name"]
        self.folder, self.size = cache_folder(out, size), size
        _, self.done = open_cache(self.folder, names, size)
        self.row_of = dict(zip(names, range(len(names))))

    def mark(self, rows):
        from cxr14.pixels import save_cache_progress

        self.done[rows] = True
        save_cache_progress(self.folder, self.done)


def needed_bytes(archives, out, args, cache_rows):
    """Disk the rest of the job needs: the archives still to download, plus what they become (their PNGs, about
    their size; or the cache, created at start), less the parts already downloaded."""
    remaining = [entry.bytes or 0 for entry in archives]
    if not remaining:
        return 0
    partial = sum(_part_bytes(out, entry) for entry in archives)
    held = sum(remaining) if args.keep_archives else max(remaining)  # each archive is deleted once used
    result = 0 if args.cache_only else sum(remaining)
    if args.cache_only and not (cache_folder(out, args.load_size) / "index.csv").is_file():
        result += cache_rows * args.load_size**2
    return held + result - partial


def check_disk(archives, out, args, cache_rows):
    need, free = needed_bytes(archives, out, args, cache_rows), free_bytes(out)
    if need > free:
        mode = f"the cache at {args.load_size} px" if args.cache_only else "the extracted PNGs"
        raise DataError(
            f"{out} has {free / 1e9:.1f} GB free; the rest of the download needs {need / 1e9:.1f} GB (the archives, "
            f"deleted one by one{' unless --keep_archives' if not args.keep_archives else ''}, and {mode}). Free "
            "space, or choose another --out"
            + ("" if args.cache_only else ", or use --cache_only --load_size 256 (7.3 GB in the end)")
        )


def one_archive(entry, out, args, cache, pool, workers, total=None):
    """Download (or find) one archive, then extract it or decode it into the cache; delete it unless kept. A damaged
    archive is moved aside and fetched once more. `total`: the whole download's progress bar."""
    path = out / entry.name
    for attempt in (1, 2):
        if not (path.is_file() and mismatch(entry, path, check_md5=args.verify or attempt == 2) is None):
            with byte_bar(entry, out, position=1) as bar:
                fetch(entry, out, Bars(bar, total))
        try:
            if cache is None:
                files = extract(path, out, extracted_files(out), reserved=(STATE,))
                state = {"mode": "extracted", "files": files}
            else:
                with tqdm(desc=f"caching {entry.name}", unit="film") as bar:
                    rows, unknown = cache_archive(path, cache.folder, cache.row_of, cache.size, pool, workers, bar)
                if unknown:
                    print(
                        f"note: {len(unknown)} film(s) of {entry.name} are not in the label file (first: {unknown[0]})"
                    )
                cache.mark(rows)
                state = {"mode": f"cached_{cache.size}", "rows": rows}
            break
        except Unreadable as error:
            aside = path.with_name(path.name + ".bad")
            os.replace(path, aside)
            if attempt == 2:
                raise DataError(
                    f"{error}, twice; the last copy is {aside}. Download it by hand from {BY_HAND_FROM}"
                ) from None
            print(f"{error}: moved to {aside.name}, downloading it once more")
    write_state(out, entry, {"md5": entry.md5, "bytes": entry.bytes, **state})
    if not args.keep_archives:
        path.unlink()


def download(args):
    out = Path(args.out)
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = read_manifest(args.manifest)
    small, archives = [e for e in entries if not e.is_archive], [e for e in entries if e.is_archive]
    said = {entry.name: small_file(entry, out, args) for entry in small}
    by_hand = [name for name, what in said.items() if what == "by hand"]
    label_files = sorted(path.name for path in out.glob("Data_Entry_2017*.csv"))  # the manifest's, or one placed
    cache = None
    if args.cache_only:
        refuse_cache_over_extracted(out, archives, args.load_size)
        if not label_files:
            raise DataError(
                f"--cache_only needs the label file first, to know each film's row: place Data_Entry_2017_v2020.csv "
                f"from {BY_HAND_FROM} in {out}, then run this again"
            )
        if not (cache_folder(out, args.load_size) / "index.csv").is_file():  # the disk, before the cache's first byte
            check_disk(archives, out, args, len(check_label_file(out / label_files[0])))
        cache = Cache(out, out / label_files[0], args.load_size)
    elif label_files:
        check_label_file(out / label_files[0])
    todo = [entry for entry in archives if not archive_done(out, entry, archive_state(out, entry), cache)]
    for entry in archives:
        if entry not in todo and (out / entry.name).is_file() and not args.keep_archives:
            (out / entry.name).unlink()  # used already: a run stopped before deleting it
    check_disk(todo, out, args, len(cache.row_of) if cache else 0)
    started, workers = time.monotonic(), args.workers or max(1, (os.cpu_count() or 1))
    pool = decoding_pool(workers) if cache is not None and todo and workers > 1 else None
    remaining = sum((entry.bytes or 0) - _part_bytes(out, entry) for entry in todo if not (out / entry.name).is_file())
    total = tqdm(total=remaining, desc=f"{len(todo)} archive(s)", unit="B", unit_scale=True, unit_divisor=1024)
    try:
        for entry in todo:
            one_archive(entry, out, args, cache, pool, workers, total)
    finally:
        total.close()
        if pool is not None:
            pool.terminate()
    report(out, archives, todo, by_hand, cache, time.monotonic() - started)


def report(out, archives, todo, by_hand, cache, seconds):
    if todo:
        gigabytes = sum(entry.bytes or 0 for entry in todo) / 1e9
        print(f"{len(todo)} archive(s), {gigabytes:.1f} GB, in {seconds / 60:.1f} min")
    else:
        print(f"all {len(archives)} archives are in place in {out}: nothing to download")
    if cache is not None:
        missing = int((~cache.done).sum())
        if missing:
            print(f"warning: {missing:,} film(s) of the label file are in no archive: the cache is incomplete")
        else:
            print(f"cache complete: {cache.folder} ({len(cache.done):,} films at {cache.size} px); no PNG kept")
    for name in by_hand:
        print(f"place by hand: {name}, from {BY_HAND_FROM} (NIH publishes no stable link for it), into {out}")
    if not by_hand:  # a command that runs as printed: the cache is found by the LOAD_SIZE it was built at
        print(f"ready: python train.py --data_dir {out}" + (f" --load_size {cache.size}" if cache else ""))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with one_line_errors(interrupted="the .part files stay, and the same command resumes where this one stopped"):
        download(args)


if __name__ == "__main__":
    main()
