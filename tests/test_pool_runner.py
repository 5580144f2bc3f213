"""`verify --runner pool`: each chunk a flow run of the `ifledger-retrain-chunk` deployment on a Prefect work pool,
served here by two real `prefect worker start` processes; the outcomes are the thread runner's, and bad options
are refused in one line with the ledger unchanged."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import file_digest
from test_scheduling import HANG, JOBS, assert_same_outcomes, finish, ifledger, query, registered  # noqa: F401

from flows.runner import CHUNK_FLOW, Runner, check_work_pool, chunk_deployment, chunk_folder
from store import InputError

POOL = "ifledger-test-pool"
CHUNK_SIZE = "10"  # 4 chunks: 2 rounds of the 2 workers


@pytest.fixture(scope="module")
def work_pool(prefect_harness, tmp_path_factory) -> Iterator[dict[str, str]]:
    """A process work pool on the test harness's Prefect server and two workers polling it every second (killed
    with their flow runs at the end); the environment that points a command at that server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import get_current_settings
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    env = {"PREFECT_API_URL": get_current_settings().api.url}
    folder = tmp_path_factory.mktemp("workers")
    workers = []
    try:
        for i in range(2):
            log = (folder / f"worker{i}.log").open("w")
            workers.append(subprocess.Popen(  # one flow run at a time each, as a worker given one GPU would run
                [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL, "--name", f"w{i}",
                 "--limit", "1"],
                cwd=folder, env={**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "1", "TQDM_DISABLE": "1"},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield env
    finally:
        for worker in workers:
            for process in [*_flow_run_processes(worker.pid), psutil.Process(worker.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            worker.wait()


def _flow_run_processes(worker: int) -> list[psutil.Process]:
    """The flow-run processes a worker started (each in a session of its own)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return [p for p in psutil.Process(worker).children() if "prefect.engine" in " ".join(p.cmdline())]
    return []


def _chunk_flow_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[CHUNK_FLOW])))


@pytest.fixture(scope="module")
def reference(registered, work_pool) -> Path:  # noqa: F811
    """The thread runner's verify of the registered ledger, at the pool verifies' chunk size."""
    db = registered.with_name("pool-reference.duckdb")
    shutil.copy(registered, db)
    finish(ifledger(db, "verify", "--chunk-size", CHUNK_SIZE, env=work_pool))
    return db


def _verify_on_the_pool(db: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return ifledger(db, "verify", "--runner", "pool", "--pool", POOL, "--workers", "2", "--chunk-size", CHUNK_SIZE,
                    *args, env=env)


@pytest.mark.full
def test_pool_runner_gets_the_thread_runners_outcomes(registered, reference, work_pool):  # noqa: F811
    db = registered.with_name("pool.duckdb")
    shutil.copy(registered, db)
    before = {r.id for r in _chunk_flow_runs()}
    out = finish(_verify_on_the_pool(db, work_pool))
    assert f"retrained {JOBS - 2} models: {JOBS - 2} done, 0 failed" in out
    assert query(db, "SELECT DISTINCT status FROM runs") == [("done",)]
    assert query(db, "SELECT count(*) FROM runs") == [(JOBS,)]
    assert_same_outcomes(db, reference, rel=1e-12)
    runs = [r for r in _chunk_flow_runs() if r.id not in before]
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs)  # one flow run per chunk
    # two at once, so on both workers (each takes one at a time)
    assert any(a.start_time < b.end_time and b.start_time < a.end_time for a in runs for b in runs if a.id != b.id)
    assert not chunk_folder(str(db)).exists()  # every chunk's inputs and results read and removed


@pytest.mark.full
def test_a_crashed_chunk_flow_run_is_a_failed_chunk_with_its_reason(registered, reference, work_pool):  # noqa: F811
    """A chunk's flow-run process killed (SIGKILL): its runs are recorded failed, saying so, the other chunks done;
    `--retry-failed` retrains them to the thread runner's outcomes."""
    db = registered.with_name("crashed.duckdb")
    shutil.copy(registered, db)
    verify = _verify_on_the_pool(db, work_pool)
    workers = [p.pid for p in psutil.Process().children() if "worker" in p.cmdline()]
    deadline = time.monotonic() + HANG
    while not (running := [p for w in workers for p in _flow_run_processes(w)]):
        assert verify.poll() is None and time.monotonic() < deadline, verify.communicate()[1][-2000:]
        time.sleep(0.2)
    running[0].kill()
    out = finish(verify)
    assert f"retrained {JOBS - 2} models: {JOBS - 2 - 10} done, 10 failed" in out
    (reason,) = query(db, "SELECT DISTINCT reason FROM runs WHERE status = 'failed'")[0]
    assert "crashed" in reason and "SIGKILL" in reason, reason
    out = finish(_verify_on_the_pool(db, work_pool, "--retry-failed"))
    assert "retrained 10 models: 10 done, 0 failed" in out
    assert_same_outcomes(db, reference, rel=1e-12)


@pytest.mark.full
def test_ctrl_c_releases_the_claims_and_cancels_the_chunk_flow_runs(registered, work_pool):  # noqa: F811
    """SIGINT to a verify with two chunks in flight: exit 130 at once, no run left `running`, and both flow runs
    asked to cancel (Cancelling, or already Cancelled by their worker)."""
    db = registered.with_name("interrupted.duckdb")
    shutil.copy(registered, db)
    before = {r.id for r in _chunk_flow_runs()}
    verify = _verify_on_the_pool(db, work_pool)
    deadline = time.monotonic() + HANG
    while len(runs := [r for r in _chunk_flow_runs() if r.id not in before]) < 2:
        assert verify.poll() is None and time.monotonic() < deadline, verify.communicate()[1][-2000:]
        time.sleep(0.2)
    verify.send_signal(signal.SIGINT)
    _, err = verify.communicate(timeout=HANG)
    assert verify.returncode == 130 and "pending again" in err, err[-2000:]
    assert query(db, "SELECT count(*) FROM runs WHERE status = 'running'") == [(0,)]
    states = {r.id: r.state.name for r in _chunk_flow_runs() if r.id in {run.id for run in runs}}
    assert set(states.values()) <= {"Cancelling", "Cancelled"}, states


@pytest.mark.full
def test_chunk_deployment_runs_this_checkout_on_the_pool(work_pool):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(chunk_deployment(POOL))
    assert deployment.name == CHUNK_FLOW and deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/runner.py:retrain_chunk"
    assert Path(deployment.path or "").resolve() == Path(__file__).resolve().parents[1]


@pytest.mark.full
@pytest.mark.parametrize("argv, message", [
    (["--runner", "pool", "--pool", "no-such-pool"], "create it with `prefect work-pool create no-such-pool --type"),
    (["--runner", "process", "--pool", POOL], "--pool names a Prefect work pool: use it with --runner pool"),
    (["--runner", "pool"], "name it with --pool NAME"),
])
def test_verify_refuses_bad_pool_options(registered, work_pool, argv, message, capsys):  # noqa: F811
    from flows.cli import main

    db = registered.with_name("refused.duckdb")
    shutil.copy(registered, db)
    before = file_digest(db)
    assert main(["--db", str(db), "verify", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert file_digest(db) == before


@pytest.mark.full
def test_pool_runner_refuses_the_temporary_server(registered):  # noqa: F811
    db = registered.with_name("no-api.duckdb")
    shutil.copy(registered, db)
    before = file_digest(db)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    verify = subprocess.Popen([sys.executable, "-m", "flows.cli", "--db", str(db), "verify", "--runner", "pool",
                               "--pool", POOL], cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _, err = verify.communicate(timeout=HANG)
    assert verify.returncode == 2 and "set PREFECT_API_URL" in err and len(err.strip().splitlines()) == 1, err
    assert file_digest(db) == before


@pytest.mark.parametrize("kind, pool, message", [
    ("thread", "gpus", "use it with --runner pool"),
    ("dask", "gpus", "use it with --runner pool"),
    ("pool", None, "--runner pool sends chunks to a Prefect work pool: name it with --pool NAME"),
])
def test_runner_refuses_pool_options_that_do_not_go_together(kind, pool, message):
    with pytest.raises(InputError, match=message):
        Runner.of(kind, None, None, pool)


def test_a_work_pool_needs_a_configured_api(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import server

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(InputError, match="set PREFECT_API_URL"):
        check_work_pool("gpus")
    url = "http://127.0.0.1:9/api"  # a temporary server of this process: its workers could not rely on it
    monkeypatch.setattr(server, "_TEMPORARY", {url})
    with temporary_settings({PREFECT_API_URL: url}), pytest.raises(InputError, match="set PREFECT_API_URL"):
        check_work_pool("gpus")


def test_an_unreachable_api_is_refused():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), \
            pytest.raises(InputError, match="cannot reach the Prefect API at http://127.0.0.1:9/api"):
        check_work_pool("gpus")


def test_chunk_folder_is_beside_the_ledger(tmp_path):
    assert chunk_folder(str(tmp_path / "l.duckdb")) == tmp_path / "l.duckdb.pool"
