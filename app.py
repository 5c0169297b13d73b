"""A local web page for a trained model: drop a chest film (PNG, JPEG or DICOM), see its 14 findings and heat maps.

    python app.py --checkpoint checkpoints/resnet50/best.pth [--port 7860] [--host 127.0.0.1] [--max_file_size 200]
    python app.py --onnx model_int8.onnx        # an export.py file (fp32 or --int8) in ONNX Runtime: no heat maps

The page shows any warning about the film in a banner above everything else (a DICOM header that says it is not a
frontal chest film; a film unlike the training films), the film itself, the findings as bars sorted by their
calibrated probability with each finding's operating threshold marked, the same numbers as a table, and the Grad-CAM
maps of the top findings drawn on the film. A file it cannot read gets its reason, naming the file, in the banner.
Its API endpoint is /predict (gradio_client: Client(url).predict(handle_file(path), api_name="/predict")), whose first
output is a label: {finding: calibrated probability}. The same preprocessing (films.prepare), predictions
(inference.py) and heat maps (heat_maps.py) as predict.py.

Uploaded films are patients' films: they go to a temporary folder of the page's own (GRADIO_TEMP_DIR), each deleted
once read, what the page sends back deleted a minute later, and the folder removed when the page stops. It listens
on 127.0.0.1 (this computer only) unless --host says otherwise. A research tool, not a medical device.
"""

import argparse
import atexit
import html
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from cxr14 import calibration
from cxr14.configurator import AtLeast, WholeBetween, add_checkpoint_flag, add_device_flags, flag_type
from cxr14.errors import DataError, one_line_errors
from cxr14.films import DICOM_SUFFIXES, IMAGE_SUFFIXES, prepare
from cxr14.heat_maps import film_overlays
from cxr14.onnx_model import load_model
from cxr14.statistics import at_or_above, with_ood_warnings

CAM_FINDINGS = 3  # heat maps of this many top findings per film (--top)
MAX_FILE_MB = 200  # the largest upload the page accepts, in MB (--max_file_size)
KEEP_SECONDS = 60  # what the page sent back (chart, film, maps) is deleted this long after

UPLOADS_PREFIX = "cxr14-page-"  # + the page's process id: a folder of a page that died (kill -9) is known as such


def process_alive(pid):
    """Whether a process of this id runs (POSIX: signal 0; Windows: OpenProcess, since os.kill there would end it)."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x00000102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_uploads(root):
    """Remove the upload folders that pages killed without their clean-up left in `root` (patients' films)."""
    for folder in Path(root).glob(f"{UPLOADS_PREFIX}*-*"):
        pid = folder.name[len(UPLOADS_PREFIX) :].split("-")[0]
        if folder.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


if os.environ.get("GRADIO_TEMP_DIR"):  # gradio makes the folder it is given; so do we
    Path(os.environ["GRADIO_TEMP_DIR"]).mkdir(parents=True, exist_ok=True)
remove_stale_uploads(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir())
UPLOADS = Path(tempfile.mkdtemp(prefix=f"{UPLOADS_PREFIX}{os.getpid()}-", dir=os.environ.get("GRADIO_TEMP_DIR")))
atexit.register(shutil.rmtree, UPLOADS, ignore_errors=True)
os.environ["GRADIO_TEMP_DIR"] = str(UPLOADS)  # read by gradio on import
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a page showing patients' films
import gradio as gr  # noqa: E402  (after the variables above, which gradio reads on import)

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline


def probability_chart(probabilities, findings, thresholds, scale="calibrated"):
    """Horizontal bars sorted by probability; a black tick marks each finding's threshold; bars at or above it red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(probabilities)
    above = at_or_above(probabilities, findings, thresholds)
    figure, axes = plt.subplots(figsize=(6, 5.2), dpi=100)
    for row, k in enumerate(order):
        threshold = thresholds.get(findings[k])
        axes.barh(row, probabilities[k], color="C3" if above[k] else "C0")
        if threshold is not None:
            axes.plot([threshold, threshold], [row - 0.4, row + 0.4], color="black", linewidth=2)
    explained = "black tick: threshold; red: at or above it" if thresholds else "no thresholds: run evaluate.py"
    axes.set(yticks=range(len(order)), yticklabels=[findings[k] for k in order], xlim=(0, 1))
    axes.set_xlabel(f"{scale} probability ({explained})")
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def banner(messages, kind):
    """An HTML banner above the findings that cannot be missed: red for a film that could not be read, amber for
    warnings, a plain line otherwise."""
    if not messages:
        return '<div id="banner-ok">No warning about this file.</div>'
    colour, border = {"error": ("#fde2e1", "#c0392b"), "warning": ("#fff3cd", "#d68910")}[kind]
    items = "".join(f"<li>{html.escape(message)}</li>" for message in messages)
    title = "This file could not be read" if kind == "error" else "Warning: read these before the findings"
    return (
        f'<div id="banner-{kind}" style="background:{colour};border:3px solid {border};border-radius:8px;'
        f'padding:12px 16px;font-size:1.1em"><strong>{title}</strong><ul>{items}</ul></div>'
    )


def forget(path):
    """Delete an uploaded film once it has been read (and its folder, gradio's one per upload)."""
    path = Path(path)
    if UPLOADS in path.resolve().parents:
        shutil.rmtree(path.parent if path.parent != UPLOADS else path, ignore_errors=True)


def analyse(model, path, top):
    """The page's and the API's one function: (label, chart, table, banner, film, heat maps) for one film."""
    if path is None:
        return {}, None, [], banner(["Drop a film first (PNG, JPEG or DICOM)."], "error"), None, []
    name = Path(path).name  # the user's own file name (gradio keeps it under a folder of its own)
    try:
        film = prepare(path, model.load_size, model.image_size)
    except DataError as error:
        return {}, None, [], banner([str(error).replace(str(path), name)], "error"), None, []
    finally:
        forget(path)
    predictions, class_maps = model.predict_with_maps(film.crop[None])  # heat maps from the same pass (PyTorch)
    (film,) = with_ood_warnings([film], predictions)
    probabilities = predictions.probabilities[0]
    findings, thresholds = model.findings, model.thresholds
    label = {finding: float(probability) for finding, probability in zip(findings, probabilities)}
    above = at_or_above(probabilities, findings, thresholds)
    table = [
        [
            findings[k],
            f"{probabilities[k]:.3f}",
            f"{thresholds[findings[k]]:.3f}" if findings[k] in thresholds else "",
            "yes" if above[k] else "",
        ]
        for k in np.argsort(-probabilities)
    ]
    film_maps = None if class_maps is None else class_maps[0]
    drawn = film_overlays(model, film, probabilities, top, film_maps) if hasattr(model, "net") else []
    maps = [(np.asarray(image), finding) for finding, image in drawn]
    chart = probability_chart(probabilities, findings, thresholds, "calibrated" if model.calibrated else "raw")
    return label, chart, table, banner(list(film.warnings), "warning"), film.original, maps


def scale_text(model):
    """What the page's probabilities are: calibrated (but for the findings left raw), or raw."""
    if not model.calibrated:
        return "Probabilities are the network's raw outputs (no calibration in the checkpoint: evaluate.py fits one)."
    text = "Probabilities are calibrated on the model's validation split."
    return text + (f" Except {', '.join(model.left_raw)}: {calibration.LEFT_RAW}." if model.left_raw else "")


def build_page(model, checkpoint, top=CAM_FINDINGS):
    with gr.Blocks(
        title="cxr14: chest X-ray findings", analytics_enabled=False, delete_cache=(KEEP_SECONDS, KEEP_SECONDS)
    ) as page:
        scale = scale_text(model)
        gr.Markdown(
            f"## cxr14: chest X-ray findings\nModel: `{checkpoint}`. Drop a frontal chest film (PNG, JPEG or DICOM). "
            f"{scale} A research tool, not a medical device."
        )
        notes = gr.HTML(elem_id="notes")
        with gr.Row():
            with gr.Column(scale=1):
                film = gr.File(label="Film", file_types=list(IMAGE_SUFFIXES + DICOM_SUFFIXES), type="filepath")
                shown = gr.Image(label="The film", elem_id="film", height=360)
                label = gr.Label(num_top_classes=len(model.findings), label="Findings", elem_id="findings")
            with gr.Column(scale=1):
                chart = gr.Image(label="Probabilities and thresholds", elem_id="chart", show_label=True)
                table = gr.Dataframe(
                    headers=["finding", "probability", "threshold", "above"], elem_id="table", interactive=False
                )
        maps = gr.Gallery(
            label=f"Grad-CAM heat maps of the top {top} findings"
            if hasattr(model, "net")
            else "Heat maps: none from an ONNX model (app.py --checkpoint draws them)",
            columns=top,
            height=620,
            object_fit="contain",
            elem_id="maps",
        )
        film.upload(
            lambda path: analyse(model, path, top),
            inputs=film,
            outputs=[label, chart, table, notes, shown, maps],
            api_name="predict",
        )
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_flag(source, required=False)  # the group requires one of the two
    source.add_argument("--onnx", help="a model written by export.py (fp32 or --int8): ONNX Runtime, no heat maps")
    parser.add_argument("--port", type=flag_type(WholeBetween(1, 65535)), default=7860, help="default: %(default)s")
    parser.add_argument(
        "--host", default="127.0.0.1", help="127.0.0.1 (default): this computer only; 0.0.0.0: every network it is on"
    )
    parser.add_argument(
        "--top", type=flag_type(AtLeast(1)), default=CAM_FINDINGS, help="heat maps per film (default: %(default)s)"
    )
    parser.add_argument(
        "--max_file_size", type=float, default=MAX_FILE_MB, help="largest upload, in MB (default: %(default)s)"
    )
    add_device_flags(parser)
    args = parser.parse_args(argv)
    with one_line_errors():
        model = load_model(args.checkpoint, args.onnx, args.device, args.amp)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    if hasattr(signal, "SIGTERM"):  # stopped by a service manager: close as on Ctrl-C, so the films are removed
        signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt())
    try:
        build_page(model, args.checkpoint or args.onnx, args.top).launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            theme=theme,
            max_file_size=int(args.max_file_size * 1e6),
        )
    except OSError as error:
        if "port" not in str(error).lower():
            raise
        sys.exit(
            f"error: port {args.port} on {args.host} is taken (another page or program uses it): choose another "
            f"with --port, e.g. --port {args.port + 1}"
        )


def _interrupt():
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(UPLOADS, ignore_errors=True)
