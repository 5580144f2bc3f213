"""`ifledger status`: the queue per study and regime with an ETA. Reads the ledger only; imports neither torch
nor Prefect, so it answers in well under a second."""

from __future__ import annotations

import datetime as dt

import store
from reports.tables import unreproduced_line
from store import InputError

STATES = ("pending", "running", "done", "failed")
BUDGET = {"scratch": "epochs", "warm": "warm_epochs", "pbrf": "pbrf_steps"}  # recipe field: a model's steps


def _eta(models_left: int, seconds_per_model: float | None) -> str | None:
    if seconds_per_model is None:
        return None
    return str(dt.timedelta(seconds=round(seconds_per_model * models_left)))


def verify_status(db: str, study_name: str | None = None) -> tuple[list[str], list[tuple]]:
    """Per study and regime (the study's default regimes and any with runs): jobs pending, running, done and
    failed; `seconds_per_model`, the wall-clock pace of the verify that last finished runs of the regime
    (models finished / seconds from its first claim to its last finish); and `eta` = pace × (pending + running).
    A regime with no finished run yet borrows the pace of a measured regime per training step (scaled by the
    recipe's budgets) and its ETA is marked `~`."""
    with store.read_only(db, sandbox=False) as con:
        registered = store.studies(con, study_name)
        if study_name and not registered:
            raise InputError(f"study {study_name!r} has nothing registered in {db}; "
                             f"run `ifledger register {study_name}`")
        rows = []
        for entry in registered:
            h = entry["study_hash"]
            regimes = list(dict.fromkeys([*(entry["default_regimes"] or ()), *store.regimes_run(con, h)]))
            states = store.job_states(con, h, store.trainable_seeds(con, h, store.full_set_id(h)), regimes)
            measured = store.recent_throughput(con, h)
            steps = {r: entry["recipe"].get(BUDGET.get(r, ""), 1) or 1 for r in regimes}
            per_step = [seconds / (n * steps.get(r, 1)) for r, (n, seconds) in measured.items() if n and seconds > 0]
            for regime in regimes:
                counts = [sum(state == k for _, _, r, state, _ in states if r == regime) for k in STATES]
                n, seconds = measured.get(regime, (0, 0.0))
                if n and seconds > 0:
                    pace, eta = seconds / n, _eta(counts[0] + counts[1], seconds / n)
                elif per_step:
                    pace = per_step[0] * steps[regime]
                    eta = "~" + _eta(counts[0] + counts[1], pace)
                else:
                    pace, eta = None, None
                rows.append((entry["study"], h, regime, *counts, pace, eta))
    return ["study", "study_hash", "regime", *STATES, "seconds_per_model", "eta"], rows


def unreproduced_notes(db: str, study_name: str | None = None) -> list[str]:
    """One line per study with supplied models that the recipe does not reproduce (`supplied_models`)."""
    with store.read_only(db, sandbox=False) as con:
        rows = store.unreproduced_models(con, study_name)
    return [f"{next(r['study'] for r in rows if r['study_hash'] == h)} ({h}): "
            + unreproduced_line({r["seed"]: r["retrained_relative_distance"] for r in rows if r["study_hash"] == h})
            for h in dict.fromkeys(r["study_hash"] for r in rows)]
