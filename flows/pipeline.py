"""Prefect flows: register, verify, calibrate, run. They orchestrate plain functions from the layers
below; tasks compute and return records, and the flow is the only writer to the ledger."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import version
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

import store
from predictions import Method, SetSpec, build, parse, parse_method, predict, top_k
from reports import write_report
from retrain import Study, load_study
from retrain.regimes import REGIMES, Job, params_from_bytes, params_to_bytes, run_regime, train_full
from store import InputError, RemovalSetRecord, RunRecord


@cache
def code_version() -> str:
    """Package version, plus the git commit when run from a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except OSError:
        commit = ""
    return f"ifledger {version('ifledger')}" + (f"+g{commit}" if commit else "")


@dataclass(frozen=True)
class Plan:
    """A validated request: everything is checked before the ledger is opened for writing."""

    study: Study
    methods: list[Method]
    sets: list[RemovalSetRecord]
    top_k: list[SetSpec]  # built once the methods' scores exist
    regimes: list[str]


def plan(study_spec: str, methods: Sequence[str] | None = None, sets: Sequence[str] | None = None,
         regimes: Sequence[str] | None = None) -> Plan:
    """Resolve and validate a study with its methods, removal-set specs and regimes."""
    study = load_study(study_spec)
    for r in regimes or ():
        if r not in REGIMES:
            raise InputError(f"unknown regime {r!r}; use one of {', '.join(REGIMES)}")
    specs = [parse(text) for text in (sets or study.default_sets)]
    chosen = [parse_method(m, study) for m in (methods or study.default_methods)]
    for spec in specs:
        if spec.kind == "top_k" and spec.options["method"] not in ("", *(m.name for m in chosen)):
            raise InputError(f"{spec.text}: ranks by {spec.options['method']!r}, which is not among --methods")
    built = [s for spec in specs for s in build(spec, study)]
    return Plan(study, chosen, built, [s for s in specs if s.kind == "top_k"], list(regimes or study.default_regimes))


@task(cache_policy=NONE)
def train_full_task(study: Study, seeds: list[int]) -> tuple[dict[int, bytes], list[RunRecord]]:
    with tqdm(total=study.recipe.epochs * len(seeds), desc=f"{study.name}: full-data models", unit="model-epoch",
              leave=False) as bar:
        params, records = train_full(study, seeds, store.full_set_id(study.study_hash),
                                     progress=lambda n: bar.update(n * len(seeds)))
    return {s: params_to_bytes(p) for s, p in params.items()}, records


@task(cache_policy=NONE)
def scores_task(study: Study, method: Method, thetas: torch.Tensor) -> torch.Tensor:
    return method.scores(study, thetas)


@task(cache_policy=NONE)
def regime_task(study: Study, regime: str, jobs: list[Job], full_params: dict[int, torch.Tensor],
                bar: tqdm | None = None) -> list[RunRecord]:
    return run_regime(study, regime, jobs, full_params,
                      progress=(lambda n: bar.update(n * len(jobs))) if bar is not None else None)


def _full_models(study: Study, db: str) -> dict[int, torch.Tensor]:
    """The full-data model of every seed whose training did not fail: from the ledger's cache, training the
    missing ones (failures are recorded as failed runs). Refuses when every seed failed."""
    seeds = list(range(study.recipe.seeds))
    with store.connect(db) as con:
        cached = store.load_models(con, study.study_hash)
        _, failed = store.fetch(con, "SELECT seed, reason FROM runs WHERE set_id = ? AND regime = 'scratch' "
                                     "AND status = 'failed'", [store.full_set_id(study.study_hash)])
    reasons = dict(failed)
    missing = [s for s in seeds if s not in cached and s not in reasons]
    if missing:
        blobs, records = train_full_task(study, missing)
        reasons.update({r.seed: r.reason for r in records if r.status == "failed"})
        with store.connect(db) as con:
            store.save_models(con, study.study_hash, {s: b for s, b in blobs.items() if s not in reasons})
            store.record_runs(con, records)
        cached.update(blobs)
    if all(s in reasons for s in seeds):
        raise InputError(f"every full-data model of {study.name} failed ({reasons[seeds[0]]}); "
                         "fix the study's recipe (e.g. a smaller learning rate)")
    return {s: params_from_bytes(cached[s]) for s in seeds if s not in reasons}


@dataclass
class RegisterSummary:
    study: str
    study_hash: str
    sets: int
    predictions_added: int
    methods: list[str] = field(default_factory=list)


@flow(name="register")
def register_flow(request: Plan, db: str) -> RegisterSummary:
    """Train (or load) the full-data models, build removal sets, and register every method's predictions
    in one transaction before any removal is retrained."""
    study = request.study
    with store.connect(db) as con:
        store.register_study(con, study.record())
    full = _full_models(study, db)
    thetas = torch.stack([full[s] for s in sorted(full)])
    # one method at a time: torch.func transforms are not thread-safe
    scores = {m.name: scores_task(study, m, thetas) for m in request.methods}
    ranked = [s for spec in request.top_k for s in top_k(spec, study, scores)]
    sets = list({s.set_id: s for s in reversed([*request.sets, *ranked])}.values())  # one record per set id
    records = [r for m in request.methods for r in predict(study, m, scores[m.name], sets)]
    with store.connect(db) as con:
        store.register_removal_sets(con, sets)
        added = store.register_predictions(con, records, code_version())
    return RegisterSummary(study.name, study.study_hash, len(sets), added, [m.name for m in request.methods])


@dataclass
class VerifySummary:
    done: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@flow(name="verify")
def verify_flow(db: str, study_name: str | None = None, regimes: Sequence[str] | None = None,
                chunk_size: int = 64) -> VerifySummary:
    """Retrain every pending (set, seed, regime) in chunks of many models per task; write each chunk's
    records as it finishes. A rerun does only what is missing. One task runs at a time: torch.func transforms
    are not thread-safe, and each task already uses every core."""
    summary = VerifySummary()
    with store.read_only(db, sandbox=False) as con:
        registered = store.studies(con, study_name)
    if study_name and not registered:
        raise InputError(f"study {study_name!r} has nothing registered in {db}; run `ifledger register {study_name}`")
    for entry in registered:
        study = load_study(entry["source"])
        if study.study_hash != entry["study_hash"]:
            summary.skipped.append(f"{entry['study']} {entry['study_hash']}: its code or data changed since "
                                   f"registration (now {study.study_hash}); its pending runs were left alone")
            continue
        full = _full_models(study, db)
        with store.read_only(db, sandbox=False) as con:
            pending = store.pending_jobs(con, study.study_hash, sorted(full), regimes or study.default_regimes)
            indices = store.removal_set_indices(con, sorted({p[0] for p in pending}))
        chunks = []
        for regime in dict.fromkeys(p[2] for p in pending):
            jobs = [Job(s, seed, indices[s]) for s, seed, r in pending if r == regime]
            chunks += [(regime, jobs[i : i + chunk_size]) for i in range(0, len(jobs), chunk_size)]
        steps = {"scratch": study.recipe.epochs, "warm": study.recipe.warm_epochs, "pbrf": study.recipe.pbrf_steps}
        total = sum(steps[r] * len(j) for r, j in chunks)
        with tqdm(total=total, desc=f"{study.name}: retraining {len(pending)} models", unit="model-epoch",
                  disable=None) as bar, ThreadPoolTaskRunner(max_workers=1) as runner:
            futures = {runner.submit(regime_task, {"study": study, "regime": r, "jobs": j, "full_params": full,
                                                   "bar": bar}): (r, j) for r, j in chunks}
            for future in as_completed(list(futures)):
                try:
                    records = future.result()
                except Exception as e:  # a crashed task: its runs are recorded as failed, the flow goes on
                    regime, jobs = futures[future]
                    reason = f"task failed: {type(e).__name__}: {e}"
                    records = [RunRecord(study.study_hash, j.set_id, j.seed, regime, "failed", reason) for j in jobs]
                with store.connect(db) as con:
                    store.record_runs(con, records)
                summary.done += sum(r.status == "done" for r in records)
                summary.failed += sum(r.status == "failed" for r in records)
                summary.reasons += [r.reason for r in records if r.reason]
    return summary


@flow(name="calibrate")
def calibrate_flow(db: str, study_name: str | None = None) -> tuple[list[str], list[tuple]]:
    """The calibration view (pre-registered predictions against each regime's effects)."""
    with store.read_only(db, sandbox=False) as con:
        return store.fetch(con, "SELECT * FROM calibration WHERE $s IS NULL OR study = $s", {"s": study_name})


@dataclass
class RunSummary:
    register: RegisterSummary
    verify: VerifySummary
    calibration: tuple[list[str], list[tuple]]
    report: Path


@flow(name="run")
def run_flow(request: Plan, db: str, report_dir: str, chunk_size: int = 64) -> RunSummary:
    """register -> verify -> calibrate -> report, for one study."""
    registered = register_flow(request, db)
    verified = verify_flow(db, request.study.name, request.regimes, chunk_size)
    calibration = calibrate_flow(db, request.study.name)
    report = write_report(db, request.study.name, Path(report_dir))
    return RunSummary(registered, verified, calibration, report)
