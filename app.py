"""A local web page for a trained model: drop a chest film (PNG, JPEG or DICOM), see its 14 findings and heat maps.

    python app.py --checkpoint checkpoints/resnet50/best.pth [--port 7860] [--host 127.0.0.1]

The page shows the findings as bars sorted by probability with each finding's operating threshold marked
(evaluation/thresholds.json beside the checkpoint), the same numbers as a table, the Grad-CAM maps of the top
findings drawn on the film, and any warning about the input (a DICOM header that says it is not a frontal chest
film). Its API endpoint is /predict (gradio_client: Client(url).predict(handle_file(path), api_name="/predict")).
The same preprocessing (films.prepare), probabilities (inference.py) and heat maps (heatmaps.py) as predict.py.
It listens on 127.0.0.1 (this computer only) unless --host says otherwise. A research tool, not a medical device.
"""

import argparse
import os
import sys

import numpy as np

from configurator import add_device_flags
from errors import DataError, UserError
from films import DICOM_SUFFIXES, IMAGE_SUFFIXES, prepare
from heatmaps import film_overlays
from inference import TorchModel

CAM_FINDINGS = 3  # heat maps of this many top findings per film (--top)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a page showing patients' films
import gradio as gr  # noqa: E402  (after the variable above, which gradio reads on import)

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline


def probability_chart(probabilities, findings, thresholds):
    """Horizontal bars sorted by probability; a black tick marks each finding's threshold; bars at or above it red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(probabilities)
    figure, axes = plt.subplots(figsize=(6, 5.2), dpi=100)
    for row, k in enumerate(order):
        threshold = thresholds.get(findings[k])
        above = threshold is not None and probabilities[k] >= threshold
        axes.barh(row, probabilities[k], color="C3" if above else "C0")
        if threshold is not None:
            axes.plot([threshold, threshold], [row - 0.4, row + 0.4], color="black", linewidth=2)
    explained = "black tick: threshold; red: at or above it" if thresholds else "no thresholds: run evaluate.py"
    axes.set(yticks=range(len(order)), yticklabels=[findings[k] for k in order], xlim=(0, 1))
    axes.set_xlabel(f"probability ({explained})")
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def analyse(model, path, top):
    """The page's and the API's one function: (label, chart, table, notes, heat maps) for one film."""
    if path is None:
        raise gr.Error("Drop a film first (PNG, JPEG or DICOM).")
    try:
        film = prepare(path, model.load_size, model.image_size)
    except DataError as error:
        raise gr.Error(str(error), print_exception=False) from error
    probabilities = model.probabilities(film.crop[None])[0]
    findings, thresholds = model.findings, model.thresholds
    label = {finding: float(probability) for finding, probability in zip(findings, probabilities)}
    table = [
        [
            findings[k],
            f"{probabilities[k]:.3f}",
            f"{thresholds[findings[k]]:.3f}" if findings[k] in thresholds else "",
            "yes" if findings[k] in thresholds and probabilities[k] >= thresholds[findings[k]] else "",
        ]
        for k in np.argsort(-probabilities)
    ]
    notes = "\n".join(f"- **Warning:** {warning}" for warning in film.warnings) or "No warning about this file."
    maps = [(np.asarray(image), finding) for finding, image in film_overlays(model, film, probabilities, top)]
    return label, probability_chart(probabilities, findings, thresholds), table, notes, maps


def build_page(model, checkpoint, top=CAM_FINDINGS):
    with gr.Blocks(title="cxr14: chest X-ray findings", analytics_enabled=False) as page:
        gr.Markdown(
            f"## cxr14: chest X-ray findings\nModel: `{checkpoint}`. Drop a frontal chest film (PNG, JPEG or DICOM). "
            "A research tool, not a medical device."
        )
        with gr.Row():
            with gr.Column(scale=1):
                film = gr.File(label="Film", file_types=list(IMAGE_SUFFIXES + DICOM_SUFFIXES), type="filepath")
                notes = gr.Markdown(elem_id="notes")
                label = gr.Label(num_top_classes=len(model.findings), label="Findings", elem_id="findings")
            with gr.Column(scale=1):
                chart = gr.Image(label="Probabilities and thresholds", elem_id="chart", show_label=True)
                table = gr.Dataframe(
                    headers=["finding", "probability", "threshold", "above"], elem_id="table", interactive=False
                )
        maps = gr.Gallery(
            label=f"Grad-CAM heat maps of the top {top} findings",
            columns=top,
            height=620,
            object_fit="contain",
            elem_id="maps",
        )
        film.upload(
            lambda path: analyse(model, path, top),
            inputs=film,
            outputs=[label, chart, table, notes, maps],
            api_name="predict",
        )
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (e.g. best.pth)")
    parser.add_argument("--port", type=int, default=7860, help="default: %(default)s")
    parser.add_argument(
        "--host", default="127.0.0.1", help="127.0.0.1 (default): this computer only; 0.0.0.0: every network it is on"
    )
    parser.add_argument("--top", type=int, default=CAM_FINDINGS, help="heat maps per film (default: %(default)s)")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    try:
        model = TorchModel(args.checkpoint, args.device, args.amp)
    except UserError as error:
        sys.exit(f"error: {error}")
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    build_page(model, args.checkpoint, args.top).launch(
        server_name=args.host, server_port=args.port, share=False, theme=theme
    )


if __name__ == "__main__":
    main()
