"""The retraining runner of `verify`: chunks submitted at most `slots` at a time to a Prefect task runner, as flow
runs to a Prefect work pool, or run in the flow's own thread, each chunk claimed in the ledger when it starts and
written with its outcomes when it ends; progress per regime; and Ctrl-C or SIGTERM, which release this process's
claims and exit (130 or 143) within seconds."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import State
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

import store
from flows.cores import computing, share_cores
from flows.progress import RetrainProgress
from retrain import Study, load_study
from retrain.regimes import Job, Regime, load_params, run_regime
from store import InputError, RunRecord

RUNNERS = ("thread", "process", "dask", "pool")
CHUNK_FLOW = "ifledger-retrain-chunk"  # the flow, and its deployment, of a chunk on a work pool
TASK_TIMEOUT_SECONDS = 4 * 3600  # one chunk's try; store.STALE_AFTER is longer than its tries together
_STUDIES: dict[str, Study] = {}  # source -> study, loaded once per process


def cached_study(source: str, study_hash: str | None = None) -> Study:
    """The study at `source`, cached in this process; loaded afresh when `study_hash` is None (the flow checks
    the hash against the ledger) or differs from the cached one's. (The flow must not name `_STUDIES` itself:
    Dask pickles the flow's function by value, and a user study's class cannot be unpickled in a worker.)"""
    study = _STUDIES.get(source)
    if study is None or study_hash is None or study.study_hash != study_hash:
        study = _STUDIES[source] = load_study(source)
    if study_hash is not None and study.study_hash != study_hash:
        raise RuntimeError(f"{source} changed while verifying (hash {study.study_hash}, expected {study_hash})")
    return study


def train_chunk(source: str, study_hash: str, regime: Regime, jobs: list[Job],
                full_params: dict[int, torch.Tensor | Path], workers: int = 1, progress: RetrainProgress | None = None,
                gpus: list[str] | None = None, device: str = "cpu") -> list[RunRecord]:
    """Retrain one chunk on `device`. Arguments are picklable (the study travels as its `source`, the full-data
    models of the chunk's seeds as CPU tensors or the paths of their model files, loaded here) for process, dask and
    work-pool workers; the chunk's torch threads are this process's share of the cores among its `workers`
    (`flows.cores`); `gpus`: the GPUs a local Dask cluster's workers share out (`dask_worker_gpu`)."""
    share_cores(workers)
    if gpus:
        dask_worker_gpu(gpus)
    study = cached_study(source, study_hash).use_device(torch.device(device))
    return run_regime(study, regime, jobs, {s: load_params(t, study.device) for s, t in full_params.items()},
                      progress=partial(progress.advance, regime.label) if progress is not None else None)


regime_task = task(train_chunk, name="regime_task", cache_policy=NONE, retries=1, retry_delay_seconds=5)


@flow(name=CHUNK_FLOW, persist_result=True, retries=1, retry_delay_seconds=5, timeout_seconds=TASK_TIMEOUT_SECONDS)
def retrain_chunk(inputs: str) -> list[RunRecord]:
    """One chunk of `verify --runner pool`, as a flow run in a worker of the work pool: `train_chunk` of the
    arguments saved in the file `inputs` (beside the ledger). Its records are its persisted result, which verify
    reads and writes to the ledger; on a GPU, the chunk runs on cuda:0 of those the worker sees
    (CUDA_VISIBLE_DEVICES). Its torch threads are its share of its machine's cores among the ifledger processes
    computing there, itself counted (the workers may be on other machines than verify: `workers` does not apply)."""
    with computing():
        return train_chunk(**torch.load(inputs, weights_only=False) | {"workers": 1})


def chunk_models(full: dict[int, torch.Tensor | Path], jobs: list[Job]) -> dict[int, torch.Tensor | Path]:
    """The full-data models a chunk's `jobs` use, as its task takes them: a loaded one as a CPU tensor, one stored
    as a file as its path (a worker loads it; each chunk carries only its own seeds)."""
    return {s: full[s] if isinstance(full[s], Path) else full[s].cpu() for s in sorted({j.seed for j in jobs})}


def exit_with_parent(parent: int, poll_seconds: float = 0.5) -> None:
    """In a process-runner worker: exit as soon as the verify `parent` that started it is gone, `kill -9` included,
    instead of training on as an orphan (also when it died before this ran). A daemon thread watches the parent
    pid: the kernel's PR_SET_PDEATHSIG (which the temporary Prefect server uses) follows the thread that spawned the
    child, here one of Prefect's submitting threads, not the verify process."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def visible_gpus(visible: str | None, count: int) -> list[str]:
    """The GPUs this process may hand to its workers: its CUDA_VISIBLE_DEVICES list (`visible`), or 0..count-1 when
    that is unset."""
    if visible is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in visible.split(",") if g.strip()]


def worker_gpu(index: int, gpus: list[str]) -> str | None:
    """The CUDA_VISIBLE_DEVICES of worker `index` (counted from 0 in start order): one of `gpus` each, round robin;
    None (leave it as inherited) when fewer than two GPUs are visible."""
    return gpus[index % len(gpus)] if len(gpus) > 1 else None


def start_worker(parent: int, started: Any, gpus: list[str]) -> None:
    """A process-runner worker's initializer: `exit_with_parent`, and its own GPU when several are visible
    (`worker_gpu` of its index, counted in `started`, a shared integer), set before torch touches CUDA, so that a
    study trainer's job sees it as cuda:0."""
    exit_with_parent(parent)
    with started.get_lock():
        index = started.value
        started.value += 1
    gpu = worker_gpu(index, gpus)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def dask_worker_gpu(gpus: list[str]) -> None:
    """In a worker of the local Dask cluster (named 0, 1, ...): its own GPU, `worker_gpu` of its name, set before
    torch touches CUDA (a worker's first task); elsewhere, or once CUDA is initialised, nothing."""
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:  # not in a Dask worker
        return
    gpu = worker_gpu(name, gpus) if isinstance(name, int) else None
    if gpu is not None and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def task_slots(runner: str, workers: int | None, address: str | None, pool: str | None = None) -> int:
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
    if pool and runner != "pool":
        raise InputError("--pool names a Prefect work pool: use it with --runner pool")
    if runner == "pool" and not pool:
        raise InputError("--runner pool sends chunks to a Prefect work pool: name it with --pool NAME")
    return 1 if runner == "thread" else workers or os.cpu_count() or 1


def task_runner(runner: str, slots: int, address: str | None) -> TaskRunner | None:
    """None for the thread runner: its one task at a time runs in the flow's own thread (torch's OpenMP pool
    is up to 1.6x slower when driven from a second thread while the main thread's pool spins)."""
    if runner == "thread":
        return None
    if runner == "process":
        gpus = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
        started = multiprocessing.get_context("spawn").Value("i", 0)  # Prefect's workers are spawned
        return ProcessPoolTaskRunner(max_workers=slots, initializer=start_worker, initargs=(os.getpid(), started, gpus))
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": slots, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def shared_api() -> str:
    """The configured Prefect API's URL, which a work pool's workers can reach too; refused in one line when there
    is none or it is a temporary server of this process (the `ifledger` command checks before it would start one)."""
    from prefect.settings import get_current_settings

    from flows.server import temporary_api

    url = get_current_settings().api.url
    if not url or temporary_api(url):
        raise InputError("--runner pool needs a Prefect server that the pool's workers reach too: start one "
                         "(`prefect server start`) and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    return url


def check_work_pool(pool: str) -> None:
    """Refuse, in one line, a work pool that verify cannot use: no Prefect API configured (the temporary server of
    one command cannot serve workers), the API unreachable, no pool of that name, or a pool that is not of the
    `process` type (whose workers run the chunk flow from this checkout)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    url = shared_api()
    try:
        with get_client(sync_client=True) as client:
            found = client.read_work_pool(pool)
    except ObjectNotFound:
        raise InputError(f"no work pool {pool!r} on the Prefect API at {url}; create it with "
                         f"`prefect work-pool create {pool} --type process`") from None
    except httpx.HTTPError as e:
        raise InputError(f"cannot reach the Prefect API at {url} ({type(e).__name__}); start the server or mend "
                         "PREFECT_API_URL") from None
    if found.type != "process":
        raise InputError(f"work pool {pool!r} is of type {found.type!r}; --runner pool runs chunks from this "
                         f"checkout in a process pool: `prefect work-pool create NAME --type process`")


def chunk_folder(db: str) -> Path:
    """Where `verify --runner pool` leaves each chunk's inputs and the workers persist its records: a folder beside
    the ledger (`LEDGER.pool`), which the workers reach as they reach the ledger's folder."""
    path = Path(db).resolve()
    return path.with_name(f"{path.name}.pool")


def chunk_deployment(pool: str) -> UUID:
    """Create (or update) the deployment `CHUNK_FLOW`/`CHUNK_FLOW` of the `retrain_chunk` flow on the work pool
    `pool`, its code this checkout (a process worker runs it from this folder, with no image): its id."""
    repo = Path(__file__).resolve().parents[1]
    deployment = retrain_chunk.from_source(str(repo), "flows/runner.py:retrain_chunk").to_deployment(
        name=CHUNK_FLOW, work_pool_name=pool)
    return deployment.apply(work_pool_name=pool)


@dataclass
class ChunkFlowRun:
    """A chunk sent to a work pool: its flow run, its inputs file, and its final state once `WorkPoolRunner`
    has seen it."""

    id: UUID
    inputs: Path
    state: State | None = None

    def result(self) -> list[RunRecord]:
        """The chunk's records; raises `ChunkFlowRunFailed`, saying why, for a flow run that failed, crashed or was
        cancelled."""
        assert self.state is not None and self.state.is_final()
        if not self.state.is_completed():
            raise ChunkFlowRunFailed(f"flow run {self.id} {self.state.name.lower()}: {self.state.message or ''}")
        records = self.state.result()
        stored = getattr(self.state.data, "storage_key", None)  # the worker's file under `chunk_folder`/results
        if stored and Path(stored).is_absolute():
            Path(stored).unlink(missing_ok=True)
        return records


class ChunkFlowRunFailed(Exception):
    """A chunk's flow run ended in a state other than Completed."""


class WorkPoolRunner:
    """Chunks as flow runs of the deployment `CHUNK_FLOW`/`CHUNK_FLOW` (the `retrain_chunk` flow of this checkout)
    on the Prefect work pool `pool`: `submit` saves a chunk's arguments in `folder` and creates its flow run,
    `first_finished` polls the API until one of them ends. Flow runs left unfinished when the block ends (an error,
    a signal) are cancelled."""

    POLL_SECONDS = 1.0

    def __init__(self, pool: str, folder: Path):
        self.pool, self.folder = pool, folder
        self.deployment: UUID | None = None
        self.unfinished: dict[UUID, ChunkFlowRun] = {}

    def __enter__(self) -> WorkPoolRunner:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import WorkPoolStatus

        self.folder.mkdir(exist_ok=True)
        self.deployment = chunk_deployment(self.pool)
        with get_client(sync_client=True) as client:
            if client.read_work_pool(self.pool).status != WorkPoolStatus.READY:
                print(f"ifledger: work pool {self.pool!r} has no worker online; its chunks wait until one starts "
                      f"(`prefect worker start --pool {self.pool}`)", file=sys.stderr, flush=True)
        _POOLS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _POOLS.remove(self)
        self.cancel()
        with contextlib.suppress(OSError):  # emptied: every result read (another verify's may still be there)
            (self.folder / "results").rmdir()
            self.folder.rmdir()

    def submit(self, call: dict[str, Any]) -> ChunkFlowRun:
        """Create the flow run of one chunk (`train_chunk`'s arguments); the worker persists its records under
        `folder`/results."""
        from prefect.deployments import run_deployment

        inputs = self.folder / f"{uuid4().hex}.pt"
        torch.save(call, inputs)
        env = {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.folder / "results")}
        run = run_deployment(self.deployment, parameters={"inputs": str(inputs)}, timeout=0, as_subflow=False,
                             job_variables={"env": env})
        self.unfinished[run.id] = ChunkFlowRun(run.id, inputs)
        return self.unfinished[run.id]

    def first_finished(self, runs: list[ChunkFlowRun]) -> ChunkFlowRun:
        """Wait until one of `runs` is in a final state; that one, with its state (its inputs file removed)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        by_id = {r.id: r for r in runs}
        with get_client(sync_client=True) as client:
            while True:
                found = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(by_id))))
                for flow_run in found:
                    if flow_run.state is not None and flow_run.state.is_final():
                        run = self.unfinished.pop(flow_run.id)
                        run.state = flow_run.state
                        run.inputs.unlink(missing_ok=True)
                        return run
                time.sleep(self.POLL_SECONDS)

    def cancel(self) -> None:
        """Cancel the flow runs not seen finished (best effort: the API may be gone) and remove their inputs."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            for run in list(self.unfinished.values()):
                client.set_flow_run_state(run.id, Cancelling(message="verify stopped"), force=True)
                run.inputs.unlink(missing_ok=True)
                del self.unfinished[run.id]


_POOLS: list[WorkPoolRunner] = []  # work-pool runners open in this process: a signal cancels their flow runs


@dataclass
class VerifySummary:
    done: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    elsewhere: int = 0  # planned jobs found done or claimed by another verify when this one came to claim them


@dataclass(frozen=True)
class Runner:
    """Where chunks run: `kind` (thread, process, dask or pool), `slots` tasks at once, a Dask `address`, a Prefect
    work `pool`."""

    kind: str = "thread"
    slots: int = 1
    address: str | None = None
    pool: str | None = None

    @classmethod
    def of(cls, kind: str, workers: int | None = None, address: str | None = None, pool: str | None = None
           ) -> Runner:
        """The runner of these options, refused in one line when they are bad (for `pool`: when no Prefect API is
        configured or the work pool does not exist on it)."""
        runner = cls(kind, task_slots(kind, workers, address, pool), address, pool)
        if kind == "pool":
            check_work_pool(pool)
        return runner


def retrain(db: str, study: Study, chunks: list[tuple[Regime, list[Job]]], full: dict[int, torch.Tensor | Path],
            runner: Runner, retry_failed: bool, summary: VerifySummary, invocation: str | None = None) -> None:
    """Submit the chunks, at most `runner.slots` at a time. One short write per step: the chunk that finished
    (runs and outcomes in one transaction, naming the `invocation` that trained them) and the chunks that start
    (claimed as `running`)."""
    steps = {r.label: r.steps(study) for r, _ in chunks}
    planned = {r.label: sum(len(j) for q, j in chunks if q.label == r.label) for r, _ in chunks}
    # a timeout interrupts only a task in a worker process's main thread, so only the process runner sets one
    task_ = regime_task.with_options(timeout_seconds=TASK_TIMEOUT_SECONDS) if runner.kind == "process" else regime_task
    waiting, active, finished = deque(chunks), [], []
    local_dask = runner.kind == "dask" and not runner.address  # its workers are this machine's
    gpus = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()) if local_dask else None
    on_pool = WorkPoolRunner(runner.pool, chunk_folder(db)) if runner.kind == "pool" else None
    with RetrainProgress(study.name, steps, planned) as progress, \
            on_pool or task_runner(runner.kind, runner.slots, runner.address) or nullcontext() as pool:
        while True:
            starting = [waiting.popleft() for _ in range(min(runner.slots - len(active), len(waiting)))]
            with store.connect(db) as con:
                store.record_runs(con, finished, invocation)
                claimed = set(store.start_runs(con, study.study_hash,
                                               [(j.set_id, j.seed, r.label) for r, jobs in starting for j in jobs],
                                               retry_failed))
            finished = []
            for regime, planned_jobs in starting:
                jobs = [j for j in planned_jobs if (j.set_id, j.seed, regime.label) in claimed]
                summary.elsewhere += len(planned_jobs) - len(jobs)
                progress.drop(regime.label, len(planned_jobs) - len(jobs))
                if not jobs:
                    continue
                progress.start(regime.label)
                call = {"source": study.source, "study_hash": study.study_hash, "regime": regime, "jobs": jobs,
                        "full_params": chunk_models(full, jobs), "workers": runner.slots,
                        "progress": None if pool else progress, "gpus": gpus, "device": str(study.device)}
                if on_pool:
                    run = pool.submit(call)
                else:  # a future or a state
                    run = pool.submit(task_, call) if pool else task_(**call, return_state=True)
                active.append((run, regime, jobs))
            if not active:
                if waiting:  # every chunk just planned was taken by another verify
                    continue
                return
            if on_pool:
                first = pool.first_finished([a[0] for a in active])
            else:
                first = next(as_completed([a[0] for a in active])) if pool else active[0][0]
            future, regime, jobs = active.pop([a[0] for a in active].index(first))
            try:
                finished = future.result()
            except Exception as e:  # a task that failed every try: its runs are recorded as failed, the flow goes on
                reason = f"task failed: {type(e).__name__}: {e}"
                finished = [RunRecord(study.study_hash, j.set_id, j.seed, regime.label, "failed", reason)
                            for j in jobs]
            if pool:
                progress.advance(regime.label, steps[regime.label] * len(jobs))
            summary.done += sum(r.status == "done" for r in finished)
            summary.failed += sum(r.status == "failed" for r in finished)
            summary.reasons += [r.reason for r in finished if r.reason]


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc; none elsewhere), children before their own children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child, parent = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        out += below
        todo += below
    return out


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_HANDLERS: list[Callable[[int, object], None]] = []  # the handler of each `interruptible` block open, innermost last


@contextlib.contextmanager
def interruptible(db: str) -> Iterator[None]:
    """While the body runs (in the main thread), Ctrl-C (SIGINT) or SIGTERM releases this process's claimed
    runs, so that `status` shows them pending at once, ends its worker and server processes, asks the Prefect API
    to cancel its chunks' flow runs on a work pool, prints one line
    and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), without waiting for the engine's own
    cleanup (which could take minutes). Flows that call `stop_on_signals` leave SIGTERM to it."""

    def stop(signum: int, frame: object) -> None:
        try:
            with store.connect(db) as con:
                released = store.release_claims(con, os.getpid(), socket.gethostname())
            note = f"released {released} claimed run{'s' * (released != 1)} (pending again)"
        except Exception as e:  # the ledger busy, say: the claims of a dead process read as pending anyway
            note = f"claims not released ({type(e).__name__}); they read as pending once this process has ended"
        for pool in _POOLS:
            pool.cancel()
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"ifledger: {what}; {note}; finished chunks are kept and `ifledger verify` resumes",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    _HANDLERS.append(stop)
    try:
        yield
    finally:
        _HANDLERS.pop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_on_signals() -> None:
    """Called first in a flow's body: hand SIGINT and SIGTERM back to the `interruptible` block the flow runs in,
    if any, until the flow ends (its engine then restores the handler it found: the block's, or an outer flow's
    engine's). A flow run's engine takes SIGTERM for its crash handling, which reports to the Prefect API first:
    82 s, exit 1 and claims left `running` when the temporary server had got the same SIGTERM. Outside an
    `interruptible` block (a scheduled deployment, whose runner cancels a flow run by SIGTERM) the engine keeps it."""
    if _HANDLERS and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _HANDLERS[-1])
