"""Fetching files, checking them and unpacking archives safely: what download.py does, apart from its command line.

A manifest (nih_files.csv) lists the files: name, url, md5, bytes (md5 and bytes may be empty where nothing is
published; a row without a url is a file to place by hand). Each file downloads to NAME.part, resumed with an HTTP
Range request after a dropped connection, a Ctrl-C or a reboot; a server that ignores Range restarts it from byte 0.
Connection errors, time-outs and 5xx answers are retried with a doubling wait, a bounded number of times; a 4xx answer
is an error naming the file and the URL. A finished file's size and MD5 are checked before it is used: on a mismatch
it is moved aside (NAME.bad) and fetched once more. An archive (.tar.gz) is read as a stream: its members are checked
(no absolute path, no '..', no link or device) and written into a temporary folder inside the output folder, moved
into place only when the whole archive has been read, or decoded straight into the image cache (pixels.open_cache,
the same films.load_image as cache.py: no PNG written). Stdlib HTTP only (urllib): nothing to install.
"""

import csv
import errno
import filecmp
import hashlib
import http.client
import io
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from cxr14.errors import DataError

CHUNK = 1 << 20  # bytes read and written at a time
RETRIES = 6  # consecutive failed attempts at one file (without a byte received) before giving up
RETRY_WAIT = 2.0  # seconds before the first retry, doubled after each
TIMEOUT = 60  # seconds without an answer or a byte before a connection counts as dropped
DECODE_BATCH = 64  # films sent to a decoding process at a time (--cache_only)
MANIFEST_COLUMNS = ("name", "url", "md5", "bytes")
BY_HAND_FROM = "https://nihcc.app.box.com/v/ChestXray-NIHCC"  # NIH's folder, for files without a stable link


class Entry(NamedTuple):
    """One row of a manifest."""

    name: str
    url: str  # empty: the file is placed by hand
    md5: str  # lowercase hex, or empty
    bytes: int | None

    @property
    def is_archive(self):
        return self.name.endswith((".tar.gz", ".tgz"))


class Retry(Exception):
    """A transfer that broke off in a way worth another attempt."""


def read_manifest(path):
    """[Entry] from a manifest CSV; a bad row is an error naming the file, the row and the column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        rows, header = list(reader), reader.fieldnames or []
    missing = [column for column in MANIFEST_COLUMNS if column not in header]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)}: it needs {','.join(MANIFEST_COLUMNS)}")
    if not rows:
        raise DataError(f"{path} lists no file: add a row per file under its header ({','.join(MANIFEST_COLUMNS)})")
    entries, names = [], set()
    for line, row in enumerate(rows, start=2):
        name, url, md5, size = (str(row[column] or "").strip() for column in MANIFEST_COLUMNS)
        where = f"{path}, row {line}"
        if not name or PurePosixPath(name).name != name or name in (".", ".."):
            raise DataError(f"{where}: name {name!r} must be a plain file name (no folder)")
        if name in names:
            raise DataError(f"{where}: {name} is listed twice")
        if md5 and (len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5.lower())):
            raise DataError(f"{where}: md5 {md5!r} is not 32 hexadecimal digits")
        if size and not size.isdigit():
            raise DataError(f"{where}: bytes {size!r} is not a whole number")
        if url and not url.startswith(("http://", "https://")):
            raise DataError(f"{where}: url {url!r} is not an http(s) address")
        names.add(name)
        entries.append(Entry(name, url, md5.lower(), int(size) if size else None))
    return entries


# ----------------------------------------------------------------------------- checking


def md5_of(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatch(entry, path, check_md5=True):
    """Why the file at path is not the manifest's (its size, then its MD5), or None when it is."""
    size = Path(path).stat().st_size
    if entry.bytes is not None and size != entry.bytes:
        return f"{size:,} bytes where the manifest says {entry.bytes:,}"
    if check_md5 and entry.md5:
        found = md5_of(path)
        if found != entry.md5:
            return f"MD5 {found} where the manifest says {entry.md5}"
    return None


# ----------------------------------------------------------------------------- downloading


def fetch(entry, folder, bar=None, retries=RETRIES, wait=None, log=print):
    """Download entry to folder/NAME, verified; returns its path. A file that fails its check is moved aside
    (NAME.bad) and fetched once more; failing again is an error naming it."""
    final = Path(folder) / entry.name
    wait = RETRY_WAIT if wait is None else wait
    for attempt in (1, 2):
        part = final.with_name(final.name + ".part")
        _transfer(entry, part, bar, retries, wait, log)
        wrong = mismatch(entry, part)
        if wrong is None:
            os.replace(part, final)
            return final
        aside = final.with_name(final.name + ".bad")
        os.replace(part, aside)
        if attempt == 2:
            raise DataError(
                f"{entry.name} failed its check twice ({wrong}); the last copy is {aside}. The server or the "
                f"manifest is wrong: download it by hand from {BY_HAND_FROM} into {folder}, or check the manifest."
            )
        log(f"{entry.name}: {wrong}; moved to {aside.name}, downloading it once more")
        if bar is not None:
            bar.update(-part_size_or_zero(aside))
    raise AssertionError("unreachable")


def part_size_or_zero(path):
    return path.stat().st_size if path.is_file() else 0


def _transfer(entry, part, bar, retries, wait, log):
    """Fill part with the whole file, resuming what it holds; retries after errors that may pass."""
    failures = 0
    while True:
        before = part_size_or_zero(part)
        try:
            if _receive(entry, part, bar, log):
                return
        except Retry as reason:
            received = part_size_or_zero(part) > before
            failures = 0 if received else failures + 1
            if failures >= retries:
                raise DataError(
                    f"{entry.name}: {reason}, {retries} times in a row ({entry.url}). The next run resumes "
                    f"from {part.stat().st_size if part.is_file() else 0:,} bytes; or download it by hand from "
                    f"{BY_HAND_FROM}."
                ) from None
            pause = wait * 2 ** max(failures - 1, 0)
            log(f"{entry.name}: {reason}; trying again in {pause:g} s")
            time.sleep(pause)


def _receive(entry, part, bar, log):
    """One request: True when part then holds the whole file, False to ask again at once (the server ignored Range);
    Retry for a failure that may pass; DataError for an answer that will not change (403, 404)."""
    have = part_size_or_zero(part)
    if entry.bytes is not None and have > entry.bytes:
        part.unlink()  # longer than the file: not a prefix of it
        have = 0
    headers = {"User-Agent": "cxr14-download", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(entry.url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have and (entry.bytes is None or have == entry.bytes):
            return True  # nothing left to send: part is whole
        if error.code >= 500 or error.code in (408, 429):
            raise Retry(f"the server answered {error.code} {error.reason}") from None
        raise DataError(
            f"{entry.name}: the server answered {error.code} {error.reason} for {entry.url}. Download it by hand "
            f"from {BY_HAND_FROM} into {part.parent} (as {entry.name}), or give a manifest with a working address "
            "(--manifest FILE)."
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise Retry(f"no answer ({getattr(error, 'reason', error)})") from None
    with response:
        if have and response.status == 200:
            log(f"{entry.name}: the server ignores Range requests, so it restarts from byte 0")
            if bar is not None:
                bar.update(-have)
            have = 0
        elif have and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()
            if bar is not None:
                bar.update(-have)
            raise Retry(f"the server resumed at another byte ({response.headers.get('Content-Range')})")
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else entry.bytes
        written = have
        with open(part, "ab" if have else "wb") as file:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    _write(file, block, part, written)
                    written += len(block)
                    if bar is not None:
                        bar.update(len(block))
            except (OSError, http.client.HTTPException) as error:
                raise Retry(f"the connection dropped at {written:,} bytes ({error})") from None
    if expected is not None and written < expected:
        raise Retry(f"the connection dropped at {written:,} of {expected:,} bytes")
    return True


def _write(file, block, part, written):
    """file.write(block); a failure to write (a full disk, a removed drive) is no dropped connection: it is said at
    once, not retried."""
    try:
        file.write(block)
    except OSError as error:
        raise DataError(
            f"cannot write {part} at {written:,} bytes: {error.strerror or error}. "
            + (f"Free space on the disk holding {part.parent}, then " if error.errno == errno.ENOSPC else "Then ")
            + "run the same command again: it resumes from the bytes already written."
        ) from None


# ----------------------------------------------------------------------------- archives


def safe_member(member, archive):
    """The member's relative path, or an error naming the archive and the member: absolute paths, '..', links and
    devices are refused (they could write outside the output folder)."""
    name = member.name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise DataError(f"{archive} holds {member.name!r}, a path outside its folder: refused, nothing extracted")
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or special file"
        raise DataError(f"{archive} holds {member.name!r}, {kind}: refused, nothing extracted")
    return PurePosixPath(*[part for part in parts if part != "."])


def extract(archive, out, ours=frozenset(), reserved=(), log=print):
    """Extract archive's files into out, through a temporary folder inside out that is moved into place only when
    the whole archive has been read and checked. A member inside a `reserved` folder of out (download.py's state), or
    one that would replace a file of out that is not among `ours` (the files extracted before) with other bytes, is
    refused and nothing is extracted. Returns [(relative path, bytes)] of the files."""
    out = Path(out)
    temporary = out / f".extracting-{Path(archive).name}"
    shutil.rmtree(temporary, ignore_errors=True)  # what an interrupted run left
    files = []
    try:
        with _open_stream(archive) as stream:
            for member in _members(stream, archive):
                relative = safe_member(member, archive)
                if member.isdir() or not relative.parts:
                    continue
                if relative.parts[0] in reserved or relative.parts[0].startswith(".extracting-"):
                    raise DataError(
                        f"{archive} holds {member.name!r}, inside download.py's own folder: refused, "
                        "nothing extracted. Download it again from NIH's page."
                    )
                target = temporary.joinpath(*relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with stream.extractfile(member) as source, open(target, "wb") as file:
                    with _damage_named(archive), _disk_named(out, archive):
                        shutil.copyfileobj(source, file, CHUNK)
                files.append((relative.as_posix(), member.size))
        _refuse_replacing(archive, out, temporary, files, ours)
        for relative, _ in files:
            destination = out / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary / relative, destination)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return files


def _refuse_replacing(archive, out, temporary, files, ours):
    """An error naming the first of the user's own files (one download.py did not extract) that the archive would
    replace with other bytes: a label file the user edited, a note, a file of another tool."""
    for relative, _ in files:
        existing = out / relative
        if relative in ours or not existing.exists():
            continue
        if existing.is_file() and filecmp.cmp(existing, temporary / relative, shallow=False):
            continue  # the same bytes (an extraction stopped before its record was written): nothing is lost
        raise DataError(
            f"{Path(archive).name} holds {relative}, which would replace {existing}, a file download.py did not "
            "extract: refused, nothing extracted. Move that file out of the folder (or choose another --out), then "
            "run the same command again."
        )


@contextmanager
def _disk_named(out, archive):
    """A full disk while extracting, as one line that says what to free and that the run resumes."""
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise DataError(
            f"the disk holding {out} is full while extracting {Path(archive).name}: free space there, then run the "
            "same command again (the archive stays and is extracted again; nothing half-written is kept)"
        ) from None


def _open_stream(archive):
    try:
        return tarfile.open(archive, "r|*")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise Unreadable(f"{Path(archive).name} is not a readable .tar.gz ({error})") from None


class Unreadable(DataError):
    """An archive whose bytes are damaged (a truncated or corrupt gzip or tar)."""


def _members(stream, archive):
    """The members of a streamed archive; a damaged one raises Unreadable, naming it."""
    with _damage_named(archive):
        yield from stream


@contextmanager
def _damage_named(archive):
    """Reading a damaged archive (gzip, zlib and tar errors, an early end) raises Unreadable, naming it."""
    try:
        yield
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as error:
        raise Unreadable(f"{Path(archive).name} is truncated or corrupt ({error or type(error).__name__})") from None


def films_of(archive):
    """(name, bytes) of each PNG in an archive, in its order, read from the stream (checked as extract checks)."""
    with _open_stream(archive) as stream:
        for member in _members(stream, archive):
            relative = safe_member(member, archive)
            if member.isfile() and relative.suffix.lower() == ".png":
                with stream.extractfile(member) as source, _damage_named(archive):
                    data = source.read()
                yield relative.name, data


def cache_archive(archive, folder, row_of, size, pool=None, workers=1, bar=None):
    """Decode every PNG of an archive into the cache at folder (pixels.open_cache's array, rows by image name in
    row_of) at size, in a pool of `workers` processes when one is given. Returns (rows written, names not in row_of).
    At most 2 x workers batches are in flight: the archive is read no faster than the films are decoded."""
    images_path = Path(folder) / "images.npy"
    rows, unknown, batch, pending = [], [], [], deque()

    def send():
        if pool is None:
            _decode_rows(images_path, size, batch)
        else:
            pending.append(pool.apply_async(_decode_rows, (images_path, size, list(batch))))
            while len(pending) > 2 * workers:
                pending.popleft().get()
        if bar is not None:
            bar.update(len(batch))
        batch.clear()

    for name, data in films_of(archive):
        row = row_of.get(name)
        if row is None:
            unknown.append(name)
            continue
        batch.append((int(row), name, data))
        rows.append(int(row))
        if len(batch) == DECODE_BATCH:
            send()
    if batch:
        send()
    while pending:
        pending.popleft().get()
    return rows, unknown


def _decode_rows(images_path, size, batch):
    """In a worker process: decode films (bytes) with films.load_image and write them into the cache's rows."""
    import numpy as np

    from cxr14.films import load_image

    images = np.load(images_path, mmap_mode="r+")
    for row, name, data in batch:
        images[row] = load_image(name, size, file=io.BytesIO(data))
    images.flush()


def free_bytes(folder):
    """Free space on the disk that holds folder (or its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free
