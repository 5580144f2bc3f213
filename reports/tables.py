"""Tables as text: aligned for a terminal, Markdown for reports, CSV and JSON. No matplotlib here, so the
read-only commands that print tables start fast."""

from __future__ import annotations

import csv
import io
import json
import math

from store.records import SUPPLIED_TOLERANCE

# the calibration columns a reader looks at first, most important first (`calibrate` keeps as many as fit)
CALIBRATION_COLUMNS = ("method", "regime", "set_kind", "n", "pearson", "noise_ceiling", "slope", "lds", "spearman",
                       "n_converged", "sign_agreement", "n_sign", "pearson_by_measurement", "spearman_by_measurement",
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


def _widths(columns: list[str], rows: list[tuple]) -> list[int]:
    return [max([len(c)] + [len(format_value(r[i])) for r in rows]) for i, c in enumerate(columns)]


def aligned_table(columns: list[str], rows: list[tuple]) -> str:
    """Columns padded to their widest cell, a rule under the header, and a row count."""
    widths = _widths(columns, rows)
    cells = [columns] + [[format_value(v) for v in r] for r in rows]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n({len(rows)} row{'s' * (len(rows) != 1)})"


def formatted(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """`rows` as `table` (aligned text), `csv` or `json` (a list of objects)."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, r)) for r in rows], indent=2, default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    return aligned_table(columns, rows)


def fitting_columns(columns: list[str], rows: list[tuple], preferred: tuple[str, ...], width: int) -> list[str]:
    """The `preferred` columns present and not empty in every row, in that order, as many as an aligned table of
    `width` characters holds (always the first three)."""
    chosen: list[str] = []
    used = -2
    for c in (c for c in preferred if c in columns and any(r[columns.index(c)] is not None for r in rows)):
        w = _widths([c], [(r[columns.index(c)],) for r in rows])[0] + 2
        if len(chosen) >= 3 and used + w > width:
            break
        chosen.append(c)
        used += w
    return chosen


def select(columns: list[str], rows: list[tuple], keep: list[str]) -> tuple[list[str], list[tuple]]:
    """Only the columns `keep`, in that order."""
    index = [columns.index(c) for c in keep]
    return keep, [tuple(r[i] for i in index) for r in rows]


def unreproduced_line(seeds: dict[int, float | None]) -> str:
    """One line on supplied models the recipe does not reproduce, seed -> relative distance (None: the recipe's
    training of that seed failed)."""
    shown = ", ".join(f"seed {s} ({'retraining failed' if d is None else f'relative distance {d:.3g}'})"
                      for s, d in sorted(seeds.items()))
    return (f"supplied model not reproduced by the recipe (relative tolerance {SUPPLIED_TOLERANCE:g}): {shown}; "
            "predictions are made on it, but `scratch` retrains the recipe's model, so its scratch effects are "
            "about another model (seed_effects.other_model)")


METHOD_COLUMNS = ["method", "seeds averaged", "damping λ", "curvature shift wd + λ"]


def method_rows(configs: list[tuple[str, dict]], weight_decay: float | None) -> list[tuple]:
    """Per registered method configuration: the seeds whose full-data models its scores average (`seeds`, else the
    first `models`), its damping λ, and the total shift of the curvature, wd + λ (A = G + (wd + λ)I)."""
    rows = []
    for method, config in configs:
        seeds = config.get("seeds", list(range(config["models"]))) if "models" in config else None
        damping = config.get("damping")
        rows.append((method, "" if seeds is None else ", ".join(map(str, seeds)), damping,
                     None if damping is None or weight_decay is None else weight_decay + damping))
    return rows
