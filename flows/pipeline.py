"""Prefect flows: register, verify, calibrate, run. They orchestrate plain functions from the layers
below; tasks compute and return records, and the flow is the only writer to the ledger."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import version
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner
from tqdm.auto import tqdm

import store
from predictions import Method, ModificationKind, build, parse, parse_method, predict, top_k
from predictions.detection import DETECTORS, detector
from predictions.imported import read_imported
from reports import write_report
from reports.calibration import compare_methods, interval_rows
from retrain import Study, load_study
from retrain.regimes import Job, Regime, full_model_records, params_from_bytes, parse_regime, run_regime, train_full
from store import InputError, ModelRecord, PredictionRecord, RemovalSetRecord, RunRecord, SelfInfluenceRecord


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
    top_k: list[ModificationKind]  # ranked kinds, built once the methods' scores exist
    regimes: list[str]


def plan(study_spec: str, methods: Sequence[str] | None = None, sets: Sequence[str] | None = None,
         regimes: Sequence[str] | None = None) -> Plan:
    """Resolve and validate a study with its methods, removal-set specs and regimes."""
    study = load_study(study_spec)
    for r in regimes or ():
        parse_regime(r)
    specs = [parse(text) for text in (sets or study.default_sets)]
    chosen = list({m.label: m for m in (parse_method(text, study) for text in methods or study.default_methods)
                   }.values())  # one per label: `exact` and `exact:models=5` are the same method on a 5-seed study
    for spec in specs:
        if spec.ranked and getattr(spec.options, "method", "") not in ("", *(m.label for m in chosen)):
            raise InputError(f"{spec.text}: ranks by {spec.options.method!r}, which is not among --methods")
    built = [s for spec in specs for s in build(spec, study)]
    return Plan(study, chosen, built, [s for s in specs if s.ranked], list(regimes or study.default_regimes))


@task(cache_policy=NONE)
def train_full_task(study: Study, seeds: list[int]) -> tuple[list[ModelRecord], list[RunRecord]]:
    with tqdm(total=study.recipe.epochs * len(seeds), desc=f"{study.name}: full-data models", unit="model-epoch",
              leave=False) as bar:
        params, records = train_full(study, seeds, store.full_set_id(study.study_hash),
                                     progress=lambda n: bar.update(n * len(seeds)))
    return full_model_records(study, params), records


@task(cache_policy=NONE)
def scores_task(study: Study, method: Method, thetas: torch.Tensor) -> torch.Tensor:
    return method.scores(study, thetas)


RUNNERS = ("thread", "process", "dask")
TASK_TIMEOUT_SECONDS = 4 * 3600  # one chunk's try; store.STALE_AFTER is longer than its tries together
_STUDIES: dict[str, Study] = {}  # source -> study, loaded once per process


def _study(source: str, study_hash: str | None = None) -> Study:
    """The study at `source`, cached in this process; loaded afresh when `study_hash` is None (the flow checks
    the hash against the ledger) or differs from the cached one's. (The flow must not name `_STUDIES` itself:
    Dask pickles the flow's function by value, and a user study's class cannot be unpickled in a worker.)"""
    study = _STUDIES.get(source)
    if study is None or study_hash is None or study.study_hash != study_hash:
        study = _STUDIES[source] = load_study(source)
    if study_hash is not None and study.study_hash != study_hash:
        raise RuntimeError(f"{source} changed while verifying (hash {study.study_hash}, expected {study_hash})")
    return study


@task(cache_policy=NONE, retries=1, retry_delay_seconds=5)
def regime_task(source: str, study_hash: str, regime: Regime, jobs: list[Job], full_params: dict[int, torch.Tensor],
                threads: int | None = None, bar: tqdm | None = None) -> list[RunRecord]:
    """Retrain one chunk. Arguments are picklable (the study travels as its `source`) for process and
    dask workers; `threads` caps torch's threads in a worker so that workers share the cores."""
    if threads:
        torch.set_num_threads(threads)
    return run_regime(_study(source, study_hash), regime, jobs, full_params,
                      progress=(lambda n: bar.update(n * len(jobs))) if bar is not None else None)


def _full_models(study: Study, db: str) -> dict[int, torch.Tensor]:
    """The full-data model of every seed whose training did not fail: from the ledger's cache, training the
    missing ones (failures are recorded as failed runs). Refuses when every seed failed."""
    seeds = list(range(study.recipe.seeds))
    with store.connect(db) as con:
        cached = store.load_models(con, study.study_hash)
        reasons = store.failed_full_seeds(con, study.study_hash, store.full_set_id(study.study_hash))
    missing = [s for s in seeds if s not in cached and s not in reasons]
    if missing:
        models, records = train_full_task(study, missing)
        reasons.update({r.seed: r.reason for r in records if r.status == "failed"})
        with store.connect(db) as con:
            store.save_models(con, [m for m in models if m.seed not in reasons])
            store.record_runs(con, records)
        cached.update({m.seed: m.params for m in models})
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
    scores = {m.label: scores_task(study, m, thetas) for m in request.methods}
    ranked = [s for spec in request.top_k for s in top_k(spec, study, scores)]
    sets = list({s.set_id: s for s in reversed([*request.sets, *ranked])}.values())  # one record per set id
    records = [r for m in request.methods for r in predict(study, m, scores[m.label], sets)]
    with store.connect(db) as con:
        store.register_removal_sets(con, sets)
        added = store.register_predictions(con, records, code_version())
    return RegisterSummary(study.name, study.study_hash, len(sets), added, [m.label for m in request.methods])


def task_slots(runner: str, workers: int | None, address: str | None) -> int:
    """How many retraining tasks run at once; refuses bad runner options. The thread runner keeps one:
    torch.func transforms are not thread-safe (and one task already uses every core)."""
    if runner not in RUNNERS:
        raise InputError(f"unknown runner {runner!r}; use one of {', '.join(RUNNERS)}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    if runner == "thread" and (workers or 1) > 1:
        raise InputError("the thread runner runs one task at a time (torch.func is not thread-safe); "
                         "use --runner process or --runner dask for several workers")
    if address and runner != "dask":
        raise InputError("--address names a Dask scheduler: use it with --runner dask")
    return 1 if runner == "thread" else workers or os.cpu_count() or 1


def task_runner(runner: str, slots: int, address: str | None) -> TaskRunner | None:
    """None for the thread runner: its one task at a time runs in the flow's own thread (torch's OpenMP pool
    is up to 1.6x slower when driven from a second thread while the main thread's pool spins)."""
    if runner == "thread":
        return None
    if runner == "process":
        return ProcessPoolTaskRunner(max_workers=slots)
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": slots, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@dataclass
class VerifySummary:
    done: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    elsewhere: int = 0  # jobs found done or running in another verify when this one came to claim them


def _retrain(db: str, study: Study, chunks: list[tuple[Regime, list[Job]]], full: dict[int, torch.Tensor],
             runner: str, slots: int, address: str | None, retry_failed: bool, summary: VerifySummary) -> None:
    """Submit the chunks, at most `slots` at a time. One short write per step: the chunk that finished
    (runs and outcomes in one transaction) and the chunks that start (claimed as `running`)."""
    total = sum(r.steps(study) * len(j) for r, j in chunks)
    threads = None if runner == "thread" else max(1, (os.cpu_count() or 1) // slots)
    # a timeout interrupts only a task in a worker process's main thread, so only the process runner sets one
    retrain = regime_task.with_options(timeout_seconds=TASK_TIMEOUT_SECONDS) if runner == "process" else regime_task
    waiting, active, finished = deque(chunks), [], []
    with tqdm(total=total, desc=f"{study.name}: retraining {sum(len(j) for _, j in chunks)} models",
              unit="model-epoch", disable=None) as bar, task_runner(runner, slots, address) or nullcontext() as pool:
        while True:
            starting = [waiting.popleft() for _ in range(min(slots - len(active), len(waiting)))]
            with store.connect(db) as con:
                store.record_runs(con, finished)
                claimed = set(store.start_runs(con, study.study_hash,
                                               [(j.set_id, j.seed, r.label) for r, jobs in starting for j in jobs],
                                               retry_failed))
            finished = []
            for regime, planned in starting:
                jobs = [j for j in planned if (j.set_id, j.seed, regime.label) in claimed]
                summary.elsewhere += len(planned) - len(jobs)
                bar.total -= regime.steps(study) * (len(planned) - len(jobs))
                if not jobs:
                    continue
                call = {"source": study.source, "study_hash": study.study_hash, "regime": regime, "jobs": jobs,
                        "full_params": full, "threads": threads, "bar": None if pool else bar}
                run = pool.submit(retrain, call) if pool else retrain(**call, return_state=True)  # a future or a state
                active.append((run, regime, jobs))
            if not active:
                if waiting:  # every chunk just planned was taken by another verify
                    continue
                return
            first = next(as_completed([a[0] for a in active])) if pool else active[0][0]
            future, regime, jobs = active.pop([a[0] for a in active].index(first))
            try:
                finished = future.result()
            except Exception as e:  # a task that failed every try: its runs are recorded as failed, the flow goes on
                reason = f"task failed: {type(e).__name__}: {e}"
                finished = [RunRecord(study.study_hash, j.set_id, j.seed, regime.label, "failed", reason)
                            for j in jobs]
            if runner != "thread":
                bar.update(regime.steps(study) * len(jobs))
            summary.done += sum(r.status == "done" for r in finished)
            summary.failed += sum(r.status == "failed" for r in finished)
            summary.reasons += [r.reason for r in finished if r.reason]


@flow(name="verify")
def verify_flow(db: str, study_name: str | None = None, regimes: Sequence[str] | None = None,
                chunk_size: int = 64, retry_failed: bool = False, runner: str = "thread",
                workers: int | None = None, address: str | None = None) -> VerifySummary:
    """Retrain every pending (set, seed, regime) in chunks of many models per task. A chunk's runs are
    `running` while it trains and are written with their outcomes in one transaction when it finishes, so a
    killed verify loses no finished chunk and a rerun does only what is missing (stale `running` included)."""
    slots = task_slots(runner, workers, address)
    summary = VerifySummary()
    with store.read_only(db, sandbox=False) as con:
        registered = store.studies(con, study_name)
    if study_name and not registered:
        raise InputError(f"study {study_name!r} has nothing registered in {db}; run `ifledger register {study_name}`")
    for entry in registered:
        study = _study(entry["source"])
        if study.study_hash != entry["study_hash"]:
            summary.skipped.append(f"{entry['study']} {entry['study_hash']}: its code or data changed since "
                                   f"registration (now {study.study_hash}); its pending runs were left alone")
            continue
        full = _full_models(study, db)
        chosen = {r.label: r for r in map(parse_regime, regimes or study.default_regimes)}
        with store.read_only(db, sandbox=False) as con:
            pending = store.pending_jobs(con, study.study_hash, sorted(full), list(chosen), retry_failed)
            indices = store.removal_set_indices(con, sorted({p[0] for p in pending}))
        chunks = []
        for label in dict.fromkeys(p[2] for p in pending):
            regime, jobs = chosen[label], [Job(s, seed, indices[s]) for s, seed, r in pending if r == label]
            chunks += [(regime, jobs[i : i + chunk_size]) for i in range(0, len(jobs), chunk_size)]
        if chunks:
            _retrain(db, study, chunks, full, runner, slots, address, retry_failed, summary)
    return summary


STATES = ("pending", "running", "done", "failed")


def verify_status(db: str, study_name: str | None = None) -> tuple[list[str], list[tuple]]:
    """Per study and regime (the study's default regimes and any with runs): how many jobs are pending,
    running, done and failed, the mean seconds per model of finished runs, and an ETA for the rest at that pace."""
    with store.read_only(db, sandbox=False) as con:
        registered = store.studies(con, study_name)
    if study_name and not registered:
        raise InputError(f"study {study_name!r} has nothing registered in {db}; run `ifledger register {study_name}`")
    defaults = {e["source"]: [parse_regime(r).label for r in load_study(e["source"]).default_regimes]
                for e in registered}  # outside the connection
    rows = []
    with store.read_only(db, sandbox=False) as con:
        for entry in registered:
            h = entry["study_hash"]
            seeds = store.trainable_seeds(con, h, store.full_set_id(h))
            regimes = list(dict.fromkeys([*defaults[entry["source"]], *store.regimes_run(con, h)]))
            states = store.job_states(con, h, seeds, regimes)
            for regime in regimes:
                mine = [(state, seconds) for _, _, r, state, seconds in states if r == regime]
                counts = [sum(state == k for state, _ in mine) for k in STATES]
                finished = [sec for state, sec in mine if state in ("done", "failed") and sec is not None]
                pace = sum(finished) / len(finished) if finished else None
                eta = None if pace is None else str(dt.timedelta(seconds=round(pace * (counts[0] + counts[1]))))
                rows.append((entry["study"], h, regime, *counts, pace, eta))
    return ["study", "study_hash", "regime", *STATES, "seconds_per_model", "eta"], rows


@flow(name="calibrate")
def calibrate_flow(db: str, study_name: str | None = None, include_post_hoc: bool = False
                   ) -> tuple[list[str], list[tuple]]:
    """Bootstrap intervals for every calibration group (stored in `calibration_intervals`), then the calibration
    table with them."""
    intervals = interval_rows(db, include_post_hoc)
    with store.connect(db) as con:
        store.save_calibration_intervals(con, intervals)
    with store.read_only(db, sandbox=False) as con:
        return store.calibration_table(con, study_name, include_post_hoc)


@flow(name="compare")
def compare_flow(db: str, a: str, b: str, study_name: str | None = None, include_post_hoc: bool = False
                 ) -> tuple[list[str], list[tuple]]:
    """Is method A better than B? Paired bootstrap over sets and measurements per regime, set kind and metric."""
    rows = [(regime, kind, c.metric, c.a, c.b, c.difference, c.lo, c.hi, c.verdict)
            for regime, kind, c in compare_methods(db, a, b, study_name, include_post_hoc)]
    return ["regime", "set_kind", "metric", a, b, "difference", "diff_lo", "diff_hi", "verdict"], rows


def read_predictions(db: str, study_spec: str, path: str, method: str
                     ) -> tuple[Study, list[RemovalSetRecord], list[PredictionRecord]]:
    """The study, new removal sets and predictions of a file of another library's predictions, the whole file
    validated before any flow starts (a refusal is one line, with no flow logs before it)."""
    study = load_study(study_spec)
    known: set[str] = set()
    if Path(db).exists():
        with store.read_only(db, sandbox=False) as con:
            known = store.removal_set_ids(con, study.study_hash)
    sets, records = read_imported(path, study, method, known)
    return study, sets, records


@flow(name="import-predictions")
def import_flow(db: str, study: Study, sets: list[RemovalSetRecord], records: list[PredictionRecord],
                method: str) -> RegisterSummary:
    """Register predictions made by another library (validated by `read_predictions`) as `imported:<method>`."""
    with store.connect(db) as con:
        store.register_study(con, study.record())
        store.register_removal_sets(con, sets)
        added = store.register_predictions(con, records, code_version())
    return RegisterSummary(study.name, study.study_hash, len({r.set_id for r in records}), added,
                           [f"imported:{method}"])


@task(cache_policy=NONE)
def self_influence_task(study: Study, method: str, thetas: torch.Tensor, seeds: list[int]) -> list[SelfInfluenceRecord]:
    scores = detector(method).scorer(study, thetas, seeds)
    config = detector(method).config(study, method)
    return [SelfInfluenceRecord(study.study_hash, method, config, s, tuple(scores[k].tolist()))
            for k, s in enumerate(seeds)]


def detect_plan(study_spec: str, methods: Sequence[str] | None = None) -> tuple[Study, list[str]]:
    """The study and the detection methods (default: all), refused before any flow starts."""
    chosen = list(dict.fromkeys(methods or DETECTORS))
    for name in chosen:
        detector(name)
    return load_study(study_spec), chosen


@flow(name="detect")
def detect_flow(study: Study, methods: list[str], db: str) -> tuple[list[str], list[tuple]]:
    """Score every training point of every full-data model with each detection method (self-influence and the
    loss and random baselines), store the scores in `self_influence`, and return the study's `detection` rows."""
    with store.connect(db) as con:
        store.register_study(con, study.record())
    full = _full_models(study, db)
    seeds = sorted(full)
    thetas = torch.stack([full[s] for s in seeds])
    records = [r for name in methods for r in self_influence_task(study, name, thetas, seeds)]
    with store.connect(db) as con:
        store.register_self_influence(con, records, code_version())
    with store.read_only(db, sandbox=False) as con:
        return store.detection_table(con, study.name)


@dataclass
class RunSummary:
    register: RegisterSummary
    verify: VerifySummary
    calibration: tuple[list[str], list[tuple]]
    report: Path


@flow(name="run")
def run_flow(request: Plan, db: str, report_dir: str, chunk_size: int = 64, runner: str = "thread",
             workers: int | None = None, address: str | None = None) -> RunSummary:
    """register -> verify -> calibrate -> report, for one study."""
    task_slots(runner, workers, address)  # refuse bad runner options before anything is written
    registered = register_flow(request, db)
    verified = verify_flow(db, request.study.name, request.regimes, chunk_size, runner=runner, workers=workers,
                           address=address)
    calibration = calibrate_flow(db, request.study.name)
    report = write_report(db, request.study.name, Path(report_dir))
    return RunSummary(registered, verified, calibration, report)
