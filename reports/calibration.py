"""Intervals and comparisons for the `calibration` table, read through the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import store
from reports.stats import REPLICATES, Comparison, Pairs, bootstrap_intervals, compare
from store import InputError

GROUP = ("study_hash", "method", "config_hash", "regime", "set_kind")


def _accuracy(db: str | Path, include_post_hoc: bool, converged_only: bool, study: str | None = None,
              method: str | None = None) -> dict[tuple, list[tuple]]:
    """(study_hash, method, config_hash, regime, set_kind) -> {(set_id, measurement_id): (predicted, actual,
    measurement_id, set_id)}."""
    with store.read_only(db, sandbox=False) as con:
        _, rows = store.fetch(
            con, f"SELECT {', '.join(GROUP)}, set_id, predicted, actual, measurement_id "
                 "FROM prediction_accuracy_of($converged) WHERE ($post OR NOT post_hoc) "
                 "AND ($study IS NULL OR study = $study) AND ($method IS NULL OR method = $method) "
                 "ORDER BY set_id, measurement_id",
            {"post": include_post_hoc, "converged": converged_only, "study": study, "method": method})
    groups: dict[tuple, dict[tuple, tuple]] = {}
    for r in rows:
        groups.setdefault(r[:5], {})[(r[5], r[8])] = (*r[6:], r[5])
    return groups


def interval_rows(db: str | Path, include_post_hoc: bool = False, converged_only: bool = False,
                  replicates: int = REPLICATES) -> list[dict[str, Any]]:
    """Bootstrap intervals for every calibration group, as rows of `calibration_intervals`."""
    out = []
    for key, rows in _accuracy(db, include_post_hoc, converged_only).items():
        intervals = bootstrap_intervals(Pairs.of(list(rows.values())), replicates)
        bounds = {f"{m}_{end}": v for m, (lo, hi, _) in intervals.items() for end, v in (("lo", lo), ("hi", hi))}
        out.append(dict(zip(GROUP, key), include_post_hoc=include_post_hoc, converged_only=converged_only,
                        n=len(rows), replicates=replicates,
                        nonfinite_replicates=max(i.nonfinite for i in intervals.values()), **bounds))
    return out


def compare_methods(db: str | Path, a: str, b: str, study: str | None = None, include_post_hoc: bool = False,
                    converged_only: bool = False, replicates: int = REPLICATES) -> list[tuple[str, str, Comparison]]:
    """Paired two-way bootstrap of method A against method B per (regime, set kind) and metric, over the
    (set, measurement) pairs both predicted. The estimates reported are the `calibration` view's when both methods
    predicted the same pairs (otherwise they are computed on the shared pairs, as the interval is)."""
    rows_a, rows_b = (_accuracy(db, include_post_hoc, converged_only, study, m) for m in (a, b))
    if not rows_a or not rows_b:
        missing = a if not rows_a else b
        with store.read_only(db, sandbox=False) as con:
            post_hoc = store.post_hoc_predictions(con, study).get(missing, 0)
        if post_hoc and not include_post_hoc:
            raise InputError(f"method {missing!r} has only post-hoc predictions ({post_hoc:,} registered after their "
                             "outcomes existed), left out unless --include-post-hoc")
        raise InputError(f"method {missing!r} has no verified predictions to compare; see `ifledger calibrate`")
    with store.read_only(db, sandbox=False) as con:
        columns, rows = store.calibration_table(con, study, include_post_hoc, converged_only)
    view = {(r["study_hash"], r["method"], r["config_hash"], r["regime"], r["set_kind"]): r
            for r in (dict(zip(columns, row)) for row in rows)}
    out = []
    for key_a, pairs_a in sorted(rows_a.items()):
        study_hash, _, _, regime, kind = key_a
        for key_b, pairs_b in rows_b.items():
            h, _, _, r, k = key_b
            if (h, r, k) != (study_hash, regime, kind):
                continue
            shared = sorted(pairs_a.keys() & pairs_b.keys())
            if len(shared) < 2:
                continue
            pa, pb = Pairs.of([pairs_a[s] for s in shared]), Pairs.of([pairs_b[s] for s in shared])
            metrics = ("lds",) if kind == "random" else ("pearson", "spearman")
            whole = len(shared) == len(pairs_a) == len(pairs_b)
            out += [(regime, kind, compare(pa, pb, m, replicates,
                                           estimates=(view[key_a][m], view[key_b][m]) if whole else None))
                    for m in metrics]
    return out
