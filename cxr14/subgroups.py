"""Does the model work as well for every patient? The evaluated films split by sex, age band, view (PA or AP) and
first film or follow-up, with each group's figures: per finding and for the mean, the films, prevalence, AUROC with its
patient-bootstrap CI, sensitivity and false-positive rate at the validation-chosen threshold; and the underdiagnosis
rate of Seyyed-Kalantari et al. (Nature Medicine 2021, "Underdiagnosis bias of AI algorithms applied to chest
radiographs in under-served patient populations"): the share of films with at least one labelled finding that the model
calls clear of all of them (no finding at or above its threshold). A group of fewer than MIN_FILMS films, or with no
positive of a finding, is said to be so rather than given a meaningless figure.
"""

import numpy as np
import pandas as pd

from cxr14.metrics import auroc_per_finding, bootstrap_auroc_ci, mean_auroc, operating_point

MIN_FILMS = 30  # fewer films than this: the group's figures are not reported
AGE_BANDS = ((0, 19), (20, 39), (40, 59), (60, 79), (80, None))  # years, both ends included
COLUMNS = ["attribute", "group", "finding", "films", "positives", "prevalence", "auroc", "auroc_ci_low"]
COLUMNS += ["auroc_ci_high", "sensitivity", "false_positive_rate", "underdiagnosis_rate", "status"]


def groups(rows):
    """{(attribute, group name): mask} over the rows, for the attributes the rows carry (sex, age, view,
    follow_up)."""
    found = {}
    if "sex" in rows:
        for sex, name in (("F", "female"), ("M", "male")):
            found[("sex", name)] = (rows.sex == sex).to_numpy()
    if "age" in rows:
        age = pd.to_numeric(rows.age, errors="coerce").to_numpy()
        for low, high in AGE_BANDS:
            inside = (age >= low) & (age <= (high if high is not None else np.inf))
            found[("age", f"{low}-{high}" if high is not None else f"{low}+")] = inside
    if "view" in rows:
        for view in ("PA", "AP"):
            found[("view", view)] = (rows.view == view).to_numpy()
    if "follow_up" in rows:
        follow_up = pd.to_numeric(rows.follow_up, errors="coerce").to_numpy()
        found[("film", "first")] = follow_up == 0
        found[("film", "follow-up")] = follow_up > 0
    return found


def underdiagnosis_rate(targets, probabilities, thresholds):
    """Share of films with at least one labelled finding that no finding's probability reaches its threshold."""
    usable = np.isfinite(thresholds)
    if not usable.any():
        return np.nan
    sick = np.nansum(targets[:, usable] == 1, axis=1) > 0
    if not sick.any():
        return np.nan
    called_clear = ~(probabilities[:, usable] >= thresholds[usable]).any(axis=1)
    return float(called_clear[sick].mean())


def group_figures(names, targets, probabilities, patient_ids, thresholds, replicates, seed=0, intervals=None):
    """(rows of figures per finding and for the mean, the mean's CI) for one group's films; `intervals`: their
    bootstrap_auroc_ci when it was computed already (the whole split's, by the main report), else computed here."""
    aurocs = auroc_per_finding(targets, probabilities)
    if intervals is None:
        intervals = bootstrap_auroc_ci(targets, probabilities, patient_ids, replicates, seed=seed)
    low, high, mean_ci = intervals
    figures = []
    for k, name in enumerate(names):
        known = ~np.isnan(targets[:, k])
        y, p = targets[known, k], probabilities[known, k]
        positives = int(y.sum())
        status = "" if positives and positives < len(y) else "no positives" if not positives else "no negatives"
        point = operating_point(y, p, thresholds[k]) if np.isfinite(thresholds[k]) else None
        figures.append(
            {
                "finding": name,
                "films": int(known.sum()),
                "positives": positives,
                "prevalence": float(y.mean()) if len(y) else np.nan,
                "auroc": float(aurocs[k]),
                "auroc_ci_low": float(low[k]),
                "auroc_ci_high": float(high[k]),
                "sensitivity": point["sensitivity"] if point and positives else np.nan,
                "false_positive_rate": 1 - point["specificity"] if point and positives < len(y) else np.nan,
                "status": status,
            }
        )
    mean = {
        "finding": "mean",
        "films": len(targets),
        "positives": int(np.nansum(np.nanmax(targets, axis=1) == 1)),
        "prevalence": np.nan,
        "auroc": mean_auroc(aurocs),
        "auroc_ci_low": float(mean_ci[0]),
        "auroc_ci_high": float(mean_ci[1]),
        "sensitivity": np.nan,
        "false_positive_rate": np.nan,
        "status": "",
        "underdiagnosis_rate": underdiagnosis_rate(targets, probabilities, thresholds),
    }
    return figures + [mean]


def subgroup_report(rows, names, targets, probabilities, thresholds, replicates, whole=None):
    """(table: one row per group and finding, and for the mean; lines naming the pairs of groups of one attribute
    whose mean-AUROC intervals do not overlap). The whole split is the group ("all", "all"); `whole`: its intervals
    as the main report's bootstrap found them (the same replicates and seed), which are not drawn again."""
    patient_ids = rows.patient_id.to_numpy()
    table = []
    everything = {("all", "all"): np.ones(len(rows), dtype=bool), **groups(rows)}
    for (attribute, group), mask in everything.items():
        if mask.sum() < MIN_FILMS:
            table.append({"attribute": attribute, "group": group, "finding": "mean", "films": int(mask.sum())})
            table[-1]["status"] = f"fewer than {MIN_FILMS} films: not reported"
            continue
        figures = group_figures(
            names,
            targets[mask],
            probabilities[mask],
            patient_ids[mask],
            np.asarray(thresholds),
            replicates,
            intervals=whole if attribute == "all" else None,
        )
        table += [{"attribute": attribute, "group": group, **row} for row in figures]
    table = pd.DataFrame(table, columns=COLUMNS)  # every column, even when no group was large enough
    return table, differences(table)


def differences(table):
    """'age 20-39 vs 80+: ...' for each pair of groups of one attribute whose mean-AUROC CIs do not overlap."""
    means = table[(table.finding == "mean") & (table.attribute != "all") & table.auroc.notna()]
    lines = []
    for attribute, rows in means.groupby("attribute", sort=False):
        rows = list(rows.itertuples())
        for i, first in enumerate(rows):
            for second in rows[i + 1 :]:
                if first.auroc_ci_high < second.auroc_ci_low or second.auroc_ci_high < first.auroc_ci_low:
                    lines.append(
                        f"{attribute} {first.group} vs {second.group}: mean AUROC {first.auroc:.3f} "
                        f"({first.auroc_ci_low:.3f}-{first.auroc_ci_high:.3f}) vs {second.auroc:.3f} "
                        f"({second.auroc_ci_low:.3f}-{second.auroc_ci_high:.3f}): the intervals do not overlap"
                    )
    return lines


def format_subgroups(table):
    means = table[table.finding == "mean"]
    lines = [f"{'group':<22}{'films':>7}{'mean AUROC':>12}{'95% CI':>15}{'underdiagnosed':>16}"]
    for row in means.itertuples():
        label = "whole split" if row.attribute == "all" else f"{row.attribute} {row.group}"
        if isinstance(row.status, str) and row.status:
            lines.append(f"{label:<22}{row.films:>7,}   {row.status}")
            continue
        under = getattr(row, "underdiagnosis_rate", np.nan)
        lines.append(
            f"{label:<22}{row.films:>7,}{row.auroc:>12.3f}{f'{row.auroc_ci_low:.3f}-{row.auroc_ci_high:.3f}':>15}"
            f"{under:>16.1%}"
        )
    return "\n".join(lines)


def plot_forest(table, path):
    """subgroups.png: each group's mean AUROC with its 95% CI, the whole split's as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = table[(table.finding == "mean")].reset_index(drop=True)
    whole = means[means.attribute == "all"].iloc[0]
    groups_ = means[means.attribute != "all"].iloc[::-1].reset_index(drop=True)
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(groups_) + 2.4))
    if np.isfinite(whole.auroc):
        axes.axvline(whole.auroc, color="gray", linestyle=":", label=f"whole split {whole.auroc:.3f}")
        axes.axvspan(whole.auroc_ci_low, whole.auroc_ci_high, color="gray", alpha=0.12)
    for y, row in groups_.iterrows():
        label = f"{row.attribute}: {row.group} ({row.films:,} films)"
        if isinstance(row.status, str) and row.status:
            axes.text(0.51, y, row.status, va="center", fontsize=8, color="gray")
        else:
            axes.errorbar(
                row.auroc,
                y,
                xerr=[[row.auroc - row.auroc_ci_low], [row.auroc_ci_high - row.auroc]],
                fmt="o",
                color="C0",
                capsize=3,
            )
        axes.text(-0.01, y, label, transform=axes.get_yaxis_transform(), ha="right", va="center", fontsize=9)
    axes.set(
        yticks=[],
        ylim=(-0.7, len(groups_) - 0.3),
        xlim=(0.5, 1.0),
        xlabel="mean AUROC over the findings (95% CI, patients resampled)",
    )
    axes.set_title("Subgroups of the evaluated split")
    if np.isfinite(whole.auroc):
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.subplots_adjust(left=0.36)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report_section(rows, names, targets, probabilities, thresholds, replicates, out, whole=None):
    """The subgroup part of an evaluation: subgroups.csv, subgroups.png; (report.json entry, text) or (None, why).
    `whole`: the whole split's intervals (subgroup_report)."""
    if not groups(rows):
        return None, "subgroups: this dataset's films carry no sex, age, view or follow-up"
    print(f"subgroups: {len(groups(rows))} groups of the {len(rows):,} films, each with its own bootstrap")
    table, gaps = subgroup_report(rows, names, targets, probabilities, thresholds, replicates, whole)
    table.to_csv(out / "subgroups.csv", index=False)
    plot_forest(table, out / "subgroups.png")
    text = "subgroups (mean over findings; thresholds from the validation split):\n" + format_subgroups(table)
    text += "\n" + ("\n".join(gaps) if gaps else "no two groups of one attribute differ beyond their intervals")
    entry = {"min_films": MIN_FILMS, "differences": gaps, "rows": json_rows(table)}
    return entry, text


def json_rows(table):
    """The table's rows for report.json (NaN as null)."""
    return [
        {key: (None if isinstance(value, float) and np.isnan(value) else value) for key, value in row.items()}
        for row in table.to_dict(orient="records")
    ]
