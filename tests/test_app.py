"""The web page (app.py): its /predict API through gradio_client, and the page itself in a real headless Chromium
driven by Selenium. Without a Chromium and a ChromeDriver on PATH the browser test is skipped, unless
CXR14_REQUIRE_BROWSER is set (.ci/run sets it after installing Debian's chromium and chromium-driver)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import predict
from dataset import FINDINGS
from helpers import ROOT, write_dicom

FILM = "00000002_000.png"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """The folder in which the page makes its own temporary folder; not there yet, as gradio allows."""
    return tmp_path_factory.mktemp("gradio") / "made_by_the_page"


@pytest.fixture(scope="module")
def page(trained_run, uploads):
    """app.py on a free loopback port, for the module's tests; stopped afterwards. Its uploads go to a test folder."""
    port = free_port()
    command = [sys.executable, "app.py", "--checkpoint", str(trained_run / "best.pth"), "--port", str(port)]
    environment = {**os.environ, "GRADIO_TEMP_DIR": str(uploads)}
    server = subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"app.py did not start: {server.stdout.read()[-3000:]}")
            time.sleep(1)
    yield url
    server.terminate()
    server.wait(timeout=30)
    assert not list(uploads.glob("cxr14-page-*")), "the page left its temporary folder behind"


def expected(trained_run, film, tmp_path):
    """What predict.py prints for the film: {finding: probability with 3 decimals}."""
    table = predict.predict(
        predict.parse_args([str(film), "--checkpoint", str(trained_run / "best.pth"), "--out", str(tmp_path)])
    )
    return {finding: table[finding][0] for finding in FINDINGS}


@pytest.fixture(autouse=True)
def client_files_in_tmp_path(tmp_path, monkeypatch):
    """gradio_client makes folders in the temporary directory: the test's own, not /tmp."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_the_predict_api_gives_predict_pys_probabilities(page, trained_run, learn_dir, tmp_path):
    from gradio_client import Client, handle_file

    film = next(learn_dir.rglob(FILM))
    client = Client(page, verbose=False, download_files=str(tmp_path / "downloads"))
    label, _, table, notes, shown, maps = client.predict(handle_file(str(film)), api_name="/predict")
    confidences = {row["label"]: row["confidence"] for row in label["confidences"]}
    assert set(confidences) == set(FINDINGS)
    reference = expected(trained_run, film, tmp_path)
    for finding in FINDINGS:
        assert confidences[finding] == pytest.approx(reference[finding], abs=1e-6), finding
    assert [row[0] for row in table["data"]] == sorted(FINDINGS, key=lambda f: -confidences[f])
    assert len(maps) == predict.CAM_FINDINGS and "No warning" in notes and shown  # and the film itself


def test_the_page_keeps_no_film_and_shows_an_ood_warning_in_its_banner(page, uploads, tmp_path):
    from gradio_client import Client, handle_file
    from PIL import Image

    noise = tmp_path / "holiday_photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128), dtype=np.uint8)).save(noise)
    client = Client(page, verbose=False, download_files=str(tmp_path / "downloads"))
    _, _, _, notes, _, _ = client.predict(handle_file(str(noise)), api_name="/predict")
    assert "banner-warning" in notes and "unlike the films this model was trained on" in notes
    assert not list(uploads.rglob("holiday_photo.png"))  # the upload was deleted once read
    broken = tmp_path / "scan_of_mrs_x.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a film")
    _, _, _, notes, _, _ = client.predict(handle_file(str(broken)), api_name="/predict")
    assert "banner-error" in notes and "scan_of_mrs_x.png" in notes and str(uploads) not in notes


def browser():
    """Headless Debian Chromium through its ChromeDriver, or a skip (a failure where CI requires it)."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CXR14_REQUIRE_BROWSER"):
            pytest.fail("CXR14_REQUIRE_BROWSER is set but chromium / chromedriver are not on PATH")
        pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1700",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def upload(driver, url, path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    return WebDriverWait(driver, 120)


def test_the_page_in_a_real_browser(page, trained_run, learn_dir, tmp_path):
    from selenium.webdriver.common.by import By

    film = next(learn_dir.rglob(FILM))
    reference = expected(trained_run, film, tmp_path)
    lateral = write_dicom(
        tmp_path / "lateral.dcm", np.tile(np.arange(64, dtype=np.uint16) * 64, (64, 1)), ViewPosition="LL"
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a film")
    driver = browser()
    try:
        wait = upload(driver, page, film)
        wait.until(lambda d: "Hernia" in d.find_element(By.ID, "table").text)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps img")) >= predict.CAM_FINDINGS)
        cells = driver.find_element(By.ID, "table").text.split()
        shown = {cells[k]: float(cells[k + 1]) for k in range(len(cells)) if cells[k] in FINDINGS}
        assert shown == {finding: round(value, 3) for finding, value in reference.items()}  # as predict.py prints
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 50_000  # a rendered page, not a blank one

        wait = upload(driver, page, lateral)
        wait.until(lambda d: "ViewPosition is 'LL'" in d.find_element(By.ID, "notes").text)

        wait = upload(driver, page, broken)
        wait.until(lambda d: "cannot read image" in d.find_element(By.ID, "notes").text)
        time.sleep(6)  # a toast would be gone by now; the banner stays
        notes = driver.find_element(By.ID, "notes").text
        assert "broken.png" in notes and "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()


def test_the_page_says_which_scale_its_probabilities_are_on(monkeypatch, tmp_path):
    from types import SimpleNamespace

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    import app

    for calibrated, said in ((True, "calibrated on the model's validation split"), (False, "the network's raw")):
        model = SimpleNamespace(findings=list(FINDINGS), calibrated=calibrated, left_raw=[])
        page = app.build_page(model, "best.pth")
        text = " ".join(str(getattr(block, "value", "")) for block in page.blocks.values())
        assert said in text, calibrated


def test_a_restarted_page_removes_the_films_a_killed_page_left(tmp_path):
    """kill -9 skips the page's clean-up: its folder of patients' films stayed (25.9). The next page removes the
    folders of pages whose process is gone, and leaves those of running ones."""
    import app

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getppid()  # a process that has ended; pytest's parent, running
    for pid in (dead, alive):
        folder = tmp_path / f"{app.UPLOADS_PREFIX}{pid}-abc123"
        folder.mkdir()
        (folder / FILM).write_bytes(b"a patient's film")
    (tmp_path / "cxr14-page-notes").mkdir()  # not a page's folder: no process id in its name
    app.remove_stale_uploads(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"{app.UPLOADS_PREFIX}{alive}-abc123",
        "cxr14-page-notes",
    ]
    assert app.UPLOADS.name.startswith(f"{app.UPLOADS_PREFIX}{os.getpid()}-")


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_port_outside_1_to_65535_is_refused_before_the_model_is_loaded(port, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    import app

    with pytest.raises(SystemExit) as stopped:
        app.main(["--checkpoint", str(tmp_path / "missing.pth"), "--port", port])
    assert stopped.value.code == 2 and "a whole number from 1 to 65535" in capsys.readouterr().err


def test_top_below_1_is_refused_as_predict_py_refuses_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    import app

    with pytest.raises(SystemExit) as stopped:
        app.main(["--checkpoint", str(tmp_path / "missing.pth"), "--top", "-1"])
    assert stopped.value.code == 2 and "--top: '-1': it must be a whole number of at least 1" in capsys.readouterr().err
