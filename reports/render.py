"""The per-study report: the calibration table and predicted-vs-actual scatter plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import store  # noqa: E402

CALIBRATION_COLUMNS = ("method", "regime", "set_kind", "n", "pearson", "spearman", "noise_ceiling", "lds",
                       "pearson_by_measurement", "spearman_by_measurement", "sign_agreement", "n_sign", "slope",
                       "intercept", "mean_seeds")
WITH_INTERVALS = ("pearson", "spearman", "lds", "slope")


def format_value(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(columns: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _scatter(points: dict[tuple[str, str, str], list[tuple[float, float]]], path: Path) -> None:
    """One panel per (method, regime, set kind): actual effect against predicted, with y = x."""
    n = len(points)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax, ((method, regime, kind), xy) in zip(axes.flat, sorted(points.items())):
        xs, ys = zip(*xy)
        ax.scatter(xs, ys, s=6, alpha=0.5)
        lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="y = x")
        ax.set(title=f"{method} vs {regime} ({kind})", xlabel="predicted effect", ylabel="actual effect")
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _calibration_table(columns: list[str], rows: list[tuple]) -> str:
    """The calibration rows with each interval beside its estimate: `0.91 [0.88, 0.93]`."""
    shown = [c for c in CALIBRATION_COLUMNS if c in columns]
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


def _top_k_plot(moved: list[tuple], path: Path) -> None:
    regimes = sorted({r for r, *_ in moved})
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.5 * len(regimes), 3.8), squeeze=False)
    for ax, regime in zip(axes.flat, regimes):
        for method in sorted({m for r, m, *_ in moved if r == regime}):
            pts = sorted((k, y) for r, m, k, y, _ in moved if r == regime and m == method)
            ax.plot(*zip(*pts), "o--" if method == "random" else "o-", label=method)
        ax.axhline(0, color="black", lw=0.6)
        ax.set(title=regime, xlabel="k (points removed)", ylabel="effect in the predicted direction")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(db: str | Path, study: str, out_dir: Path) -> Path:
    """Write `out_dir/<study>/report.md` (+ scatter.png) from the ledger; return the Markdown path."""
    folder = Path(out_dir) / study
    folder.mkdir(parents=True, exist_ok=True)
    with store.read_only(db, sandbox=False) as con:
        columns, calibration = store.fetch(con, "SELECT * FROM calibration WHERE study = ?", [study])
        _, moved = store.fetch(con, "SELECT regime, ranked_by, k, moved, sets FROM top_k_effects WHERE study = ? "
                                    "ORDER BY ALL", [study])
        brittle_cols, brittle = store.fetch(
            con, "SELECT method, ranked_by, regime, k, n, predicted_flip_rate, observed_flip_rate, agreement "
                 "FROM brittleness WHERE study = ?", [study])
        _, accuracy = store.fetch(
            con, "SELECT method, regime, set_kind, predicted, actual FROM prediction_accuracy "
                 "WHERE study = ? AND NOT post_hoc", [study])
        _, runs = store.fetch(
            con, "SELECT r.regime, r.status, count(*), count(*) FILTER (WHERE NOT r.converged) "
                 "FROM runs r JOIN studies s USING (study_hash) WHERE s.study = ? GROUP BY ALL ORDER BY ALL",
            [study])
        _, failures = store.fetch(
            con, "SELECT r.regime, r.seed, r.reason FROM runs r JOIN studies s USING (study_hash) "
                 "WHERE s.study = ? AND r.status = 'failed' ORDER BY ALL LIMIT 20", [study])
    points: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for method, regime, kind, predicted, actual in accuracy:
        points.setdefault((method, regime, kind), []).append((predicted, actual))
    text = [f"# ifledger report: {study}", "",
            "Effect = measurement(without the set) − measurement(full data), averaged over paired seeds. "
            "Pre-registered predictions only. `noise_ceiling` is the highest Pearson any predictor can reach "
            "against these seed-averaged effects (split-half, Spearman-Brown).", "",
            "Bracketed: bootstrap 95% intervals (removal sets and measurements resampled). `lds`: the linear "
            "datamodeling score (Spearman across random subsets within a measurement, averaged over measurements).",
            "",
            "## Calibration", "", _calibration_table(columns, calibration), "",
            "## Runs", "", markdown_table(["regime", "status", "runs", "not converged"], runs), ""]
    if failures:
        text += ["## Failed runs (first 20)", "", markdown_table(["regime", "seed", "reason"], failures), ""]
    if points:
        _scatter(points, folder / "scatter.png")
        text += ["## Predicted vs actual", "", "![predicted vs actual effect](scatter.png)", ""]
    if any(m != "random" for _, m, _, _, _ in moved):
        _top_k_plot(moved, folder / "top_k.png")
        text += ["## Removing the most influential points", "",
                 "Mean effect of removing each method's top-k set, signed so that the predicted direction is "
                 "positive, against the mean |effect| of random sets of the same size (a generous baseline).", "",
                 markdown_table(["regime", "ranked by", "k", "mean effect in the predicted direction", "sets"], moved),
                 "", "![top-k effects](top_k.png)", ""]
    if brittle:
        text += ["## Brittleness of top-k removals", "",
                 "Share of correctly decided margin measurements whose decision flips when the k points ranked "
                 "as supporting it are removed: predicted (first order) against observed.", "",
                 markdown_table(brittle_cols, brittle), ""]
    path = folder / "report.md"
    path.write_text("\n".join(text))
    return path
