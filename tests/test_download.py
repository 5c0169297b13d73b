"""download.py against a local HTTP server (127.0.0.1, in a thread of the test) that serves archives made from demo
films in NIH's layout, with faults injected: dropped connections, 503s, a server that ignores Range, corrupted bytes,
404s, an archive that climbs out of its folder, a truncated gzip."""

import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import download
from cxr14 import archives
from demo_data import write_demo
from helpers import ROOT, SAMPLE_CSV, tiny_settings

SMALL_FILES = ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt", "BBox_List_2017.csv")


class Handler(BaseHTTPRequestHandler):
    """Serves server.root's files with Range support; server.faults[name] is a list of faults, one taken per request
    ("404", "503", "corrupt", "drop:N": send N bytes, then close); names in server.ignore_range get 200 always."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server, name = self.server, self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        queue = server.faults.get(name, [])
        fault = queue.pop(0) if queue else None
        if fault in ("404", "503") or not (server.root / name).is_file():
            self.send_error(int(fault or 404))
            return
        data = (server.root / name).read_bytes()
        if fault == "corrupt":
            data = bytes(b ^ 0x5A if i % 997 == 0 else b for i, b in enumerate(data))
        start, asked = 0, self.headers.get("Range")
        if asked and name not in server.ignore_range:
            start = int(asked.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault and fault.startswith("drop:"):
            self.wfile.write(body[: int(fault[5:])])
            self.wfile.flush()
            self.close_connection = True
            return
        for offset in range(0, len(body), 16384):
            self.wfile.write(body[offset : offset + 16384])
            time.sleep(server.delay)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.root, httpd.faults, httpd.ignore_range, httpd.requests, httpd.delay = None, {}, set(), [], 0.0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Demo films in NIH's layout, and the archives NIH would serve of them (images_00K.tar.gz holding images/*)."""
    films = tmp_path_factory.mktemp("films")
    write_demo(films, patients=30, size=64, seed=3)
    served = tmp_path_factory.mktemp("served")
    paths = sorted(films.rglob("*.png"))
    for k, part in enumerate(np.array_split(np.arange(len(paths)), 3), start=1):  # three archives, as NIH's twelve
        with tarfile.open(served / f"images_{k:03d}.tar.gz", "w:gz") as archive:
            for index in part:
                archive.add(paths[index], arcname=f"images/{paths[index].name}")
    for name in SMALL_FILES:
        (served / name).write_bytes((films / name).read_bytes())
    return films, served


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(archives, "RETRY_WAIT", 0.01)


def manifest(served, url, path, names=None, checks=True):
    lines = ["name,url,md5,bytes"]
    for name in names or sorted(os.listdir(served)):
        data = (served / name).read_bytes()
        md5, size = (hashlib.md5(data).hexdigest(), len(data)) if checks else ("", "")
        lines.append(f"{name},{url}/{name},{md5},{size}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def films_below(folder):
    return {path.name: path.read_bytes() for path in Path(folder).rglob("*.png")}


def test_faults_are_survived_and_the_films_are_byte_identical_and_a_rerun_is_idle(server, source, tmp_path, capsys):
    films, served = source
    server.root = served
    server.faults = {
        "images_001.tar.gz": ["drop:5000"],  # dropped mid-file: resumed with Range
        "images_002.tar.gz": ["503", "503"],  # then OK
        "images_003.tar.gz": ["drop:3000"],  # and this server ignores Range: restarted from byte 0
        "Data_Entry_2017_v2020.csv": ["corrupt"],  # caught by the MD5, fetched again
    }
    server.ignore_range = {"images_003.tar.gz"}
    listed = manifest(served, server.url, tmp_path / "files.csv")
    out = tmp_path / "nih"
    download.main(["--out", str(out), "--manifest", str(listed)])
    printed = capsys.readouterr().out
    assert films_below(out) == films_below(films)
    assert not list(out.glob("*.tar.gz")) and not list(out.glob("*.part"))  # archives deleted once extracted
    for name in SMALL_FILES:
        assert (out / name).read_bytes() == (served / name).read_bytes()
    assert ("images_001.tar.gz", "bytes=5000-") in server.requests
    assert ("images_003.tar.gz", "bytes=3000-") in server.requests and "ignores Range" in printed
    assert [name for name, _ in server.requests].count("images_002.tar.gz") == 3
    assert (out / "Data_Entry_2017_v2020.csv.bad").is_file() and "MD5" in printed
    assert [path.name for path in out.glob("*.bad")] == ["Data_Entry_2017_v2020.csv.bad"]  # the rest right at once

    asked = len(server.requests)
    download.main(["--out", str(out), "--manifest", str(listed)])
    assert len(server.requests) == asked and "nothing to download" in capsys.readouterr().out
    listing = out / "test_list.txt"
    listing.write_bytes(listing.read_bytes()[::-1])  # damaged in place, its size unchanged: only --verify sees it
    download.main(["--out", str(out), "--manifest", str(listed)])
    assert len(server.requests) == asked
    download.main(["--out", str(out), "--manifest", str(listed), "--verify"])
    assert (
        server.requests[asked:] == [("test_list.txt", None)]
        and listing.read_bytes() == (served / "test_list.txt").read_bytes()
    )
    asked = len(server.requests)
    (out / "images" / sorted(films_below(films))[0]).unlink()  # a film lost: that archive is fetched again
    download.main(["--out", str(out), "--manifest", str(listed)])
    assert films_below(out) == films_below(films)
    assert [name for name, _ in server.requests[asked:]] == ["images_001.tar.gz"]
    asked = len(server.requests)  # the PNGs are here: --cache_only points to cache.py, and downloads nothing again
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(out), "--manifest", str(listed), "--cache_only", "--load_size", "40"])
    assert f"python cache.py --data_dir {out} --size 40" in str(stopped.value.code)
    assert len(server.requests) == asked and not (out / "cache_40").exists()


def test_a_404_names_the_file_and_the_url(server, source, tmp_path):
    server.root = source[1]
    server.faults = {"images_002.tar.gz": ["404"]}
    listed = manifest(source[1], server.url, tmp_path / "files.csv")
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(tmp_path / "nih"), "--manifest", str(listed)])
    message = str(stopped.value.code)
    assert "images_002.tar.gz" in message and "404" in message and f"{server.url}/images_002.tar.gz" in message


def test_an_archive_with_a_member_outside_its_folder_or_a_link_is_refused_and_nothing_is_written(server, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name, member in (
        ("climbs.tar.gz", "../escaped.png"),
        ("absolute.tar.gz", "/tmp/escaped.png"),
        ("linked.tar.gz", None),
    ):
        with tarfile.open(served / name, "w:gz") as archive:
            good = tarfile.TarInfo("images/00000001_000.png")
            good.size = 4
            archive.addfile(good, io.BytesIO(b"\x89PNG"))
            bad = tarfile.TarInfo(member or "images/link.png")
            if member:
                bad.size = 4
                archive.addfile(bad, io.BytesIO(b"evil"))
            else:
                bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(bad)
    server.root = served
    cases = (("climbs.tar.gz", "../escaped.png"), ("absolute.tar.gz", "/tmp/escaped.png"), ("linked.tar.gz", "a link"))
    for name, what in cases:
        out = tmp_path / name / "nih"
        listed = manifest(served, server.url, tmp_path / f"{name}.csv", names=[name])
        with pytest.raises(SystemExit) as stopped:
            download.main(["--out", str(out), "--manifest", str(listed)])
        assert name in str(stopped.value.code) and what in str(stopped.value.code)
        assert not (out.parent / "escaped.png").exists() and not list(out.rglob("*.png"))


def test_a_truncated_gzip_is_fetched_once_more_then_refused_and_never_extracted(server, source, tmp_path, capsys):
    served = tmp_path / "served"
    served.mkdir()
    whole = (source[1] / "images_001.tar.gz").read_bytes()
    (served / "images_001.tar.gz").write_bytes(whole[: len(whole) // 2])  # no MD5 published: found by gzip alone
    server.root = served
    listed = manifest(served, server.url, tmp_path / "files.csv", checks=False)
    out = tmp_path / "nih"
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(out), "--manifest", str(listed)])
    assert "images_001.tar.gz is truncated or corrupt" in str(stopped.value.code)
    assert "downloading it once more" in capsys.readouterr().out
    assert not list(out.rglob("*.png")) and (out / "images_001.tar.gz.bad").is_file()


def test_ctrl_c_mid_download_leaves_a_part_that_the_next_run_resumes(server, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "big.bin").write_bytes(np.random.default_rng(0).bytes(3_000_000))
    server.root, server.delay = served, 0.02  # about 0.8 MB/s: time to interrupt
    listed = manifest(served, server.url, tmp_path / "files.csv")
    out = tmp_path / "nih"
    command = [sys.executable, str(ROOT / "download.py"), "--out", str(out), "--manifest", str(listed)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = out / "big.bin.part"
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size > 50_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in errors and "resumes" in errors
    have = part.stat().st_size
    assert 0 < have < (served / "big.bin").stat().st_size
    server.delay = 0.0
    download.main(["--out", str(out), "--manifest", str(listed)])
    assert ("big.bin", f"bytes={have}-") in server.requests
    assert (out / "big.bin").read_bytes() == (served / "big.bin").read_bytes()


def test_cache_only_keeps_no_png_equals_cache_py_and_trains_and_evaluates(server, source, tmp_path, capsys):
    import cache
    import evaluate
    import train

    films, served = source
    server.root = served
    listed = manifest(served, server.url, tmp_path / "files.csv")
    out = tmp_path / "nih"
    download.main(["--out", str(out), "--manifest", str(listed), "--cache_only", "--load_size", "40", "--workers", "2"])
    assert not list(out.rglob("*.png")) and not list(out.glob("*.tar.gz"))
    ready = capsys.readouterr().out.splitlines()[-1]  # a command that runs as printed: the cache's size with it
    assert ready == f"ready: python train.py --data_dir {out} --load_size 40", ready
    built = cache.build_cache(films, size=40, workers=1)  # from the PNGs, as cache.py does
    np.testing.assert_array_equal(np.load(out / "cache_40" / "images.npy"), np.load(built / "images.npy"))
    assert (out / "cache_40" / "index.csv").read_text(encoding="utf-8") == (built / "index.csv").read_text(
        encoding="utf-8"
    )

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_settings(out, run, epochs=1, batch_size=8))
    assert stopped.value.code == 0 and (run / "best.pth").is_file()
    report = evaluate.evaluate(evaluate.parse_args(["--checkpoint", str(run / "best.pth"), "--bootstrap", "10"]))
    assert report["images"] > 0 and "localisation" not in report  # boxes need the full films


def test_too_little_disk_stops_before_anything_is_downloaded(server, source, tmp_path, monkeypatch):
    server.root = source[1]
    listed = manifest(source[1], server.url, tmp_path / "files.csv")
    monkeypatch.setattr(download, "free_bytes", lambda folder: 1000)
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(tmp_path / "nih"), "--manifest", str(listed)])
    assert "GB free" in str(stopped.value.code) and "needs" in str(stopped.value.code)
    assert not [name for name, _ in server.requests if name.endswith(".tar.gz")]


def test_nih_manifest_holds_nih_figures_and_a_bad_row_is_named(tmp_path):
    entries = archives.read_manifest(download.MANIFEST)
    packed = [entry for entry in entries if entry.is_archive]
    assert [entry.name for entry in packed] == [f"images_{k:03d}.tar.gz" for k in range(1, 13)]
    assert sum(entry.bytes for entry in packed) == 45_079_862_784
    assert packed[0].url.endswith("vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz")
    assert packed[0].md5 == "fe8ed0a6961412fddcbb3603c11b3698"
    bad = tmp_path / "bad.csv"
    bad.write_text("name,url,md5,bytes\na.tar.gz,https://x/a,not-an-md5,3\n", encoding="utf-8")
    with pytest.raises(archives.DataError, match=r"bad.csv, row 2: md5 'not-an-md5'"):
        archives.read_manifest(bad)


def test_a_file_of_another_size_than_the_manifest_says_is_fetched_twice_then_refused(server, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "train_val_list.txt").write_text("00000001_000.png\n" * 100, encoding="utf-8")
    server.root = served
    listed = tmp_path / "files.csv"  # no MD5 published: the size alone tells
    listed.write_text(
        f"name,url,md5,bytes\ntrain_val_list.txt,{server.url}/train_val_list.txt,,3400\n", encoding="utf-8"
    )
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(tmp_path / "nih"), "--manifest", str(listed)])
    message = str(stopped.value.code)
    assert (
        "train_val_list.txt failed its check twice" in message
        and "1,700 bytes where the manifest says 3,400" in message
    )
    assert [name for name, _ in server.requests] == ["train_val_list.txt"] * 2


@pytest.mark.parametrize("where", ["is", "below"])
def test_an_out_that_cannot_be_a_folder_is_one_line_before_any_request(server, source, tmp_path, where):
    server.root = source[1]
    listed = manifest(source[1], server.url, tmp_path / "files.csv")
    taken = tmp_path / "taken"
    taken.write_text("the user's file", encoding="utf-8")
    out = taken if where == "is" else taken / "nih"
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(out), "--manifest", str(listed)])
    message = str(stopped.value.code)
    assert message.startswith(f"error: --out {out}") and "is a file" in message, message
    assert not server.requests and taken.read_text(encoding="utf-8") == "the user's file"


class FullDisk:
    """A file whose writes fail as on a full disk once `room` bytes are written."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, block):
        if self.room < len(block):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(block)
        return self.file.write(block)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.file.close()


def test_a_full_disk_while_downloading_is_said_at_once_not_retried_as_a_dropped_connection(
    server, source, tmp_path, monkeypatch
):
    server.root = source[1]
    listed = manifest(source[1], server.url, tmp_path / "files.csv", names=["images_001.tar.gz"])

    def opened(path, mode="r", **options):  # the downloads' files fill the disk; the manifest reads as ever
        file = open(path, mode, **options)
        return FullDisk(file, room=0) if "b" in mode and "w" in mode or "a" in mode else file

    monkeypatch.setattr(archives, "open", opened, raising=False)
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(tmp_path / "nih"), "--manifest", str(listed)])
    message = str(stopped.value.code)
    assert "cannot write" in message and "No space left on device" in message and "Free space" in message, message
    assert [name for name, _ in server.requests] == ["images_001.tar.gz"]  # asked once: a disk is no connection


def test_a_full_disk_while_extracting_names_the_archive_and_keeps_nothing_half_written(
    server, source, tmp_path, monkeypatch
):
    server.root = source[1]
    listed = manifest(source[1], server.url, tmp_path / "files.csv", names=["images_001.tar.gz"])

    def full(source_file, file, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(archives.shutil, "copyfileobj", full)
    out = tmp_path / "nih"
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(out), "--manifest", str(listed)])
    message = str(stopped.value.code)
    assert "full while extracting images_001.tar.gz" in message and "run the same command again" in message, message
    assert not list(out.rglob("*.png")) and not list(out.glob(".extracting-*"))


def test_a_manifest_with_a_header_and_no_row_says_it_lists_no_file(tmp_path):
    empty = tmp_path / "files.csv"
    empty.write_text("name,url,md5,bytes\n", encoding="utf-8")
    with pytest.raises(archives.DataError, match="files.csv lists no file"):
        archives.read_manifest(empty)


def test_an_archive_never_replaces_the_users_own_files_nor_writes_into_download_pys_state(server, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    members = {
        "labels.tar.gz": [("Data_Entry_2017_v2020.csv", b"Image Index\nfrom the archive\n")],
        "state.tar.gz": [(".download/images_001.tar.gz.json", b'{"mode": "extracted", "files": []}')],
        "films.tar.gz": [("images/00000001_000.png", b"\x89PNG one")],
    }
    for name, files in members.items():
        with tarfile.open(served / name, "w:gz") as archive:
            for member, data in files:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    server.root = served
    out = tmp_path / "nih"
    out.mkdir()
    mine = SAMPLE_CSV.read_bytes()  # the user's copy of NIH's label file, which the archive's would replace
    (out / "Data_Entry_2017_v2020.csv").write_bytes(mine)
    for name, said in (("labels.tar.gz", "a file download.py did not extract"), ("state.tar.gz", "own folder")):
        listed = manifest(served, server.url, tmp_path / f"{name}.csv", names=[name])
        with pytest.raises(SystemExit) as stopped:
            download.main(["--out", str(out), "--manifest", str(listed)])
        assert name in str(stopped.value.code) and said in str(stopped.value.code)
    assert (out / "Data_Entry_2017_v2020.csv").read_bytes() == mine
    assert not (out / ".download" / "images_001.tar.gz.json").exists()
    listed = manifest(served, server.url, tmp_path / "films.csv", names=["films.tar.gz"])
    download.main(["--out", str(out), "--manifest", str(listed)])  # its own films, extracted, then extracted again
    (out / ".download" / "films.tar.gz.json").unlink()
    (out / "images" / "00000001_000.png").write_bytes(b"changed")  # after its record is gone, not download.py's
    with pytest.raises(SystemExit, match="images/00000001_000.png, which would replace"):
        download.main(["--out", str(out), "--manifest", str(listed), "--keep_archives"])


def test_a_first_cache_only_run_counts_the_cache_on_the_disk_before_writing_a_byte_of_it(
    server, source, tmp_path, monkeypatch
):
    films, served = source
    server.root = served
    listed = manifest(served, server.url, tmp_path / "files.csv")
    biggest = max(path.stat().st_size for path in served.glob("*.tar.gz"))
    rows = len(pd.read_csv(films / "Data_Entry_2017_v2020.csv"))
    monkeypatch.setattr(download, "free_bytes", lambda folder: biggest + rows * 64 * 64 - 1)  # all but the cache
    out = tmp_path / "nih"
    with pytest.raises(SystemExit) as stopped:
        download.main(["--out", str(out), "--manifest", str(listed), "--cache_only", "--load_size", "64"])
    assert "the cache at 64 px" in str(stopped.value.code) and not (out / "cache_64").exists()
    assert not [name for name, _ in server.requests if name.endswith(".tar.gz")]
    monkeypatch.setattr(download, "free_bytes", lambda folder: biggest + rows * 64 * 64)  # just enough
    download.main(["--out", str(out), "--manifest", str(listed), "--cache_only", "--load_size", "64"])
    assert (out / "cache_64" / "index.csv").is_file()
