import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from cache import build_cache
from cxr14.errors import DataError
from cxr14.films import load_image
from cxr14.pixels import CachedImages, FilmImages, cache_folder
from dataset import attach_image_paths, read_labels
from helpers import tiny_settings


@pytest.fixture(scope="module")
def cached(demo_dir, tmp_path_factory):
    """A copy of the demo data with a 40-px cache built by two worker processes."""
    data = tmp_path_factory.mktemp("cached") / "demo"
    shutil.copytree(demo_dir, data)
    build_cache(data, size=40, workers=2)
    return data


def demo_labels(data):
    return attach_image_paths(read_labels(data / "Data_Entry_2017_v2020.csv"), data)


def test_cache_holds_exactly_the_png_path_pixels(cached):
    labels = demo_labels(cached)
    folder = cache_folder(cached, 40)
    assert pd.read_csv(folder / "index.csv").image_name.tolist() == labels.image_name.tolist()
    array = np.load(folder / "images.npy", mmap_mode="r")
    assert array.shape == (len(labels), 40, 40) and array.dtype == np.uint8
    from_cache = CachedImages(folder, labels.image_name[::-1])  # any order of names
    from_png = FilmImages(labels.path[::-1], 40)
    for k in range(0, len(labels), 17):
        assert np.array_equal(from_cache[k], from_png[k])
    assert np.load(folder / "done.npy").all()


def test_an_interrupted_cache_resumes_without_redoing_finished_rows(cached):
    folder = cache_folder(cached, 40)
    images = np.load(folder / "images.npy", mmap_mode="r+")
    done = np.load(folder / "done.npy")
    expected = np.array(images[:10])
    images[:10] = 0  # rows lost in an interruption: not marked done
    images[10] = 7  # a finished row: must not be recomputed
    images.flush()
    done[:10] = False
    np.save(folder / "done.npy", done)
    with pytest.raises(DataError, match="incomplete"):
        CachedImages(folder, demo_labels(cached).image_name)
    build_cache(cached, size=40, workers=1)
    images = np.load(folder / "images.npy", mmap_mode="r")
    assert np.array_equal(images[:10], expected) and (images[10] == 7).all()
    images = np.load(folder / "images.npy", mmap_mode="r+")
    images[10] = load_image(demo_labels(cached).path[10], 40)  # restore for the other tests
    images.flush()


def test_mismatches_are_clear_errors(cached, tmp_path):
    folder = cache_folder(cached, 40)
    with pytest.raises(DataError, match="00009999_000.png"):
        CachedImages(folder, ["00009999_000.png"])
    other = tmp_path / "other"
    shutil.copytree(cached, other)
    csv_path = other / "Data_Entry_2017_v2020.csv"
    csv_path.write_text(
        "".join(csv_path.read_text(encoding="utf-8").splitlines(keepends=True)[:-1]), encoding="utf-8"
    )  # one image fewer
    with pytest.raises(DataError, match="another list of images"):
        build_cache(other, size=40, workers=1)
    message = run_train(cached, tmp_path / "run", load_size=48, cache=str(folder))
    assert "40-px" in message and "48" in message


def test_a_corrupt_image_stops_the_cache_naming_it(demo_dir, tmp_path):
    data = tmp_path / "demo"
    shutil.copytree(demo_dir, data)
    broken = next(data.rglob("00000003_000.png"))
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="00000003_000.png"):
        build_cache(data, size=32, workers=1)


def run_train(data, out, **changes):
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_settings(data, out, **{"epochs": 1, **changes}))
    return stopped.value.code


@pytest.mark.slow  # three runs: about 20 s in the quick suite's processes (test_loaders checks the batches alike)
def test_training_on_the_cache_equals_training_on_the_pngs(cached, tmp_path, capsys):
    """The same weights from the PNGs, from the cache through DataLoader workers, and from the cache held in
    memory with batches drawn by index (CACHE_ON_DEVICE): the pixels and each image's augmentation are equal."""
    assert run_train(cached, tmp_path / "png", cache="off") == 0
    assert "decoding PNGs" in capsys.readouterr().out
    assert run_train(cached, tmp_path / "cache", cache="auto", cache_on_device="off", num_workers=2) == 0
    assert "images: cache" in capsys.readouterr().out
    assert run_train(cached, tmp_path / "memory", cache="auto", cache_on_device="auto") == 0
    assert "held in cpu memory" in capsys.readouterr().out
    png = torch.load(tmp_path / "png" / "epoch_01.pth", weights_only=True)["model"]
    for other in ("cache", "memory"):
        weights = torch.load(tmp_path / other / "epoch_01.pth", weights_only=True)["model"]
        for name in png:
            torch.testing.assert_close(png[name], weights[name], rtol=1e-5, atol=1e-6, msg=f"{other}: {name}")


def test_images_that_do_not_fit_in_memory_fall_back_to_workers(cached, tmp_path, capsys, monkeypatch):
    from cxr14 import pixels

    monkeypatch.setattr(pixels, "DEVICE_SHARE", 1e-9)  # as if the device's memory were nearly full
    assert run_train(cached, tmp_path / "full", cache="auto") == 0
    printed = capsys.readouterr().out
    assert "do not fit" in printed and "with workers instead" in printed
    message = run_train(cached, tmp_path / "forced", cache="off", cache_on_device="on")
    assert "CACHE_ON_DEVICE = on needs the image cache" in message


def test_ctrl_c_is_one_line_and_the_next_run_finishes_the_cache(learn_dir, tmp_path):
    """Ctrl-C reaches the whole process group: the workers used to print a KeyboardInterrupt traceback each."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    data = tmp_path / "data"
    shutil.copytree(learn_dir, data)
    command = [sys.executable, "cache.py", "--data_dir", str(data), "--size", "96", "--workers", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    done_file = cache_folder(data, 96) / "done.npy"
    started = time.time()
    while not (done_file.is_file() and np.load(done_file).any()):  # some rows written: the pool is at work
        assert process.poll() is None and time.time() < started + 120, "the cache finished before Ctrl-C"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted: the rows written so far are kept, and the same command resumes" in stderr
    assert not np.load(done_file).all()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    labels = demo_labels(data)
    cache = CachedImages(cache_folder(data, 96), labels.image_name)
    for row in (0, len(labels) // 2, len(labels) - 1):
        np.testing.assert_array_equal(cache[row], load_image(labels.path[row], 96))


@pytest.mark.parametrize("size", ["-5", "0", "31", "1025"])
def test_a_size_outside_32_to_1024_is_refused_before_any_folder_is_made(demo_dir, size, capsys):
    import cache

    with pytest.raises(SystemExit) as stopped:
        cache.main(["--data_dir", str(demo_dir), "--size", size])
    assert stopped.value.code == 2 and "from 32 to 1024" in capsys.readouterr().err
    assert not (demo_dir / f"cache_{size}").exists()


@pytest.mark.parametrize("command", ["cache", "download"])
def test_the_commands_that_decode_films_import_no_torch(command):
    """Their decoding processes re-import the command on Windows: decoding needs numpy and Pillow alone, and torch
    would cost each of them about 300 MB and a second."""
    import subprocess
    import sys

    from helpers import ROOT

    code = f"import sys, {command}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


@pytest.mark.slow  # two caches and a run: about 10 s on 2 cores
def test_two_datasets_in_one_folder_each_have_their_own_cache(demo_dir, tmp_path, capsys):
    """An own CSV of NIH's films in NIH's folder: its cache is its own, NIH's is neither refused nor touched."""
    import cache

    data = tmp_path / "demo"
    shutil.copytree(demo_dir, data)
    build_cache(data, size=40, workers=1)
    nih_index = (data / "cache_40" / "index.csv").read_bytes()
    labels = demo_labels(data)
    own = labels.assign(path=[str(Path(path).relative_to(data).as_posix()) for path in labels.path])
    own[["path", "patient_id", "Effusion"]].to_csv(data / "my_films.csv", index=False)
    cache.main(["--dataset", "csv", "--csv", "my_films.csv", "--data_dir", str(data), "--size", "40", "--workers", "1"])
    assert "cache ready" in capsys.readouterr().out
    assert pd.read_csv(data / "cache_csv_40" / "index.csv").image_name.tolist() == own.path.tolist()
    assert (data / "cache_40" / "index.csv").read_bytes() == nih_index
    assert run_train(data, tmp_path / "run", dataset="csv", csv="my_films.csv", cache_on_device="off") == 0
    assert f"cache {data / 'cache_csv_40'}" in capsys.readouterr().out
