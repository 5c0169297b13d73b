"""Positives, negatives and BCEWithLogitsLoss pos_weight per finding.

    python compute_pos_weight.py --csv Data_Entry_2017.csv [--train_list train_list.txt] [--out pos_weight.json]

Counts over the images named in --train_list (one name per line), or over every row of the CSV. Count over
the training split only: weights from validation or test rows leak their label balance into training.
train.py computes the same numbers from its own training split through the same dataset.py functions.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from cxr14.errors import DataError, one_line_errors
from dataset import FINDINGS, POS_WEIGHT_POLICIES, count_positives, pos_weight_from_counts, read_labels


def select_rows(labels, train_list):
    """The rows named in train_list (a file of image names); every name must be in the CSV."""
    names = Path(train_list).read_text(encoding="utf-8").split()
    known = labels["image_name"].isin(names)
    unknown = sorted(set(names) - set(labels["image_name"]))
    if unknown:
        raise DataError(f"{train_list}: {len(unknown)} image name(s) not in the CSV (first: {', '.join(unknown[:5])})")
    return labels[known]


def format_table(positives, negatives, weights):
    lines = [f"{'finding':<20}{'positives':>10}{'negatives':>11}{'prevalence':>12}{'pos_weight':>12}"]
    for finding, pos, neg, weight in zip(FINDINGS, positives, negatives, weights):
        prevalence = pos / (pos + neg) if pos + neg else float("nan")
        lines.append(f"{finding:<20}{pos:>10,}{neg:>11,}{prevalence:>11.2%}{weight:>12.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True, help="NIH label file (Data_Entry_2017.csv or the 2020 revision)")
    parser.add_argument(
        "--train_list", "--train-list", help="file of training image names, one per line (default: every row)"
    )
    parser.add_argument("--policy", choices=POS_WEIGHT_POLICIES, default="ratio", help="ratio = neg/pos (default)")
    parser.add_argument("--cap", type=float, default=0.0, help="upper bound on a weight; 0 = none (default: 0)")
    parser.add_argument("--out", help="write {finding: pos_weight} as JSON here")
    args = parser.parse_args(argv)
    with one_line_errors():
        labels = read_labels(args.csv)
        if args.train_list:
            labels = select_rows(labels, args.train_list)
    positives, negatives = count_positives(labels[list(FINDINGS)].to_numpy())
    weights = pos_weight_from_counts(positives, negatives, args.policy, args.cap)
    print(f"{len(labels):,} images, {labels['patient_id'].nunique():,} patients; policy {args.policy}")
    print(format_table(positives, negatives, weights))
    if args.out:
        Path(args.out).write_text(
            json.dumps(dict(zip(FINDINGS, np.round(weights, 6).tolist())), indent=2) + "\n", encoding="utf-8"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
