"""A trained checkpoint as an ONNX model, to deploy without PyTorch (ONNX Runtime; predict.py --onnx uses it).

    python export.py --checkpoint checkpoints/resnet50/best.pth --out model.onnx
    python export.py --checkpoint checkpoints/resnet50/best.pth --out model_int8.onnx --int8   # 2.4x faster on a CPU

The input contract (also in the file's metadata, "input"): input "image", uint8 [N, 1, S, S], N free: each film as
8-bit grayscale (DICOM windowed), letterboxed to LOAD_SIZE x LOAD_SIZE (longer side resized, centred on black),
resized to round(S / 0.875) when that differs from LOAD_SIZE, and centre-cropped to S = IMAGE_SIZE: what
films.eval_crop gives. The graph itself scales to [0, 1], makes the three ImageNet-normalised channels, runs the
network and its outputs: "probabilities", float32 [N, 14] in the order of the metadata's "findings", calibrated
(inference.py, calibration.py); "ood_distance", float32 [N], how far the film lies from the training films (ood.py);
"raw_probabilities", the network's own sigmoid outputs. (A checkpoint without those statistics exports
"probabilities" alone, raw.) Metadata: findings, image_size, load_size, eval_crop_fraction, normalisation, whether
the probabilities are calibrated, the thresholds on their scale (and on the raw scale), the calibration, the OOD
threshold and the validation films' distances (for percentiles), the training run's config and its SHA-256, the
checkpoint's epoch.

--int8: the convolutions but the first, and a ViT's linear layers, quantized to 8 bits (ONNX Runtime's static QDQ
quantization, weights per channel), their activation ranges calibrated on films of the checkpoint's own validation
split. The whole validation split is then predicted by both models: the metadata's "int8" records the mean AUROC of
each, the largest difference of a probability and the films it was measured on, and the export is refused when the
int8 model's mean AUROC falls more than INT8_MAX_AUROC_DROP below fp32's, or a probability moves more than
INT8_MAX_PROBABILITY_DIFFERENCE (--force writes it anyway, saying so). predict.py --onnx and app.py take it as any
export.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr14.configurator import add_checkpoint_flag, add_out_flag
from cxr14.errors import DataError, one_line_errors
from cxr14.films import EVAL_CROP_FRACTION
from cxr14.inference import TorchModel, probability_graph
from cxr14.ood import FLAG_PERCENTILE
from transforms import IMAGENET_MEAN, IMAGENET_STD

OPSET = 18  # ONNX Runtime 1.16 and later run it
CALIBRATION_FILMS = 64  # --int8: validation films whose activations set the 8-bit ranges (seeded choice)
INT8_MAX_AUROC_DROP = 0.005  # --int8 refuses a model whose mean validation AUROC falls more below fp32's
INT8_MAX_PROBABILITY_DIFFERENCE = 0.02  # ... or where any validation film's probability moves more than this
INPUT_CONTRACT = (
    "uint8 [N, 1, S, S] with S = image_size: the film as 8-bit grayscale, letterboxed to load_size (longer side "
    "resized, centred on black), resized to round(S / eval_crop_fraction) when that differs from load_size, then "
    "centre-cropped to S. Normalisation happens inside the graph."
)


class Deployable(nn.Module):
    """uint8 evaluation crops -> the outputs of inference.probability_graph: normalisation, network, calibration and
    the out-of-distribution distance inside the graph, so a consumer cannot get them wrong."""

    def __init__(self, net, statistics=None):
        super().__init__()
        self.net, self.statistics = net, statistics

    def forward(self, image):
        return probability_graph(self.net, image, self.statistics)


def output_names(statistics):
    if statistics is None:
        return ["probabilities"]
    return ["probabilities", "raw_probabilities"] if statistics.ood is None else [*OUTPUTS]


OUTPUTS = {
    "probabilities": "float32 [N, findings]: calibrated probabilities (Platt scaling fitted on the validation split) "
    "in the order of 'findings'; the raw sigmoid outputs where 'calibrated' is false, and for the findings of "
    "'left_raw' (calibration.LEFT_RAW)",
    "ood_distance": "float32 [N]: the Mahalanobis distance of the film's features to the training films'; above "
    "'ood' threshold it is unlike them, and its findings may mean nothing",
    "raw_probabilities": "float32 [N, findings]: the network's own sigmoid outputs (inflated by the training's "
    "pos_weight)",
}


def metadata(model, outputs):
    """What a consumer needs, as text: findings, sizes, normalisation, thresholds on the scale of 'probabilities',
    calibration, the OOD statistics' percentiles, and the training run's config."""
    config, checkpoint, statistics = model.config, model.checkpoint, model.statistics
    config_json = json.dumps(config, sort_keys=True)
    properties = {
        "findings": json.dumps(model.findings),
        "image_size": str(model.image_size),
        "load_size": str(model.load_size),
        "eval_crop_fraction": str(EVAL_CROP_FRACTION),
        "normalisation": json.dumps({"scale": "1/255", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "in_graph": True}),
        "input": INPUT_CONTRACT,
        "output": "; ".join(f"{name}: {OUTPUTS[name]}" for name in outputs),
        "calibrated": json.dumps(model.calibrated),
        "left_raw": json.dumps(model.left_raw),  # findings whose "calibrated" probability is the raw one
        "thresholds": json.dumps(model.thresholds),
        "raw_thresholds": json.dumps(statistics.thresholds),
        "backbone": checkpoint["backbone"],
        "epoch": str(checkpoint["epoch"]),
        "config": config_json,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }
    if statistics.calibration is not None:
        fitted = dict(zip(model.findings, zip(*(part.tolist() for part in statistics.calibration))))
        properties["calibration"] = json.dumps({"method": "platt: sigmoid(a * logit + b)", "a_b": fitted})
    if statistics.ood is not None:
        properties["ood"] = json.dumps(
            {
                "threshold": statistics.ood["threshold"],
                "flag_percentile": FLAG_PERCENTILE,
                "validation": np.asarray(statistics.ood["validation"]).round(5).tolist(),
            }
        )
    return properties


def export(checkpoint_path, out, thresholds_file=None, model=None):
    """Write the ONNX file; returns its metadata. model: the checkpoint's TorchModel in fp32 on the CPU, when made."""
    model = model or TorchModel(checkpoint_path, device="cpu", amp=False, thresholds=thresholds_file)
    statistics = model.statistics if model.calibrated else None
    net = Deployable(model.net, statistics).eval()
    example = torch.zeros(2, 1, model.image_size, model.image_size, dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs = output_names(statistics)
    with tempfile.TemporaryDirectory(dir=out.parent) as folder:  # out appears whole, or not at all (Ctrl-C)
        written = Path(folder) / out.name
        properties = _export_graph(net, example, written, outputs, model)
        os.replace(written, out)
    return properties


def _export_graph(net, example, out, outputs, model):
    """torch.onnx.export of the deployable network to `out`, with the metadata a consumer needs; that metadata."""
    import onnx

    torch.onnx.export(
        net,
        (example,),
        str(out),
        input_names=["image"],
        output_names=outputs,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    properties = metadata(model, outputs)
    proto = onnx.load(str(out))
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return properties


def export_int8(
    checkpoint_path, out, thresholds_file=None, calibration_films=CALIBRATION_FILMS, force=False, films=None
):
    """Write the int8 ONNX file (--int8), checked against the fp32 export on the validation split; returns its
    metadata. Refused (DataError, nothing written) beyond the INT8_MAX_ limits unless `force`. `films`: the flags
    --data_dir and --drop_missing_images, which say where the validation films are read from."""
    import onnx

    model = TorchModel(checkpoint_path, device="cpu", amp=False, thresholds=thresholds_file)
    rows, crops = validation_crops(model, films or argparse.Namespace(data_dir=None, drop_missing_images=False))
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as folder:
        fp32 = Path(folder) / "fp32.onnx"
        properties = export(checkpoint_path, fp32, thresholds_file, model)
        chosen = np.random.default_rng(model.data.seed).permutation(len(crops))[:calibration_films]
        quantized = Path(folder) / "int8.onnx"
        quantize(fp32, quantized, crops[np.sort(chosen)])
        check = int8_check(fp32, quantized, crops, rows[list(model.findings)].to_numpy(dtype=float), len(chosen))
        if not np.isfinite(check["mean_auroc_drop"]) and not force:
            raise DataError(
                f"no finding has both positive and negative films among the {len(crops)} validation films of "
                f"{checkpoint_path}: the int8 model's AUROC cannot be checked, and it is refused (nothing written). "
                "Use the fp32 export (leave --int8 out), or add --force to write it unchecked"
            )
        too_far = not check["mean_auroc_drop"] <= INT8_MAX_AUROC_DROP  # NaN (unchecked, with --force) included
        too_far |= check["largest_probability_difference"] > INT8_MAX_PROBABILITY_DIFFERENCE
        said = (
            f"int8 against fp32 on the {check['validation_films']} validation films: mean AUROC "
            f"{check['mean_auroc_int8']:.4f} against {check['mean_auroc_fp32']:.4f} (a drop of "
            f"{check['mean_auroc_drop']:.4f}; at most {INT8_MAX_AUROC_DROP}), largest probability difference "
            f"{check['largest_probability_difference']:.4f} (at most {INT8_MAX_PROBABILITY_DIFFERENCE})"
        )
        if too_far and not force:
            raise DataError(
                f"{said}: the int8 model is refused and nothing was written. Calibrate on more films "
                f"(--calibration_films, now {len(chosen)}), use the fp32 export (leave --int8 out), or add --force to "
                "write it anyway"
            )
        print(("WARNING, written with --force beyond the limits: " if too_far else "") + said)
        proto = onnx.load(str(quantized))
        del proto.metadata_props[:]
        for key, value in {**properties, "int8": json.dumps({**check, "forced": bool(too_far)})}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(quantized))
        os.replace(quantized, out)
    return {**properties, "int8": json.dumps(check)}


def validation_crops(model, films):
    """scoring.part_crops of the validation part, read from --data_dir (default: the run's DATA_DIR); a folder not
    found says which one was looked in, and how to give another."""
    from cxr14.scoring import part_crops

    try:
        return part_crops(model, "val", films.data_dir, films.drop_missing_images)
    except DataError as error:
        if films.data_dir:
            raise
        folder = model.data.data_dir
        seen_from = "" if Path(folder.split(",")[0]).is_absolute() else f", relative to this folder ({Path.cwd()})"
        raise DataError(
            f"{error} [--int8 reads the run's validation films from its DATA_DIR {folder!r}{seen_from}: give their "
            "folder with --data_dir]"
        ) from None


def quantize(fp32, out, calibration_crops):
    """ONNX Runtime's static QDQ quantization of the convolutions (int8 weights per channel, uint8 activations
    calibrated on calibration_crops, uint8 [N, S, S]) but the first, and of a ViT's linear layers (the MatMuls of a
    weight): the stem reads the normalised film itself, and in 8 bits it alone moved a demo model's probabilities by
    up to 0.023, against 0.014 left in fp32 (64 calibration films). The calibration, the OOD distance and the head
    (a Gemm) stay in fp32 too, as do a ViT's attention products (of two activations).
    ONNX Runtime's recommended pre-processing (ONNX shape inference and its graph optimisations) comes first; its
    symbolic shape inference fails on this graph (ONNX Runtime 1.31: "object of type 'NoneType' has no len()", with
    or without the value_info of the initializers), and is skipped: the shapes are static but for N."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Films(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": crop[None, None]} for crop in calibration_crops])

        def get_next(self):
            return next(self.batches, None)

    prepared = Path(out).with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    weights = {initializer.name for initializer in graph.initializer}
    convolutions = [node.name for node in graph.node if node.op_type == "Conv"][1:]
    linear = [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    quantize_static(
        str(prepared),
        str(out),
        Films(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul"],
        nodes_to_quantize=convolutions + linear,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )


def int8_check(fp32, int8, crops, targets, calibration_films):
    """The int8 model against the fp32 one on the validation crops: each one's mean AUROC (over the labelled films
    of each finding), the drop, the largest probability difference, and how many films."""
    from cxr14.metrics import auroc_per_finding, mean_auroc
    from cxr14.onnx_model import OnnxModel

    probabilities = {
        name: OnnxModel(path).predict(crops).probabilities for name, path in (("fp32", fp32), ("int8", int8))
    }
    aurocs = {name: mean_auroc(auroc_per_finding(targets, values)) for name, values in probabilities.items()}
    return {
        "validation_films": len(crops),
        "calibration_films": calibration_films,
        "mean_auroc_fp32": aurocs["fp32"],
        "mean_auroc_int8": aurocs["int8"],
        "mean_auroc_drop": aurocs["fp32"] - aurocs["int8"],
        "largest_probability_difference": float(np.abs(probabilities["int8"] - probabilities["fp32"]).max()),
    }


def check_out(out, checkpoint, overwrite):
    """Before any work: --out must be a file that can be written, never the checkpoint itself, and replaced only with
    --overwrite."""
    if out.is_dir():
        raise DataError(f"--out {out} is a folder: name the file to write, e.g. --out {out / 'model.onnx'}")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise DataError(f"--out {out} is the checkpoint being exported: name another file (e.g. model.onnx)")
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists already: name another --out, or add --overwrite to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DataError(f"cannot write {out}: {folder} is not a folder this user may write in")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flag(parser)
    add_out_flag(parser, "model.onnx", "the ONNX file to write")
    parser.add_argument(
        "--thresholds", help="thresholds.json (default: evaluation/<checkpoint stem>/thresholds.json by the checkpoint)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists (default: refuse)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="quantize the convolutions to 8 bits, calibrated and checked on the "
        "checkpoint's validation split (needs its films)",
    )
    parser.add_argument(
        "--data_dir", help="--int8: the folder of the run's films (default: the run's DATA_DIR, as it gave it)"
    )
    parser.add_argument(
        "--drop_missing_images", action="store_true", help="--int8: calibrate and check on the films present"
    )
    parser.add_argument(
        "--calibration_films",
        type=int,
        default=CALIBRATION_FILMS,
        help="--int8: validation films that calibrate the 8-bit ranges (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"--int8: write it even when its mean validation AUROC falls more than "
        f"{INT8_MAX_AUROC_DROP} or a probability moves more than {INT8_MAX_PROBABILITY_DIFFERENCE}",
    )
    args = parser.parse_args(argv)
    if args.calibration_films < 1:
        parser.error(f"--calibration_films {args.calibration_films}: at least 1")
    try:
        with one_line_errors(interrupted=f"nothing was written to {args.out}"):
            check_out(Path(args.out), Path(args.checkpoint), args.overwrite)
            if args.int8:
                properties = export_int8(
                    args.checkpoint, args.out, args.thresholds, args.calibration_films, args.force, films=args
                )
            else:
                properties = export(args.checkpoint, args.out, args.thresholds)
    except ImportError as error:
        sys.exit(f"error: {error}. Install the extras: pip install -r requirements-extras.txt")
    size = properties["image_size"]
    print(f"wrote {args.out}: input uint8 [N, 1, {size}, {size}] (S = image_size = {size}); {properties['input']}")
    print(f"outputs: {properties['output']}")
    print(f"thresholds in its metadata: {len(json.loads(properties['thresholds']))} findings")


if __name__ == "__main__":
    main()
