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
from collections.abc import Iterator
from pathlib import Path

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
            workers.append(subprocess.Popen(
                [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL, "--name", f"w{i}"],
                cwd=folder, env={**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "1", "TQDM_DISABLE": "1"},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield env
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)  # the worker and the flow runs it started
            worker.wait()


def _chunk_flow_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[CHUNK_FLOW])))


@pytest.mark.full
def test_pool_runner_gets_the_thread_runners_outcomes(registered, work_pool):  # noqa: F811
    reference = registered.with_name("pool-reference.duckdb")
    shutil.copy(registered, reference)
    finish(ifledger(reference, "verify", "--chunk-size", CHUNK_SIZE, env=work_pool))
    db = registered.with_name("pool.duckdb")
    shutil.copy(registered, db)
    verify = ifledger(db, "verify", "--runner", "pool", "--pool", POOL, "--workers", "2", "--chunk-size", CHUNK_SIZE,
                      env=work_pool)
    out = finish(verify)
    assert f"retrained {JOBS - 2} models: {JOBS - 2} done, 0 failed" in out
    assert query(db, "SELECT DISTINCT status FROM runs") == [("done",)]
    assert query(db, "SELECT count(*) FROM runs") == [(JOBS,)]
    assert_same_outcomes(db, reference, rel=1e-12)
    runs = _chunk_flow_runs()
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs)  # one flow run per chunk
    assert not chunk_folder(str(db)).exists()  # every chunk's inputs and results read and removed


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
