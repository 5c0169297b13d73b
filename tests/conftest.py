"""The datasets and the trained run that tests share (session fixtures); the helpers they import are helpers.py's.

The quick suite runs in two processes (pytest-xdist, pyproject's addopts), each a file at a time. Each shared folder
is made once for both, by whichever asks first, the other waiting on a lock: the trained run (about a minute and a
half) trains once while the other process runs tests that need no trained model.
"""

import os
import shutil
import signal

import pytest
from filelock import FileLock

from demo_data import write_demo
from helpers import ROOT


def pytest_configure(config):
    """Two processes on two cores: each torch uses its share of them (two threads each would contend). Ctrl-C is
    answered as in a terminal: a test run started in the background (`make test &`) inherits SIGINT ignored, and so
    would the commands that the Ctrl-C tests start and interrupt."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """In each file, the tests that need the trained run after those that do not: a process that reaches a file while
    the other trains the run has work to do before it waits. Files keep their order, tests their order otherwise."""
    first_seen = {}
    for item in items:
        first_seen.setdefault(item.path, len(first_seen))
    items.sort(key=lambda item: (first_seen[item.path], "trained_run" in item.fixturenames))


def shared(tmp_path_factory, name, make):
    """The folder `name`, made by make(folder) once for the whole test session, whichever process asks first."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder above every process's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a process that failed half-way left it
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small synthetic NIH-layout dataset shared by the tests that only read it."""
    return shared(tmp_path_factory, "demo", lambda out: write_demo(out, patients=60, size=64, seed=1))


@pytest.fixture(scope="session")
def learn_dir(tmp_path_factory):
    """A larger demo dataset (a data seed the demo's settings were not tuned on) for the tests that train a model
    and expect it to learn."""
    return shared(tmp_path_factory, "learn", lambda out: write_demo(out, patients=300, size=128, seed=2))


@pytest.fixture(scope="session")
def trained_run(learn_dir, tmp_path_factory):
    """The demo's own settings (config/demo.py) on a smaller, fresh demo dataset: about a minute and a half on 2
    cores. Shared by the tests that need a trained model."""
    import train

    def train_demo(out):
        argv = [str(ROOT / "config" / "demo.py"), f"--data_dir={learn_dir}", f"--out_dir={out}", "--device=cpu"]
        with pytest.raises(SystemExit) as stopped:
            train.main(argv)
        assert stopped.value.code == 0

    return shared(tmp_path_factory, "trained", train_demo)
