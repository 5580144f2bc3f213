"""Prefect flows: register, verify, calibrate, run. They orchestrate plain functions from the layers
below; tasks compute and return records, and the flow is the only writer to the ledger."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from tqdm.auto import tqdm

import store
from flows.configs import ImportConfig, RegisterConfig, RunConfig, VerifyConfig
from flows.cores import share_cores
from flows.progress import ScoringProgress
from flows.runner import Runner, VerifySummary, cached_study, retrain, stop_on_signals
from predictions import (
    CurvatureMethod,
    Method,
    ModificationKind,
    build,
    from_models,
    parse,
    parse_method,
    predict,
    top_k,
)
from predictions.detection import DETECTORS, detector
from predictions.imported import read_imported
from predictions.peers import PeerFailure
from predictions.weight_change import predicted_weight_changes
from reports.calibration import compare_methods, interval_rows
from reports.render import write_report
from reports.tables import unreproduced_line
from retrain import Study, load_study
from retrain.curvature import cold_inverses
from retrain.regimes import Job, full_model_records, load_params, parse_regime, stacked_params, train_full
from store import (
    InputError,
    ModelRecord,
    PredictionFailureRecord,
    PredictionRecord,
    RemovalSetRecord,
    RunRecord,
    SelfInfluenceRecord,
    WeightChangeRecord,
)

T = TypeVar("T")


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

    config: RegisterConfig
    study: Study
    methods: list[Method]
    sets: list[RemovalSetRecord]
    top_k: list[ModificationKind]  # ranked kinds, built once the methods' scores exist
    regimes: list[str]
    trained: list[ModificationKind] = field(default_factory=list)  # kinds built from the full-data models


def plan(config: RegisterConfig, regimes: Sequence[str] = ()) -> Plan:
    """Resolve and validate a study with its methods, removal-set specs and regimes."""
    study = load_study(config.study).use_device(torch.device(config.device))
    for r in regimes:
        parse_regime(r).check(study)
    specs = [parse(text) for text in (config.sets or study.default_sets)]
    chosen = list({m.label: m for m in (parse_method(text, study) for text in config.methods or study.default_methods)
                   }.values())  # one per label: `exact` and `exact:models=5` are the same method on a 5-seed study
    for spec in specs:
        if spec.ranked and getattr(spec.options, "method", "") not in ("", *(m.label for m in chosen)):
            raise InputError(f"{spec.text}: ranks by {spec.options.method!r}, which is not among --methods")
    if config.weight_changes:
        for m in chosen:
            if not isinstance(m, CurvatureMethod):
                raise InputError(f"--weight-changes: {m.label} predicts no weight change (only a curvature method "
                                 "solves A⁻¹ Σ ∇L_j); leave it out or drop --weight-changes")
    built = [s for spec in specs for s in build(spec, study)]
    for spec in specs:
        spec.check_study(study)
    return Plan(config, study, chosen, built, [s for s in specs if s.ranked], list(regimes or study.default_regimes),
                [s for s in specs if s.trained])


@task(cache_policy=NONE)
def train_full_task(study: Study, seeds: list[int]) -> tuple[list[ModelRecord], list[RunRecord]]:
    share_cores()
    with tqdm(total=study.recipe.epochs * len(seeds), desc=f"{study.name}: full-data models", unit="model-epoch",
              leave=False) as bar:
        params, records = train_full(study, seeds, store.full_set_id(study.study_hash),
                                     progress=bar.update)
    return full_model_records(study, params), records


@task(cache_policy=NONE)
def scores_task(study: Study, method: Method, thetas: torch.Tensor, sets: list[RemovalSetRecord]
                ) -> tuple[torch.Tensor | PeerFailure, float, float]:
    """The method's scores, or the failure of a peer library (returned: it is recorded, not a crash), with the
    seconds and peak MiB of computing them (`measured`: the task's own orchestration, the same for every method,
    is not counted)."""
    share_cores()

    def scores() -> torch.Tensor | PeerFailure:
        try:
            with ScoringProgress(study.name, method.label, min(method.options.models, len(thetas))) as progress:
                return method.scores(study, thetas, sets, progress)
        except PeerFailure as e:
            return e

    return measured(scores)


@task(cache_policy=NONE)
def predict_task(study: Study, method: Method, thetas: torch.Tensor, sets: list[RemovalSetRecord],
                 scores: torch.Tensor | None) -> tuple[list[PredictionRecord] | PeerFailure, float, float]:
    """The method's predictions of the sets (or the failure of a peer library), with the seconds and peak MiB of
    computing them, as `scores_task`."""
    share_cores()

    def predictions() -> list[PredictionRecord] | PeerFailure:
        try:
            if method.sums_scores:
                return predict(study, method, thetas, sets, scores)
            models = min(method.options.models, len(thetas))
            with ScoringProgress(study.name, f"{method.label} ({len(sets)} sets)", models) as progress:
                return predict(study, method, thetas, sets, progress=progress)
        except PeerFailure as e:
            return e

    return measured(predictions)


@task(cache_policy=NONE)
def weight_changes_task(study: Study, method: Method, thetas: torch.Tensor, seeds: list[int],
                        sets: list[RemovalSetRecord]) -> list[WeightChangeRecord]:
    share_cores()
    return predicted_weight_changes(study, method, thetas, seeds, sets)


def _invocation(command: str, config: RegisterConfig | VerifyConfig | RunConfig | ImportConfig, db: str) -> str:
    """Store the command's whole config and the code version in the ledger; the id that its results name."""
    with store.connect(db) as con:
        return store.record_invocation(con, command, asdict(config), code_version())


@dataclass
class FullModels:
    """The full-data models of a study before they are saved: those the ledger has (`cached`, serialized or the path
    of a model file), those just trained (`new`, with their baseline `runs`), and why a seed has none (`failed`)."""

    cached: dict[int, bytes | Path]
    failed: dict[int, str]
    new: list[ModelRecord] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)


def _load_or_train(study: Study, db: str) -> FullModels:
    """The full-data model θ* of every seed that has one, from the ledger's cache, training the missing ones; writes
    nothing. A seed whose recipe training failed keeps the model the study supplies for it."""
    seeds = list(range(study.recipe.seeds))
    cached: dict[int, bytes | Path] = {}
    failed: dict[int, str] = {}
    if Path(db).exists():
        with store.read_only(db, sandbox=False) as con:
            cached = store.load_models(con, study.study_hash)
            failed = {seed: why for (seed, regime), why in
                      store.failed_baselines(con, study.study_hash, store.full_set_id(study.study_hash)).items()
                      if regime == "scratch"}
    missing = [s for s in seeds if s not in cached and s not in failed]
    if not missing:
        return FullModels(cached, failed)
    models, runs = train_full_task(study, missing)
    failed |= {r.seed: r.reason for r in runs if r.status == "failed"}
    return FullModels(cached, failed, [m for m in models if m.seed not in failed or m.supplied_sha256], runs)


def _refuse_unreproduced(study: Study, db: str, found: FullModels) -> None:
    """`--supplied-must-reproduce`: refuse (before anything is written) a study with a supplied model that the
    recipe does not reproduce, among the new models and those the ledger holds."""
    far = {m.seed: m.retrained_relative_distance for m in found.new if m.reproduced is False}
    if Path(db).exists():
        far |= _unreproduced(study, db)
    if far:
        raise InputError(f"{study.name}: {unreproduced_line(far)}; --supplied-must-reproduce refuses it: supply the "
                         "checkpoint the recipe trains, or register without that option")


def _unreproduced(study: Study, db: str) -> dict[int, float | None]:
    """seed -> relative distance of the study's supplied models that the ledger records as not reproduced."""
    with store.read_only(db, sandbox=False) as con:
        return {r["seed"]: r["retrained_relative_distance"] for r in store.unreproduced_models(con, study.name)
                if r["study_hash"] == study.study_hash}


def _full_models(study: Study, db: str, invocation: str | None = None, found: FullModels | None = None
                 ) -> dict[int, torch.Tensor | Path]:
    """The full-data model θ* of every seed that has one (`found`, or `_load_or_train`), saving the new ones and
    recording their baseline runs (failures as failed `scratch` baseline runs: a seed whose recipe training failed
    keeps its supplied model, and its `scratch` runs are then left out: they have no baseline). A model stored as a
    BLOB comes loaded on the study's device, one stored as a file as its path (`load_params` loads it where it is
    used). Refuses when no seed has a model."""
    found = found or _load_or_train(study, db)
    models = found.cached
    if found.runs:
        with store.connect(db) as con:
            store.save_models(con, found.new)
            store.record_runs(con, found.runs, invocation)
            models = store.load_models(con, study.study_hash)  # the new ones as stored: a large one as its file
    if not models:
        raise InputError(f"every full-data model of {study.name} failed ({found.failed[0]}); "
                         "fix the study's recipe (e.g. a smaller learning rate)")
    return {s: models[s] if isinstance(models[s], Path) else load_params(models[s], study.device)
            for s in sorted(models)}


@dataclass
class RegisterSummary:
    study: str
    study_hash: str
    sets: int
    predictions_added: int
    methods: list[str] = field(default_factory=list)
    full_models: int = 0  # full-data models (one per seed that trained) the predictions were made from
    post_hoc: int = 0  # of predictions_added, those registered after their outcomes existed
    unreproduced: dict[int, float | None] = field(default_factory=dict)  # supplied models the recipe does not reproduce
    # method -> the seeds it averaged where they are not the first `models` (a seed has no full-data model): its
    # predictions' config records them (`seeds`, and `models` their count), so it never reads as that of all of them
    other_seeds: dict[str, list[int]] = field(default_factory=dict)
    costs: dict[str, tuple[float, float]] = field(default_factory=dict)  # method -> (seconds, peak MiB) of scoring
    failed: dict[str, str] = field(default_factory=dict)  # method -> why it failed (no predictions registered)
    unranked: list[str] = field(default_factory=list)  # ranked set specs (top_k) whose ranking method failed


@flow(name="register")
def register_flow(request: Plan) -> RegisterSummary:
    """Train (or load) the full-data models, build removal sets, and register every method's predictions
    in one transaction before any removal is retrained."""
    stop_on_signals()
    study, db = request.study, request.config.db
    found = _load_or_train(study, db)
    if request.config.supplied_must_reproduce:
        _refuse_unreproduced(study, db, found)
    invocation = _invocation("register", request.config, db)
    with store.connect(db) as con:
        store.register_study(con, study.record())
    full = _full_models(study, db, invocation, found)
    thetas = stacked_params([full[s] for s in sorted(full)], study.device)
    built = [*request.sets, *(s for spec in request.trained for s in from_models(spec, study, thetas, sorted(full)))]
    # one method at a time: torch.func transforms are not thread-safe. Per-point scores only where a method's set
    # predictions sum them (the measurements side) or a ranked kind ranks by them. A method's cost is the time and
    # peak memory of both steps; a peer library's failure drops its method, recorded with the reason
    ranking = {getattr(spec.options, "method", "") for spec in request.top_k}
    scores, costs, failures, records = {}, {}, {}, []
    for m in request.methods:
        if m.sums_scores or {"", m.label} & ranking:
            with cold_inverses():  # its cost is its own, not shortened by an inverse another method left
                result, seconds, memory = scores_task(study, m, thetas, built)
            costs[m.label] = (seconds, memory)
            if isinstance(result, PeerFailure):
                failures[m.label] = PredictionFailureRecord(study.study_hash, m.label, m.config, str(result))
            else:
                scores[m.label] = result
    # a ranked kind that names a method which failed builds no sets: the failure is recorded below, with its reason
    unranked = [spec.text for spec in request.top_k if getattr(spec.options, "method", "") in failures]
    ranked = [s for spec in request.top_k if spec.text not in unranked for s in top_k(spec, study, scores)]
    with store.read_only(db, sandbox=False) as con:
        sets = store.keep_older_ids(con, [*built, *ranked])
    sets = list({s.set_id: s for s in reversed(sets)}.values())  # one record per set id (the first)
    averaged = {m.label: sorted(full)[: m.options.models] for m in request.methods}  # the thetas[:models] averaged
    other = {m.label: averaged[m.label] for m in request.methods if averaged[m.label] != list(range(m.options.models))}
    for m in (m for m in request.methods if m.label not in failures):
        with cold_inverses():
            result, seconds, memory = predict_task(study, m, thetas, sets, scores.get(m.label))
        before_seconds, before_memory = costs.get(m.label, (0.0, 0.0))
        costs[m.label] = (before_seconds + seconds, max(before_memory, memory))
        if isinstance(result, PeerFailure):
            failures[m.label] = PredictionFailureRecord(study.study_hash, m.label, m.config, str(result))
        else:
            records += result
    records = [replace(r, method_config=r.method_config | {"models": len(other[r.method]), "seeds": other[r.method]})
               if r.method in other else r for r in records]
    added, post_hoc = _register(db, sets, records, invocation)
    if request.config.weight_changes:
        changes = [w for m in request.methods if m.label not in failures
                   for w in weight_changes_task(study, m, thetas, sorted(full), sets)]
        with store.connect(db) as con:
            store.register_weight_changes(con, changes, code_version())
    with store.connect(db) as con:
        store.record_prediction_failures(con, list(failures.values()), code_version(), invocation)
    return RegisterSummary(study.name, study.study_hash, len(sets), added,
                           [m.label for m in request.methods if m.label not in failures], len(full), post_hoc,
                           _unreproduced(study, db), other, costs, {label: f.reason for label, f in failures.items()},
                           unranked)


def measured(function: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """function(*args), its wall-clock seconds and the peak of the process's resident memory above its start, in
    MiB (sampled every 10 ms by a thread: a lower bound that also counts the other threads' allocations)."""
    process = psutil.Process()
    start_memory, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss - start_memory)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        result = function(*args)
    finally:
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    peak[0] = max(peak[0], process.memory_info().rss - start_memory)
    return result, seconds, peak[0] / 2**20


def _register(db: str, sets: Sequence[RemovalSetRecord], records: Sequence[PredictionRecord],
              invocation: str) -> tuple[int, int]:
    """Append the sets and predictions; returns how many predictions were added and how many of those are post
    hoc (their outcomes already exist)."""
    with store.connect(db) as con:
        before = store.last_prediction_seq(con)
        store.register_removal_sets(con, sets)
        added = store.register_predictions(con, records, code_version(), invocation)
        return added, sum(store.post_hoc_predictions(con, after_seq=before).values())


@flow(name="verify")
def verify_flow(config: VerifyConfig) -> VerifySummary:
    """Retrain every pending (set, seed, regime) in chunks of many models per task. A chunk's runs are
    `running` while it trains and are written with their outcomes in one transaction when it finishes, so a
    killed verify loses no finished chunk and a rerun does only what is missing (stale `running` included)."""
    stop_on_signals()
    db, study_name = config.db, config.study
    pool = Runner.of(config.runner, config.workers, config.address, config.pool)
    summary, invocation = VerifySummary(), None
    with store.read_only(db, sandbox=False) as con:
        registered = store.studies(con, study_name)
    if study_name and not registered:
        raise InputError(f"study {study_name!r} has nothing registered in {db}; run `ifledger register {study_name}`")
    for entry in registered:
        study = cached_study(entry["source"]).use_device(torch.device(config.device))
        if study.study_hash != entry["study_hash"]:
            summary.skipped.append(f"{entry['study']} {entry['study_hash']}: its code or data changed since "
                                   f"registration (now {study.study_hash}); its pending runs were left alone")
            continue
        chosen = {r.label: r for r in map(parse_regime, config.regimes or study.default_regimes)}
        for regime in chosen.values():
            regime.check(study)  # before anything is written
        invocation = invocation or _invocation("verify", config, db)
        full = _full_models(study, db, invocation)
        with store.read_only(db, sandbox=False) as con:
            pending = store.pending_jobs(con, study.study_hash, sorted(full), list(chosen), config.retry_failed)
            indices = store.removal_set_indices(con, sorted({p[0] for p in pending}))
            failed = store.failed_baselines(con, study.study_hash, store.full_set_id(study.study_hash))
            tracked = store.weight_change_sets(con, study.study_hash)
            if tracked:  # the baselines too: an effect on the weights is paired like an effect on a measurement
                tracked.add(store.full_set_id(study.study_hash))
        summary.skipped += [f"{entry['study']}: the full-data {regime} run of seed {seed} failed ({why}); that "
                            f"seed's other {regime} runs were left out (they would have no baseline)"
                            for (seed, regime), why in sorted(failed.items()) if seed in full and regime in chosen]
        chunks = []
        for label in dict.fromkeys(p[2] for p in pending):
            regime, jobs = chosen[label], [Job(s, seed, *indices[s], weight_change=s in tracked)
                                           for s, seed, r in pending if r == label]
            if not regime.relabels and any(j.new_labels is not None for j in jobs):
                summary.skipped.append(f"{entry['study']}: regime {label} cannot retrain relabel sets; their runs "
                                       "were left pending")
                jobs = [j for j in jobs if j.new_labels is None]
            size = regime.chunk_size(study, config.chunk_size)
            chunks += [(regime, jobs[i : i + size]) for i in range(0, len(jobs), size)]
        if chunks:
            retrain(db, study, chunks, full, pool, config.retry_failed, summary, invocation)
    return summary


@flow(name="calibrate")
def calibrate_flow(db: str, study_name: str | None = None, include_post_hoc: bool = False, converged_only: bool = False
                   ) -> tuple[list[str], list[tuple]]:
    """Bootstrap intervals for every calibration group (stored in `calibration_intervals`), then the calibration
    table with them; with `converged_only`, of the effects of converged runs only."""
    intervals = interval_rows(db, include_post_hoc, converged_only)
    with store.connect(db) as con:
        store.save_calibration_intervals(con, intervals)
    with store.read_only(db, sandbox=False) as con:
        return store.calibration_table(con, study_name, include_post_hoc, converged_only)


@flow(name="compare")
def compare_flow(db: str, a: str, b: str, study_name: str | None = None, include_post_hoc: bool = False,
                 converged_only: bool = False) -> tuple[list[str], list[tuple]]:
    """Is method A better than B? Paired bootstrap over sets and measurements per regime, set kind and metric."""
    rows = [(regime, kind, c.metric, c.a, c.b, c.difference, c.lo, c.hi, c.nonfinite, c.verdict)
            for regime, kind, c in compare_methods(db, a, b, study_name, include_post_hoc, converged_only)]
    return ["regime", "set_kind", "metric", a, b, "difference", "diff_lo", "diff_hi", "nonfinite_replicates",
            "verdict"], rows


def read_predictions(db: str, study_spec: str, path: str, method: str
                     ) -> tuple[Study, list[RemovalSetRecord], list[PredictionRecord]]:
    """The study, new removal sets and predictions of a file of another library's predictions, the whole file
    validated before any flow starts (a refusal is one line, with no flow logs before it)."""
    study = load_study(study_spec)
    known: dict[str, tuple[int, ...]] = {}
    if Path(db).exists():
        with store.read_only(db, sandbox=False) as con:
            ids = store.removal_set_ids(con, study.study_hash)
            known = {s: indices for s, (indices, labels) in store.removal_set_indices(con, sorted(ids)).items()
                     if labels is None}
    sets, records = read_imported(path, study, method, known)
    if Path(db).exists():  # a set an older ledger imported keeps its id there
        with store.read_only(db, sandbox=False) as con:
            kept = store.keep_older_ids(con, sets)
        ids = {s.set_id: k.set_id for s, k in zip(sets, kept)}
        sets, records = kept, [replace(r, set_id=ids.get(r.set_id, r.set_id)) for r in records]
    return study, sets, records


@flow(name="import-predictions")
def import_flow(config: ImportConfig, study: Study, sets: list[RemovalSetRecord], records: list[PredictionRecord]
                ) -> RegisterSummary:
    """Register predictions made by another library (validated by `read_predictions`) as `imported:<method>`."""
    db = config.db
    invocation = _invocation("import-predictions", config, db)
    with store.connect(db) as con:
        store.register_study(con, study.record())
    added, post_hoc = _register(db, sets, records, invocation)
    return RegisterSummary(study.name, study.study_hash, len({r.set_id for r in records}), added,
                           [f"imported:{config.method}"], post_hoc=post_hoc)


@task(cache_policy=NONE)
def self_influence_task(study: Study, method: str, thetas: torch.Tensor, seeds: list[int]) -> list[SelfInfluenceRecord]:
    share_cores()
    scores = detector(method).scorer(study, thetas, seeds)
    config = detector(method).config(study, method)
    return [SelfInfluenceRecord(study.study_hash, method, config, s, tuple(scores[k].tolist()))
            for k, s in enumerate(seeds)]


def detect_plan(study_spec: str, methods: Sequence[str] | None = None, device: str = "cpu"
                ) -> tuple[Study, list[str]]:
    """The study on `device` and the detection methods (default: every one that can score the study), refused before
    any flow starts."""
    chosen = list(dict.fromkeys(methods or ()))
    for name in chosen:
        detector(name)
    study = load_study(study_spec).use_device(torch.device(device))
    if not chosen:
        return study, [name for name in DETECTORS if _scores(study, name)]
    for name in chosen:
        detector(name).check(study)
    return study, chosen


def _scores(study: Study, method: str) -> bool:
    """Whether detection method `method` can score `study`."""
    try:
        detector(method).check(study)
    except InputError:
        return False
    return True


@flow(name="detect")
def detect_flow(study: Study, methods: list[str], db: str) -> tuple[list[str], list[tuple]]:
    """Score every training point of every full-data model with each detection method (self-influence and the
    loss and random baselines), store the scores in `self_influence`, and return the study's `detection` rows."""
    with store.connect(db) as con:
        store.register_study(con, study.record())
    full = _full_models(study, db)
    seeds = sorted(full)
    thetas = stacked_params([full[s] for s in seeds], study.device)
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
def run_flow(config: RunConfig, request: Plan) -> RunSummary:
    """register -> verify -> calibrate -> report, for one study (`request`: `config.register`, validated)."""
    stop_on_signals()
    db, v = config.register.db, config.verify
    Runner.of(v.runner, v.workers, v.address, v.pool)  # refuse bad runner options before anything is written
    _invocation("run", config, db)
    registered = register_flow(request)
    verified = verify_flow(replace(v, db=db, study=request.study.name, regimes=tuple(request.regimes)))
    calibration = calibrate_flow(db, request.study.name)
    report = write_report(db, request.study.name, Path(config.report_dir))
    return RunSummary(registered, verified, calibration, report)
