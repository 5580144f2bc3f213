"""The per-study report, rendered from the ledger alone: the calibration table and its figures.

- calibration.png: one panel per (method, regime), rows methods and columns regimes; actual against predicted
  effect with ±1 se error bars (`actual_se`), each set kind in its own colour, y = x, on a symmetric-log scale
  (linear within the median |effect|, logarithmic beyond, so the blob at the origin and the outliers both show);
  r, slope and the noise ceiling of each set kind written on the panel.
- top_k.png: per regime, the effect of removing each method's top-k set (signed so that the predicted direction
  is positive) against k, beside random sets of the same sizes where the ledger has them.
- lds.png: each method's LDS with its bootstrap 95% interval, per regime.
- reversal.png (studies with `reversal_ratios` rows): predicted against retrained ratio |reverse| / |forward| per
  entity with intervals, one panel per method, statistic and regime (`reports/reversal.py`).
- weight_change.png (studies with predicted weight changes): actual against predicted weight-change norms per
  parameter block, with the restricted (frozen-scope) effects beside the unrestricted ones (`reports/localisation.py`).
- detection.png (studies with known flipped labels, after `ifledger detect`): recall of the flipped points against
  the inspected fraction, per detection method, with 95% intervals over seeds; the report says which methods do
  not beat the training-loss baseline (`reports/detection.py`).
A study with `flagged` or `oracle` sets gets a cleaning table: per set, the predicted and actual effect on the
study's summary measurements (ids without a trailing example number, e.g. `query_loss/mean`, `query_accuracy`).
Reports are written to DIR/<ledger>/<study>/ (the ledger's file name and a hash of its path), so two ledgers do
not overwrite each other's reports."""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import store  # noqa: E402
from reports.detection import detection_section  # noqa: E402
from reports.localisation import localisation_rows, localisation_section  # noqa: E402
from reports.reversal import reversal_section  # noqa: E402
from reports.tables import (  # noqa: E402
    CALIBRATION_COLUMNS,
    METHOD_COLUMNS,
    format_value,
    markdown_table,
    method_rows,
    unreproduced_line,
)

WITH_INTERVALS = ("pearson", "spearman", "lds", "slope")
KIND_COLOURS = {"single": "tab:blue", "random": "tab:orange", "top_k": "tab:red", "top_k_baseline": "tab:pink",
                "group": "tab:green", "user": "tab:purple", "flagged": "tab:brown", "relabel": "tab:cyan",
                "oracle": "tab:olive"}
REGIME_ORDER = ("scratch", "warm", "pbrf")
PBRF_NOTE = ("A `pbrf` run has converged when, over its last 5 iterations, no accepted step moved θ by more than "
             "1e-8·‖θ − θ*‖. A run that has not converged stopped at the recipe's `pbrf_steps` short of the PBRF "
             "optimum: its outcome approximates the proximal Bregman response rather than being it, so an estimator "
             "scored against it is scored against a partly trained target. `n_converged` of `n_runs` says how much "
             "of each `pbrf` row rests on converged runs; raise `pbrf_steps` to converge more, or score converged runs "
             "alone with `ifledger calibrate --converged-only` (and `ifledger report --converged-only`).")


def report_folder(db: str | Path, study: str, out_dir: Path) -> Path:
    """DIR/<ledger file stem>-<8 hex of its absolute path>/<study>."""
    path = Path(db).resolve()
    return Path(out_dir) / f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}" / study


def _calibration_table(columns: list[str], rows: list[tuple]) -> str:
    """The calibration rows with each interval beside its estimate: `0.91 [0.88, 0.93]`."""
    shown = [c for c in CALIBRATION_COLUMNS if c in columns and any(r[columns.index(c)] is not None for r in rows)]
    out = []
    for row in rows:
        r = dict(zip(columns, row))
        cells = []
        for c in shown:
            text = format_value(r[c])
            if c in WITH_INTERVALS and r.get(f"{c}_lo") is not None and text:
                text += f" [{format_value(r[f'{c}_lo'])}, {format_value(r[f'{c}_hi'])}]"
            cells.append(text)
        out.append(tuple(cells))
    return markdown_table(shown, out)


def _regimes(found: set[str]) -> list[str]:
    return sorted(found, key=lambda r: (REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER), r))


def _symlog_ticks(linthresh: float, edge: float) -> list[float]:
    """0 and ± powers of ten from the linear threshold out to `edge`, at most three a side (readable labels)."""
    first, last = int(np.floor(np.log10(linthresh))), int(np.ceil(np.log10(max(edge, linthresh))))
    decades = list(range(first, last + 1))
    step = max(1, int(np.ceil(len(decades) / 3)))
    powers = [10.0**d for d in decades[::-1][::step]][::-1]
    return [-p for p in powers[::-1]] + [0.0] + powers


def _calibration_figure(points: list[tuple], calibration: list[dict], path: Path) -> None:
    """Rows methods, columns regimes; see the module docstring."""
    methods = sorted({p[0] for p in points})
    regimes = _regimes({p[1] for p in points})
    values = np.abs([v for p in points for v in p[3:5]])
    linthresh = float(np.median(values[values > 0])) if (values > 0).any() else 1.0
    # one range for every panel, from the points (not from autoscaled limits, which a shared axis grows panel by
    # panel once the y = x line is drawn to them)
    edge = 1.3 * max(float(values.max()) if values.size else 1.0, linthresh)
    fig, axes = plt.subplots(len(methods), len(regimes), figsize=(3.3 * len(regimes) + 0.6, 3.0 * len(methods)),
                             squeeze=False, sharex=True, sharey=True)
    for i, method in enumerate(methods):
        for j, regime in enumerate(regimes):
            ax = axes[i, j]
            lines = []
            for kind in sorted({p[2] for p in points if p[0] == method and p[1] == regime}):
                mine = np.array([p[3:6] for p in points if p[:3] == (method, regime, kind)], float)
                se = np.nan_to_num(mine[:, 2])
                colour = KIND_COLOURS.get(kind, "tab:gray")
                ax.errorbar(mine[:, 0], mine[:, 1], yerr=se, fmt="none", elinewidth=0.4, alpha=0.2, color=colour)
                ax.plot(mine[:, 0], mine[:, 1], "o", ms=2.2, alpha=0.55, color=colour, label=kind)
                row = next((c for c in calibration if (c["method"], c["regime"], c["set_kind"]) ==
                            (method, regime, kind)), None)
                if row:
                    lines.append(f"{kind}: r {format_value(row['pearson'])}, slope {format_value(row['slope'])}"
                                 f", ceiling {format_value(row['noise_ceiling'])}")
            ax.plot([-edge, edge], [-edge, edge], color="black", lw=0.7, zorder=0)
            ax.axhline(0, color="grey", lw=0.4, zorder=0)
            ax.axvline(0, color="grey", lw=0.4, zorder=0)
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_yscale("symlog", linthresh=linthresh)
            ax.set_xlim(-edge, edge)
            ax.set_ylim(-edge, edge)
            ticks = _symlog_ticks(linthresh, edge)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.minorticks_off()
            ax.text(0.03, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=6.5,
                    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(regime, fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{method}\nactual effect", fontsize=8)
            if i == len(methods) - 1:
                ax.set_xlabel("predicted effect", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) or 1, fontsize=8, frameon=False,
               title=f"set kind (±1 se bars; y = x line; symmetric log beyond |effect| {linthresh:.2g})",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _top_k_figure(moved: list[tuple], path: Path) -> None:
    """Per regime: effect in the predicted direction against k for each ranking method, and random sets of the
    same sizes (mean |effect|) where there are any."""
    regimes = _regimes({m[0] for m in moved})
    fig, axes = plt.subplots(1, len(regimes), figsize=(3.6 * len(regimes), 3.2), squeeze=False, sharey=True)
    for ax, regime in zip(axes.flat, regimes):
        sizes = {k for r, m, k, *_ in moved if r == regime and m != "random"}
        for method in sorted({m for r, m, *_ in moved if r == regime}):
            pts = sorted((k, y) for r, m, k, y, _ in moved if r == regime and m == method and k in sizes)
            if pts:
                ax.plot(*zip(*pts), "s--" if method == "random" else "o-", ms=4,
                        label="random sets, same sizes (mean |effect|)" if method == "random" else method,
                        color="grey" if method == "random" else None)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xticks(sorted(sizes), [str(k) for k in sorted(sizes)])
        ax.minorticks_off()
        ax.set_title(regime, fontsize=10)
        ax.set_xlabel("k (points removed)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("mean effect in the predicted direction", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lds_figure(calibration: list[dict], path: Path) -> None:
    """Each method's LDS with its 95% interval, one colour per regime."""
    rows = [c for c in calibration if c["lds"] is not None]
    methods = sorted({c["method"] for c in rows})
    regimes = _regimes({c["regime"] for c in rows})
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(methods) * len(regimes) + 1.2))
    for j, regime in enumerate(regimes):
        for i, method in enumerate(methods):
            c = next((c for c in rows if (c["method"], c["regime"]) == (method, regime)), None)
            if c is None:
                continue
            y = i * (len(regimes) + 1) + j
            lo, hi = c["lds_lo"], c["lds_hi"]
            err = [[c["lds"] - lo], [hi - c["lds"]]] if lo is not None else None
            ax.errorbar(c["lds"], y, xerr=err, fmt="o", ms=4, capsize=3, color=f"C{j}",
                        label=regime if i == 0 else None)
    ax.set_yticks([i * (len(regimes) + 1) + (len(regimes) - 1) / 2 for i in range(len(methods))], methods)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("LDS (Spearman across random subsets, averaged over measurements) with 95% interval", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, title="regime", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(db: str | Path, study: str, out_dir: Path, converged_only: bool = False) -> Path:
    """Write report_folder(db, study, out_dir)/report.md and its figures from the ledger (with `converged_only`,
    from the effects of converged runs alone, in its subfolder converged-only/); return the Markdown path."""
    folder = report_folder(db, study, out_dir) / ("converged-only" if converged_only else "")
    folder.mkdir(parents=True, exist_ok=True)
    these = {"study": study, "converged": converged_only}
    with store.read_only(db, sandbox=False) as con:
        columns, rows = store.calibration_table(con, study, False, converged_only)
        _, moved = store.fetch(con, "SELECT regime, ranked_by, k, moved, sets FROM top_k_effects_of($converged) "
                                    "WHERE study = $study ORDER BY ALL", these)
        brittle_cols, brittle = store.fetch(
            con, "SELECT method, ranked_by, regime, k, n, predicted_flip_rate, observed_flip_rate, agreement "
                 "FROM brittleness_of($converged) WHERE study = $study", these)
        _, points = store.fetch(
            con, "SELECT method, regime, set_kind, predicted, actual, actual_se "
                 "FROM prediction_accuracy_of($converged) WHERE study = $study AND NOT post_hoc", these)
        _, runs = store.fetch(
            con, "SELECT CASE WHEN rs.kind = 'full' THEN 'full data' ELSE 'removal sets' END, r.regime, r.status, "
                 "count(*), count(*) FILTER (WHERE NOT r.converged) FROM runs r JOIN studies s USING (study_hash) "
                 "JOIN removal_sets rs USING (set_id) WHERE s.study = ? GROUP BY ALL ORDER BY ALL", [study])
        _, failures = store.fetch(
            con, "SELECT r.regime, r.seed, r.reason FROM runs r JOIN studies s USING (study_hash) "
                 "WHERE s.study = ? AND r.status = 'failed' ORDER BY ALL LIMIT 20", [study])
        post_hoc = store.post_hoc_predictions(con, study)
        unreproduced = store.unreproduced_models(con, study)
        entry = store.studies(con, study)[-1]
        methods = method_rows(store.method_configs(con, entry["study_hash"]), entry["recipe"].get("weight_decay"))
        reversal_cols, reversal = store.fetch(con, "SELECT * FROM reversal_ratios WHERE study = ?", [study])
        localisation = localisation_rows(con, study)
        detection_columns, detection_rows = store.detection_table(con, study)
        cleaning_columns, cleaning = store.fetch(
            con, "SELECT pa.regime, rs.label AS set, pa.set_size AS size, pa.measurement_id, pa.method, pa.predicted, "
                 "pa.actual, pa.actual_se, pa.n_seeds FROM prediction_accuracy_of($converged) pa "
                 "JOIN removal_sets rs USING (set_id) WHERE pa.study = $study AND pa.set_kind IN ('flagged', 'oracle') "
                 "AND NOT pa.post_hoc AND NOT regexp_matches(pa.measurement_id, '/[0-9]+$') ORDER BY ALL", these)
    calibration = [dict(zip(columns, r)) for r in rows]
    detection = [dict(zip(detection_columns, r)) for r in detection_rows]
    text = [f"# ifledger report: {study}", "", f"Ledger: `{Path(db).resolve()}`.", "",
            "Effect = measurement(without the set) − measurement(full data), averaged over paired seeds. "
            "Pre-registered predictions only"
            + (", scored against converged runs only (`--converged-only`: a paired effect keeps the seeds whose run "
               "and full-data run both converged)" if converged_only else "")
            + ". `noise_ceiling` = √reliability of the seed-averaged effects (an "
            "intraclass correlation over seeds): the Pearson the true effects would reach against them; a predictor "
            "independent of the seeds' noise stays below it but by sampling error. Methods that average over the "
            "same seed models as the retraining (`models=N`, the default) are not independent of it: where the "
            "spread over seeds is itself predictable from those models (warm and pbrf start from them), they can "
            "exceed the ceiling.", "",
            "Bracketed: bootstrap 95% intervals (removal sets and measurements resampled). `lds`: the linear "
            "datamodeling score (Spearman across random subsets within a measurement, averaged over measurements).",
            ""]
    if unreproduced:
        text += [f"**{unreproduced_line({r['seed']: r['retrained_relative_distance'] for r in unreproduced})}.** "
                 "The calibration's `scratch` rows score those seeds' predictions against effects on the recipe's "
                 "model.", ""]
    wd, damping = entry["recipe"].get("weight_decay"), entry["recipe"].get("damping")
    if wd is not None and damping is not None:
        text += ["## Methods", "",
                 f"The recipe's damping λ = {damping:g} is added on top of its weight decay wd = {wd:g}: the curvature "
                 f"the estimators invert is G + (wd + λ)I, a total shift of {wd + damping:g} (and PBRF's proximity "
                 "term is (wd + λ)/2 alike). Each method's scores average the full-data models of the seeds named.",
                 "", markdown_table(METHOD_COLUMNS, methods), ""]
    text += ["## Calibration", "", _calibration_table(columns, rows), ""]
    if post_hoc:
        text += [f"Left out: {sum(post_hoc.values()):,} post-hoc predictions "
                 f"({', '.join(f'{n:,} of {m}' for m, n in post_hoc.items())}), registered after their outcomes "
                 "existed; `ifledger calibrate --include-post-hoc` scores them.", ""]
    if any(c["n_runs"] for c in calibration):
        text += [PBRF_NOTE, ""]
    text += ["## Runs", "", markdown_table(["models of", "regime", "status", "runs", "not converged"], runs), ""]
    if failures:
        text += ["## Failed runs (first 20)", "", markdown_table(["regime", "seed", "reason"], failures), ""]
    if points:
        _calibration_figure(points, calibration, folder / "calibration.png")
        text += ["## Predicted against actual", "",
                 "Rows: methods; columns: regimes. Bars: ±1 standard error of the seed-mean effect. On each panel, "
                 "per set kind: Pearson r, the least-squares slope of actual on predicted (1 when calibrated) and the "
                 "noise ceiling.", "", "![predicted against actual effect](calibration.png)", ""]
    if any(c["lds"] is not None for c in calibration):
        _lds_figure(calibration, folder / "lds.png")
        text += ["## Linear datamodeling score", "", "![LDS per method with 95% intervals](lds.png)", ""]
    if any(m != "random" for _, m, _, _, _ in moved):
        _top_k_figure(moved, folder / "top_k.png")
        sizes = {k for _, m, k, _, _ in moved if m != "random"}
        baseline = {k for _, m, k, _, _ in moved if m == "random"} & sizes
        text += ["## Removing the most influential points", "",
                 "Mean effect of removing each method's top-k set on the measurement it was ranked against, signed so "
                 "that the predicted direction is positive, beside the mean |effect| of random sets of the same size "
                 "(a generous baseline)"
                 + (f"; no random sets of size {', '.join(map(str, sorted(sizes - baseline)))} are registered "
                    "(their top_k sets were registered with `random=0`; register them again with `random=10`)"
                    if sizes - baseline else "") + ".", "",
                 markdown_table(["regime", "ranked by", "k", "mean effect in the predicted direction", "sets"],
                                [m for m in moved if m[2] in sizes]),
                 "", "![top-k effects](top_k.png)", ""]
    text += reversal_section([dict(zip(reversal_cols, r)) for r in reversal], folder)
    text += localisation_section(localisation, folder)
    if brittle:
        text += ["## Brittleness of top-k removals", "",
                 "Share of correctly decided margin measurements whose decision flips when the k points ranked "
                 "as supporting it are removed: predicted (first order) against observed.", "",
                 markdown_table(brittle_cols, brittle), ""]
    if cleaning:
        text += ["## Cleaning flagged points", "",
                 "Removing or relabelling the points a detection score flags (`flagged:by=METHOD,p=P`, relabelled to "
                 "the full-data models' predicted class), beside a random p% (`by=random`) and the known mislabelled "
                 "points (`oracle`, which reads the true labels). A measurement without a gradient (an accuracy) is "
                 "predicted 0 by every influence method; its actual change is measured all the same. The calibration "
                 "rows of set kinds `flagged` and `oracle` above score these predictions.", "",
                 markdown_table(cleaning_columns, cleaning), ""]
    if detection:
        text += detection_section(detection, folder)
    path = folder / "report.md"
    path.write_text("\n".join(text))
    return path
