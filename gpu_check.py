"""Check a GPU machine end to end: short real runs of the project's own commands on CUDA (or Apple MPS), each result
checked, one line each, and a JSON with the device named.

    python gpu_check.py [--json gpu_check.json] [--skip_compile] [--keep DIR]
    python gpu_check.py --device cpu --quick --skip_compile     # the checks themselves, checked on a CPU (minutes)

Writes synthetic demo data, then runs, each as a user would run it:
  train_amp        the demo's settings for 2 epochs: AMP (bf16 from Ampere on, else fp16 with loss scaling) and
                   channels_last, the images held in GPU memory (CACHE_ON_DEVICE); the loss must be finite and fall
  train_fp32       1 epoch in fp32, contiguous layout
  compile          1 epoch with COMPILE (skipped, saying why, where torch.compile cannot: no Triton)
  resume           a run stopped by SIGTERM during epoch 2, then --resume last: its weights and validation loss
                   against the uninterrupted run's (equal up to cuDNN, whose algorithms differ between processes)
  cuda_graphs      the resume check's settings with CUDA_GRAPHS: every epoch's validation loss against the
                   uninterrupted eager run's, within RESUME_TOLERANCE (the two eager runs' difference is printed
                   beside it); a run that captured no graph (or whose capture failed, falling back to eager steps)
                   fails the check
  torchrun         2 processes on 2 GPUs (skipped with one GPU)
  evaluate         evaluate.py on the trained run: the report's mean AUROC above chance
  predict          predict.py --cam on three test films: probabilities and heat maps written
  onnx             export.py, then predict.py --onnx (ONNX Runtime) against predict.py (PyTorch, fp32) on the same films
  bench            bench.py at 224 px, batch 64: images/s, the host's share of a step, waits for the GPU per step
                   (with torch.compile's rows on CUDA unless --skip_compile)
  folded           from bench's figures: the frozen BatchNorm folded into the convolutions (train.py's model) must
                   train faster than unfolded, in train.py's loop
  graphed          from bench's figures: the step replayed as one CUDA graph (CUDA_GRAPHS) must train faster
                   than the eager step, in train.py's loop (skipped where there are no graphs: not CUDA)
  reduce_overhead  the same for torch.compile's own CUDA graphs (mode reduce-overhead) against the eager step
  compiled_graphs  COMPILE inside train.py's graph (COMPILE and CUDA_GRAPHS) against CUDA_GRAPHS alone: with the
                   two above, which is fastest says what to turn on (both skipped with --skip_compile)
  goal             on an H100/H200, the fastest row at batch 64 against GOAL: the seed recipe and the full
                   fine-tune (bench's rows for both), with its compile and graphs settings and the host's share
On a machine without a GPU it says so and exits 0. Exit code 1 when a check failed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr14.checkpoints import load_checkpoint
from cxr14.configurator import add_device_flags
from cxr14.cuda_graphs import graph_support
from cxr14.devices import device_name, select_device
from cxr14.errors import one_line_errors
from dataset import FINDINGS

ROOT = Path(__file__).resolve().parent
DEMO = {"patients": 300, "size": 128}  # about 1,000 films: seconds of training on a GPU
FILMS = 3  # test films predicted, with heat maps and through ONNX
ONNX_TOLERANCE = 5e-3  # fp32 convolutions on Ampere and later use TF32 by default (about 1e-3 relative)
GOAL = {"layer4": 15_000, "all": 3_000}  # img/s at batch 64 on an H100/H200 (issue 29): seed recipe, full fine-tune
GOAL_GPUS = ("H100", "H200")
RESUME_TOLERANCE = 0.01  # relative difference of validation loss allowed between a resumed and an uninterrupted run
# (on a CPU they are equal; on a GPU cuDNN picks its algorithms per process, and two uninterrupted runs differ too)


class Checks:
    """The results, printed as they come: PASS, FAIL or SKIP, the check, its seconds, what was seen."""

    def __init__(self):
        self.results = []

    def run(self, name, check):
        started = time.perf_counter()
        try:
            status, detail = check()
        except Exception as error:  # a check that crashes has failed; the others still run
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
        seconds = time.perf_counter() - started
        self.results.append({"check": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"{status:<5} {name:<11} {seconds:6.1f} s  {detail}", flush=True)

    def failed(self):
        return [result["check"] for result in self.results if result["status"] == "FAIL"]


def command(*arguments, timeout=900, env=None):
    """Run one of the project's commands with this Python; its output, or an error with the output's end."""
    result = subprocess.run(
        [sys.executable, *map(str, arguments)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, arguments[:2]))} exited {result.returncode}: {result.stderr[-1500:]}")
    return result.stdout


def train(data, out, *settings):
    return command("train.py", "config/demo.py", f"--data_dir={data}", f"--out_dir={out}", *settings)


def history(out):
    return pd.read_csv(Path(out) / "metrics.csv")


def check_train_amp(data, work, device):
    printed = train(data, work / "amp", "--epochs=2", f"--device={device}")
    losses = history(work / "amp").val_loss.tolist()
    held = f"held in {device.type}" in printed
    fitted = load_checkpoint(work / "amp" / "best.pth", FINDINGS).get("inference", {})
    statistics = all(key in fitted for key in ("thresholds", "calibration", "ood"))  # fitted as the run ended
    ok = np.all(np.isfinite(losses)) and losses[1] < losses[0] and held and statistics
    autocast = next(line for line in printed.splitlines() if line.startswith("device:"))
    detail = (
        f"val loss {losses[0]:.3f} -> {losses[1]:.3f}; images held in {device.type} memory: {held}; thresholds, "
        f"calibration and OOD statistics in best.pth: {statistics}; {autocast}"
    )
    return ("PASS" if ok else "FAIL"), detail


def check_train_fp32(data, work, device):
    train(data, work / "fp32", "--epochs=1", "--amp=false", "--channels_last=false", f"--device={device}")
    loss = history(work / "fp32").val_loss[0]
    return ("PASS" if np.isfinite(loss) else "FAIL"), f"val loss {loss:.3f} after 1 epoch"


def check_compile(data, work, device):
    printed = train(data, work / "compiled", "--epochs=1", "--compile=true", f"--device={device}")
    skipped = next((line for line in printed.splitlines() if line.startswith("COMPILE:")), None)
    if skipped:
        return "SKIP", skipped
    loss = history(work / "compiled").val_loss[0]
    return ("PASS" if np.isfinite(loss) else "FAIL"), f"val loss {loss:.3f} after 1 compiled epoch"


def resume_settings(device):
    """The settings of check_resume's runs, which check_cuda_graphs compares against."""
    return ["--epochs=2", "--batch_size=8", "--tensorboard=false", f"--device={device}"]


def check_resume(data, work, device):
    """A run sent SIGTERM as its first epoch ends, resumed, against an uninterrupted run; and a second uninterrupted
    run against the first, for the noise that cuDNN's choice of algorithms (per process) leaves on a GPU. Batch 8,
    so that epoch 2 has enough steps for the signal to land inside it."""
    settings = resume_settings(device)
    train(data, work / "straight", *settings)
    train(data, work / "straight_again", *settings)
    stopped = work / "stopped"
    arguments = ["train.py", "config/demo.py", f"--data_dir={data}", f"--out_dir={stopped}", *settings]
    process = subprocess.Popen([sys.executable, *arguments], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (stopped / "epoch_01.pth").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=600)
    if not (stopped / "interrupted.pth").exists():
        return "FAIL", f"no interrupted.pth after SIGTERM (exit code {process.returncode})"
    position = load_checkpoint(stopped / "interrupted.pth", FINDINGS)["position"]
    train(data, stopped, *settings, "--resume=last")
    reference = history(work / "straight").val_loss.iloc[-1]
    noise = abs(history(work / "straight_again").val_loss.iloc[-1] - reference) / reference
    resumed = abs(history(stopped).val_loss.iloc[-1] - reference) / reference
    weights = weight_difference(work / "straight" / "epoch_02.pth", stopped / "epoch_02.pth")
    return ("PASS" if resumed <= RESUME_TOLERANCE else "FAIL"), (
        f"stopped at epoch {position['epoch']}, step {position['step']}; final val loss differs from the "
        f"uninterrupted run's by {resumed:.2%} (two uninterrupted runs: {noise:.2%}); largest weight difference "
        f"{weights:.1e} of the tensor's largest value"
    )


def check_cuda_graphs(data, work, device):
    """check_resume's settings trained with CUDA_GRAPHS, against its uninterrupted eager runs (run before)."""
    possible, why = graph_support(torch.device(device), 1, None)  # the dtype's reason (fp16) the run itself says
    if not possible:
        return "SKIP", f"CUDA_GRAPHS: {why}"
    printed = train(data, work / "graphed", *resume_settings(device), "--cuda_graphs=true")
    said = [line for line in printed.splitlines() if line.startswith("CUDA_GRAPHS:")]
    refused = next((line for line in said if "training without graphs" in line), None)
    if refused:
        return "SKIP", refused
    captured = any("captured" in line for line in said) and not any("failed" in line for line in said)
    reference, again = history(work / "straight").val_loss, history(work / "straight_again").val_loss
    graphed = history(work / "graphed").val_loss
    differences = ((graphed - reference).abs() / reference).tolist()
    noise = ((again - reference).abs() / reference).tolist()
    ok = captured and max(differences) <= RESUME_TOLERANCE
    return ("PASS" if ok else "FAIL"), (
        f"validation loss per epoch {', '.join(f'{value:.4f}' for value in graphed)}: differs from the eager run's "
        f"by {', '.join(f'{value:.2%}' for value in differences)} (two eager runs: "
        f"{', '.join(f'{value:.2%}' for value in noise)}); {' '.join(said) or 'no CUDA_GRAPHS line: not captured'}"
    )


def weight_difference(first, second):
    """The largest difference between two checkpoints' float tensors, relative to each tensor's largest value."""
    first, second = (load_checkpoint(path, FINDINGS)["model"] for path in (first, second))
    return max(
        ((first[name] - second[name]).abs().max() / first[name].abs().max().clamp(min=1e-12)).item()
        for name in first
        if first[name].is_floating_point()
    )


def check_torchrun(data, work):
    if torch.cuda.device_count() < 2:
        return "SKIP", f"{torch.cuda.device_count()} GPU: a 2-process run needs 2"
    out = work / "torchrun"
    arguments = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "config/demo.py"]
    command(*arguments, f"--data_dir={data}", f"--out_dir={out}", "--epochs=1")
    return ("PASS" if len(history(out)) == 1 else "FAIL"), f"val loss {history(out).val_loss[0]:.3f}, 2 processes"


def check_evaluate(work, device):
    command("evaluate.py", "--checkpoint", work / "amp" / "best.pth", "--bootstrap", "200", "--device", device)
    report = json.loads((work / "amp" / "evaluation" / "best" / "report.json").read_text(encoding="utf-8"))
    calibrated, ood, subgroups = report.get("calibration"), report.get("ood"), report.get("subgroups")
    ok = report["mean_auroc"] > 0.6 and calibrated and ood and subgroups
    trust = "no calibration, OOD or subgroup report"
    if ok:
        ece = calibrated["mean"]
        trust = f"mean ECE {ece['ece_raw']:.3f} -> {ece['ece_calibrated']:.3f}; {ood['flagged_share']:.1%} flagged OOD"
    return ("PASS" if ok else "FAIL"), (
        f"test mean AUROC {report['mean_auroc']:.3f} on {report['images']} films after 2 epochs; {trust}"
    )


def test_films(work):
    split = pd.read_csv(work / "amp" / "split.csv")
    names = set(split.image_name[split.split == "test"].head(FILMS))
    return sorted(path for path in (work / "data").rglob("*.png") if path.name in names)


def check_predict(work, device):
    films = test_films(work)
    out = work / "predicted"
    command("predict.py", "--checkpoint", work / "amp" / "best.pth", *films, "--cam", "--out", out, "--device", device)
    sheets = list(out.glob("*_sheet.png"))
    table = pd.read_csv(out / "predictions.csv")
    ok = len(table) == len(films) and len(sheets) == len(films) and table.ood_percentile.between(0, 100).all()
    return ("PASS" if ok else "FAIL"), (
        f"{len(table)} films predicted, {len(sheets)} heat-map sheets; OOD percentiles {table.ood_percentile.tolist()}"
    )


def check_onnx(work, device):
    films = test_films(work)
    checkpoint, onnx_file = work / "amp" / "best.pth", work / "model.onnx"
    command("export.py", "--checkpoint", checkpoint, "--out", onnx_file)
    command("predict.py", "--onnx", onnx_file, *films, "--out", work / "onnx")
    command("predict.py", "--checkpoint", checkpoint, *films, "--no-amp", "--out", work / "torch", "--device", device)
    onnx, torch_ = (
        pd.read_csv(work / name / "predictions.csv")[list(FINDINGS)].to_numpy() for name in ("onnx", "torch")
    )
    largest = float(np.abs(onnx - torch_).max())
    return ("PASS" if largest <= ONNX_TOLERANCE else "FAIL"), (
        f"ONNX Runtime vs PyTorch fp32 on {device}: largest difference {largest:.1e} of the probabilities written"
        + (" (TF32 convolutions on the GPU)" if str(device).startswith("cuda") else "")
    )


def check_bench(work, device, quick, with_compile):
    figures_path = work / "bench.json"
    size = ["--quick"] if quick else ["--images", "96", "--workers", "4", "--trainable_layers", *GOAL]
    compiled = ["--compile"] if with_compile and str(device).startswith("cuda") else []
    command("bench.py", *size, *compiled, "--device", device, "--json", figures_path, timeout=1800)
    figures = json.loads(figures_path.read_text(encoding="utf-8"))
    syncs = figures.get("loop_gpu_syncs_per_step")
    ok = figures["train_img_s"] > 0 and (syncs is None or syncs <= 2 / 10)
    share = figures["host_share_of_step"]
    return ("PASS" if ok else "FAIL"), (
        f"train.py's loop {figures['train_img_s']:.0f} img/s at {figures['settings']['image_size']} px, batch "
        f"{figures['settings']['batch_size']} (bare loop {figures['bare_train_img_s']:.0f}); eval "
        f"{figures['eval_img_s']:.0f} img/s; host share of a step {'-' if share is None else f'{share:.0%}'}; "
        f"waits for the GPU per step {syncs}; NIH epoch {figures['nih_epoch_s'] / 60:.1f} min"
    )


def faster_row(figures, faster, than, what):
    """PASS when bench's row `faster` (a dict of Variant fields) trained faster in train.py's loop than row `than`;
    SKIP when either is missing."""
    rows = [] if figures is None else figures["configurations"]

    def row(wanted):
        found = [each for each in rows if all(each.get(key) == value for key, value in wanted.items())]
        return found[0] if found else None

    first, second = row(faster), row(than)
    if first is None or second is None:
        return "SKIP", f"bench.py has no such rows ({what})"
    ratio = first["train_img_s"] / second["train_img_s"]
    ops = f"; {second['ops_per_step']} and {first['ops_per_step']} ops/step" if first.get("ops_per_step") else ""
    return ("PASS" if ratio > 1 else "FAIL"), (
        f"{what}: {first['train_img_s']:.0f} against {second['train_img_s']:.0f} img/s ({ratio:.2f}x){ops}"
    )


def check_goal(figures, gpu):
    """On an H100/H200: the fastest of bench's rows at batch 64 per recipe against GOAL; SKIP on other devices."""
    if not any(name in gpu for name in GOAL_GPUS):
        return "SKIP", f"the goal is set for an {' or '.join(GOAL_GPUS)}, not {gpu}"
    rows = [row for row in (figures or {}).get("configurations", []) if row["batch_size"] == 64]
    said, ok = [], True
    for recipe, goal in GOAL.items():
        mine = [row for row in rows if row["trainable_layers"] == recipe]
        if not mine:
            return "SKIP", f"bench.py has no rows for TRAINABLE_LAYERS {recipe} at batch 64"
        best = max(mine, key=lambda row: row["train_img_s"])
        ok &= best["train_img_s"] >= goal
        share = best["host_share_of_step"]
        said.append(
            f"{recipe}: {best['train_img_s']:,.0f} img/s (goal {goal:,}) with compile {best['compile'] or 'off'}, "
            f"graphs {best['graphs']}, host share {'-' if share is None else f'{share:.0%}'}"
        )
    return ("PASS" if ok else "FAIL"), "; ".join(said)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results (default: %(default)s)")
    parser.add_argument("--skip_compile", action="store_true", help="leave out torch.compile (a minute or more)")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    add_device_flags(parser, amp=False)  # --device cpu checks the checks themselves
    parser.add_argument("--quick", action="store_true", help="bench.py --quick (its figures then mean little)")
    args = parser.parse_args(argv)
    with one_line_errors():
        device = select_device(args.device)
    if device.type == "cpu" and args.device == "auto":
        print("no GPU: nothing to check here (PyTorch sees no CUDA or Apple MPS device). Run this on a GPU machine.")
        Path(args.json).write_text(json.dumps({"device": "no GPU", "checks": []}, indent=2) + "\n", encoding="utf-8")
        return 0
    print(f"checking {device_name(device)}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.keep or temporary)
        data = work / "data"
        command("demo_data.py", "--out", data, "--patients", DEMO["patients"], "--size", DEMO["size"])
        command("cache.py", "--data_dir", data, "--size", 73)
        checks = Checks()
        checks.run("train_amp", lambda: check_train_amp(data, work, device))
        checks.run("train_fp32", lambda: check_train_fp32(data, work, device))
        if args.skip_compile:
            checks.run("compile", lambda: ("SKIP", "--skip_compile"))
        else:
            checks.run("compile", lambda: check_compile(data, work, device))
        checks.run("resume", lambda: check_resume(data, work, device))
        checks.run("cuda_graphs", lambda: check_cuda_graphs(data, work, device))
        checks.run("torchrun", lambda: check_torchrun(data, work))
        checks.run("evaluate", lambda: check_evaluate(work, device))
        checks.run("predict", lambda: check_predict(work, device))
        checks.run("onnx", lambda: check_onnx(work, device))
        checks.run("bench", lambda: check_bench(work, device, args.quick, not args.skip_compile))
        figures = (
            json.loads((work / "bench.json").read_text(encoding="utf-8")) if (work / "bench.json").exists() else None
        )
        eager = {"amp": True, "channels_last": True, "compile": "", "fold": True, "graphs": False}
        checks.run(
            "folded", lambda: faster_row(figures, eager, {**eager, "fold": False}, "folded against unfolded BatchNorm")
        )
        graphed = {**eager, "graphs": True}
        checks.run("graphed", lambda: faster_row(figures, graphed, eager, "CUDA_GRAPHS against the eager step"))
        reduce_overhead, both = {**eager, "compile": "reduce-overhead"}, {**eager, "compile": "default", "graphs": True}
        checks.run(
            "reduce_overhead",
            lambda: faster_row(figures, reduce_overhead, eager, "compile mode reduce-overhead against the eager step"),
        )
        checks.run(
            "compiled_graphs",
            lambda: faster_row(figures, both, graphed, "COMPILE inside CUDA_GRAPHS against graphs alone"),
        )
        checks.run("goal", lambda: check_goal(figures, device_name(device)))
    results = {"device": device_name(device), "torch": torch.__version__, "checks": checks.results, "bench": figures}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    failed = checks.failed()
    print(f"wrote {args.json}; {'failed: ' + ', '.join(failed) if failed else 'every check passed or was skipped'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
