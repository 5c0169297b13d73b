"""Is model B better than model A? Paired tests of every AUROC difference on the same films.

    python compare.py A.pth B.pth [C.pth ...] [--names seed,full] [--split test] [--out DIR] [--reps 1000]
    python compare.py A.pth B.pth --test_list data/nih/test_list.txt     # runs with different splits: a list you name

Each checkpoint is scored on its run's test split (or --split val, or the films of --test_list). A predictions.csv that
evaluate.py wrote for that very checkpoint (in evaluation/<checkpoint stem>/ beside it, recognised by the checkpoint's
SHA-256) is read instead of predicting again. Checkpoints whose films differ are refused. The first model is compared
with each other one, per finding and for the mean over findings: both AUROCs and the difference (B - A), a 95% CI of
the difference and its p-value from a paired patient-level bootstrap (the same resampled patients for both models),
DeLong's p-value (films taken as independent) and Holm's adjustment of the 14 DeLong p-values. Writes compare.csv,
compare.json, compare.png (a forest plot of the differences) and compare.md (a table for a paper) to DIR.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr14.configurator import AtLeast, add_device_flags, add_out_flag, check_out_folder, flag_type
from cxr14.errors import DataError, one_line_errors
from cxr14.inference import TorchModel, split_outputs
from cxr14.metrics import compare_aurocs
from cxr14.pixels import find_cache
from cxr14.processes import worker_count
from cxr14.statistics import current_predictions, prediction_table, predictions, statistics_of
from cxr14.training_films import is_nih_only
from dataset import FINDINGS, run_split, split_rows

SIGNIFICANCE = 0.05  # a star in compare.png and compare.md: Holm-adjusted DeLong p below this
COLUMNS = (
    "finding",
    "model_a",
    "model_b",
    "auroc_a",
    "auroc_b",
    "difference",
    "ci_low",
    "ci_high",
    "p_bootstrap",
    "p_delong",
    "p_holm",
    "note",
)


def model_names(paths, names):
    """--names as given, else each checkpoint's stem, with its run folder where two stems are alike (seed/best)."""
    if names:
        names = [name.strip() for name in names.split(",")]
        if len(names) != len(paths) or len(set(names)) != len(names) or "" in names:
            raise DataError(f"--names needs {len(paths)} different names, one per checkpoint, not {names}")
        return names
    stems = [Path(path).stem for path in paths]
    names = [f"{Path(path).parent.name}/{stem}" if stems.count(stem) > 1 else stem for path, stem in zip(paths, stems)]
    return [f"{name}_{k + 1}" if names.count(name) > 1 else name for k, name in enumerate(names)]


def predictions_of(path, args):
    """A checkpoint's predictions.csv table on the compared films: evaluate.py's when it is current, else predicted."""
    current = current_predictions(path, args.split, args.test_list)
    if current is not None:
        print(f"{path}: read the predictions evaluate.py wrote for it ({len(current):,} films)")
        return current
    model = TorchModel(path, args.device, args.amp)
    if not is_nih_only(model.data):
        raise DataError(
            f"{path} trained on {model.data.dataset}: evaluate it first (python evaluate.py --checkpoint {path}); "
            "compare.py then reads the predictions.csv evaluate.py wrote"
        )
    split, source = run_split(model.checkpoint, path, args.test_list)
    data_dir = args.data_dir or model.data.data_dir
    parts, _ = split_rows(
        split, source, data_dir, model.data.csv, [args.split], cache=find_cache(data_dir, model.load_size)
    )
    rows = parts[args.split]
    logits, readable, features = split_outputs(model, rows, data_dir, args.batch_size, worker_count(args.num_workers))
    if not readable.all():
        names = list(rows.path[~readable])
        raise DataError(f"{len(names)} film(s) cannot be read (first: {', '.join(names[:3])}); re-extract them")
    print(f"{path}: calibrating {len(rows):,} films' probabilities and measuring their out-of-distribution distance")
    own = statistics_of(model.checkpoint)  # its own calibration, never a neighbouring evaluation's
    shown = predictions(logits, features, own, calibrated=own.calibration is not None)
    return prediction_table(rows, FINDINGS, rows[list(FINDINGS)], shown.probabilities, shown.ood_percentile)


def aligned(tables, names, paths):
    """The tables in the first one's film order, after checking that every one scores the same films, findings and
    labels; returns (findings, labels [films, findings], patient ids, [probabilities per model]). A union names NIH's
    films "nih:NAME": they are NIH's own. When one model scored fewer films (an NIH-only run beside a union), the
    models are compared on those films, which every model scored, and what is left out is said."""
    tables = [table.assign(image_name=table.image_name.astype(str).str.removeprefix("nih:")) for table in tables]
    shared = set.intersection(*(set(table.image_name) for table in tables))
    for table, name, path in zip(tables, names, paths):
        differ = [film for film in set(table.image_name) - shared if ":" not in film]  # NIH's, not another dataset's
        if differ or table.image_name.duplicated().any():
            raise DataError(
                f"{len(differ):,} films differ between the films of {name} ({len(table):,}, {path}) and the films "
                f"every other model scored (first: {sorted(differ)[:1]}): their runs split the data differently. "
                "Compare NIH-only runs on one list of films that neither trained on: --test_list FILE (NIH's "
                "test_list.txt for runs on the official split); a union's split is its own (evaluate.py takes no "
                "--test_list for it)"
            )
    for table, name in zip(tables, names):
        if len(table) > len(shared):
            left = len(table) - len(shared)
            print(f"{name}: compared on the {len(shared):,} films every model scored; {left:,} left out")
    first = tables[0][tables[0].image_name.isin(shared)]
    first = first.assign(patient_id=first.patient_id.astype(str)).set_index("image_name")
    findings = [column[len("prob_") :] for column in first.columns if column.startswith("prob_")]
    labels = first[[f"label_{name}" for name in findings]].to_numpy(dtype=float)
    scores = []
    for table, name, path in zip(tables, names, paths):
        table = table.set_index("image_name")
        table = table.loc[first.index]
        if [column[len("prob_") :] for column in table.columns if column.startswith("prob_")] != findings:
            raise DataError(f"{name} ({path}) scores other findings than {names[0]}: {findings}")
        own_labels = table[[f"label_{finding}" for finding in findings]].to_numpy(dtype=float)
        if not np.array_equal(own_labels, labels, equal_nan=True):
            raise DataError(
                f"{name} ({path}) reads other labels for the same films than {names[0]}: its run used another "
                "label file. Compare runs trained on the same Data_Entry_2017*.csv."
            )
        scores.append(table[[f"prob_{finding}" for finding in findings]].to_numpy(dtype=float))
    return findings, labels, first.patient_id.to_numpy(), scores


def pair_table(findings, labels, patients, scores, pair, reps):
    """The rows of compare.csv for one pair of models (names), per finding and the mean."""
    name_a, name_b = pair

    def progress(chunks):
        return tqdm(chunks, desc=f"{name_b} vs {name_a}: {reps} paired resamples", unit="chunk", leave=False)

    figures = compare_aurocs(labels, scores[0], scores[1], patients, reps, progress=progress)
    positives, known = np.nansum(labels, axis=0), np.sum(~np.isnan(labels), axis=0)
    notes = [
        f"no positives among the {n:,} films" if p == 0 else f"no negatives among the {n:,} films" if p == n else ""
        for p, n in zip(positives.astype(int), known)
    ]
    table = pd.DataFrame({"finding": [*findings, "mean"], "model_a": name_a, "model_b": name_b, **figures})
    table["note"] = [*notes, "over the findings with an AUROC; DeLong and Holm: per finding only"]
    return table[list(COLUMNS)]


def markdown(table):
    """A table for a paper: one pair's AUROCs, difference with its CI and the three p-values."""
    name_a, name_b = table.model_a.iloc[0], table.model_b.iloc[0]
    lines = [
        f"| Finding | {name_a} | {name_b} | Δ ({name_b} − {name_a}) [95% CI] | p (bootstrap) | p (DeLong) | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]

    def number(value, digits=3):
        return "–" if not np.isfinite(value) else f"{value:.{digits}f}"

    for row in table.itertuples():
        star = " *" if np.isfinite(row.p_holm) and row.p_holm < SIGNIFICANCE else ""
        difference = (
            f"{row.difference:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]" if np.isfinite(row.ci_low) else "–"
        )
        finding = "**mean**" if row.finding == "mean" else row.finding.replace("_", " ")
        lines.append(
            f"| {finding} | {number(row.auroc_a)} | {number(row.auroc_b)} | {difference}{star} | "
            f"{number(row.p_bootstrap, 4)} | {number(row.p_delong, 4)} | {number(row.p_holm, 4)} |"
        )
    return "\n".join(lines)


def plot(tables, path):
    """compare.png: per pair, each finding's difference with its 95% CI, a line at 0, a star where Holm's p < 0.05."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 7), squeeze=False, sharey=True)
    for panel, table in zip(axes[0], tables):
        y = np.arange(len(table))[::-1]
        error = np.abs(np.stack([table.difference - table.ci_low, table.ci_high - table.difference]))
        colours = ["black" if finding == "mean" else "tab:blue" for finding in table.finding]
        for row_y, x, spread, colour in zip(y, table.difference, np.nan_to_num(error).T, colours):
            panel.errorbar(x, row_y, xerr=spread[:, None], fmt="o", color=colour, capsize=3)
        panel.axvline(0, color="gray", linestyle=":")
        for row_y, row in zip(y, table.itertuples()):
            if np.isfinite(row.p_holm) and row.p_holm < SIGNIFICANCE:
                panel.annotate("*", (row.ci_high, row_y), xytext=(4, -4), textcoords="offset points", fontsize=14)
            if not np.isfinite(row.difference):
                panel.annotate("no AUROC", (0, row_y), xytext=(4, -3), textcoords="offset points", fontsize=8)
        panel.set_yticks(y, table.finding)
        name_a, name_b = table.model_a.iloc[0], table.model_b.iloc[0]
        panel.set(title=f"{name_b} vs {name_a}", xlabel=f"AUROC difference ({name_b} − {name_a}), 95% CI")
        panel.grid(axis="x", alpha=0.3)
    figure.suptitle("Paired patient-level bootstrap CIs; * Holm-adjusted DeLong p < 0.05", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="two or more checkpoints (first: A)")
    parser.add_argument("--names", help="comma-separated names, one per checkpoint (default: the file names)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="films to compare on (default: test)")
    parser.add_argument("--test_list", help="compare on these images (e.g. NIH's test_list.txt), not the runs' split")
    parser.add_argument("--data_dir", help="dataset folder (default: the one each run trained on)")
    add_out_flag(parser, None, "output folder", "compare_A_vs_B/ beside the first checkpoint")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a comparison of other checkpoints in --out (default: refuse)"
    )
    parser.add_argument(
        "--reps", type=flag_type(AtLeast(1)), default=1000, help="paired bootstrap replicates (default: 1000)"
    )
    parser.add_argument(
        "--batch_size", type=flag_type(AtLeast(1)), default=64, help="films per forward pass (default: 64)"
    )
    parser.add_argument("--num_workers", type=int, default=-1, help="DataLoader workers; -1: from the CPU count")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if len(args.checkpoints) < 2:
        parser.error("compare needs two checkpoints or more")
    if args.test_list and args.split != "test":
        parser.error("--test_list names the test films: leave --split out")
    return args


def compare(args):
    names = model_names(args.checkpoints, args.names)
    folder = "compare_" + "_vs_".join(name.replace("/", "-").replace("\\", "-") for name in names)
    out = Path(args.out) if args.out else Path(args.checkpoints[0]).parent / folder
    check_out_folder(out)
    check_not_another_comparison(out, dict(zip(names, map(str, args.checkpoints))), args.overwrite)
    missing = [path for path in args.checkpoints if not Path(path).is_file()]
    if missing:  # all of them before the first is predicted
        raise DataError(f"checkpoint(s) not found: {', '.join(map(str, missing))}")
    tables = [predictions_of(path, args) for path in args.checkpoints]
    findings, labels, patients, scores = aligned(tables, names, args.checkpoints)
    print(f"comparing on {len(labels):,} films of {len(set(patients)):,} patients ({args.reps} paired resamples)")
    pairs = [
        pair_table(findings, labels, patients, [scores[0], scores[k]], (names[0], names[k]), args.reps)
        for k in range(1, len(names))
    ]
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(pairs, ignore_index=True)
    table.to_csv(out / "compare.csv", index=False)
    summary = {
        "models": dict(zip(names, map(str, args.checkpoints))),
        "films": len(labels),
        "patients": len(set(patients)),
        "split": args.split,
        "test_list": args.test_list,
        "replicates": args.reps,
        "difference": "B - A (model_b minus model_a)",
        "rows": json.loads(table.to_json(orient="records")),
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    text = "\n\n".join(markdown(pair) for pair in pairs)
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    plot(pairs, out / "compare.png")
    print(text)
    for row in table[table.note.str.startswith("no ")].itertuples():
        print(f"{row.finding}: {row.note}, so no AUROC and no test")
    print(f"wrote compare.csv, compare.json, compare.md and compare.png to {out}")
    return table


def check_not_another_comparison(out, models, overwrite):
    """Refuses to replace a comparison of other checkpoints in `out` without --overwrite (as export.py refuses to
    replace a file); the same comparison run again rewrites its own files."""
    earlier = out / "compare.json"
    if overwrite or not earlier.is_file():
        return
    try:
        compared = json.loads(earlier.read_text(encoding="utf-8")).get("models")
    except (ValueError, AttributeError):
        compared = None
    if compared != models:
        raise DataError(
            f"{out} holds another comparison ({compared or 'an unreadable compare.json'}): give another --out, or "
            "--overwrite to replace it"
        )


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with one_line_errors():
        compare(args)


if __name__ == "__main__":
    main()
