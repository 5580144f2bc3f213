"""The per-study report: the calibration table and predicted-vs-actual scatter plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import store  # noqa: E402

CALIBRATION_COLUMNS = ("method", "regime", "set_kind", "n", "pearson", "spearman", "noise_ceiling",
                       "pearson_by_measurement", "spearman_by_measurement", "sign_agreement", "n_sign", "slope",
                       "intercept", "mean_seeds")


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


def write_report(db: str | Path, study: str, out_dir: Path) -> Path:
    """Write `out_dir/<study>/report.md` (+ scatter.png) from the ledger; return the Markdown path."""
    folder = Path(out_dir) / study
    folder.mkdir(parents=True, exist_ok=True)
    with store.read_only(db, sandbox=False) as con:
        _, calibration = store.fetch(
            con, f"SELECT {', '.join(CALIBRATION_COLUMNS)} FROM calibration WHERE study = ?", [study])
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
            "## Calibration", "", markdown_table(list(CALIBRATION_COLUMNS), calibration), "",
            "## Runs", "", markdown_table(["regime", "status", "runs", "not converged"], runs), ""]
    if failures:
        text += ["## Failed runs (first 20)", "", markdown_table(["regime", "seed", "reason"], failures), ""]
    if points:
        _scatter(points, folder / "scatter.png")
        text += ["## Predicted vs actual", "", "![predicted vs actual effect](scatter.png)", ""]
    path = folder / "report.md"
    path.write_text("\n".join(text))
    return path
