"""The verify queue through real `ifledger` processes: a SIGKILLed verify resumes without losing or redoing a
finished chunk, readers succeed while it writes, runners agree, and the schedule is built as asked."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

STUDY = '''
from retrain import Recipe
from retrain.studies.digits import DigitsMLP


class TinyDigits(DigitsMLP):
    """digits-mlp with 2 seeds, 20 epochs, 5 measurements, scratch only (test-sized)."""

    name = "digits-tiny"
    recipe = Recipe(optimizer="sgd", epochs=20, lr=0.05, momentum=0.9, batch_size=64, weight_decay=1e-3,
                    seeds=2, damping=2e-3, warm_epochs=5, pbrf_steps=20)
    n_measurements = 5
    default_regimes = ("scratch",)
'''
JOBS = 2 * 21  # 2 seeds x (20 single removals + the full-data baseline)
OUTCOMES = "SELECT run_id, measurement_id, value FROM outcomes ORDER BY ALL"
FINISHED = "SELECT run_id, status, finished_at FROM runs WHERE status IN ('done', 'failed') ORDER BY run_id"


def ifledger(db: Path, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--db", str(db), *args],
                            cwd=Path(__file__).parents[1], env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


pytestmark = pytest.mark.full  # every test here drives real `ifledger` processes or the queue's claims
HANG = 600  # seconds: a guard against a hung process, not a speed test (a loaded 2-core runner is slow)


def finish(proc: subprocess.Popen, timeout: float = HANG) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return out


def assert_same_outcomes(db: Path, reference: Path, rel: float) -> None:
    """The same (run, measurement) outcomes as `reference`, values to `rel`: bit equality is only what the code
    guarantees (the same operations in the same order and thread count), so other runners, whose workers run at
    cores ÷ workers torch threads, and other chunk sizes are compared to a tolerance."""
    mine, theirs = query(db, OUTCOMES), query(reference, OUTCOMES)
    assert [r[:2] for r in mine] == [r[:2] for r in theirs]
    assert [r[2] for r in mine] == pytest.approx([r[2] for r in theirs], rel=rel, abs=1e-15)


def query(db: Path, sql: str) -> list[tuple]:
    """Read the ledger from the test process, waiting out the writer's short batches."""
    for _ in range(200):
        try:
            con = duckdb.connect(str(db), read_only=True)
        except duckdb.IOException:
            time.sleep(0.05)
            continue
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    raise TimeoutError(f"could not read {db}")


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("queue")
    (folder / "tiny.py").write_text(STUDY)
    db = folder / "registered.duckdb"
    finish(ifledger(db, "register", f"{folder / 'tiny.py'}:TinyDigits", "--methods", "grad_dot",
                    "--sets", "single:n=20"))
    assert query(db, "SELECT count(*) FROM runs") == [(2,)]  # the full-data baselines
    return db


@pytest.fixture(scope="module")
def reference(registered) -> dict:
    """An uninterrupted verify, read by `ifledger status`, `calibrate` and then `sql` from other processes (two at a
    time) for as long as it writes. Same chunk size as the killed verify below: outcomes are bit-identical only for
    the same chunks."""
    db = registered.with_name("reference.duckdb")
    shutil.copy(registered, db)
    verify = ifledger(db, "verify", "--chunk-size", "2", env={"IFLEDGER_THREADS": "1"})  # the readers get a core
    while not query(db, "SELECT count(*) FROM runs WHERE status = 'running'")[0][0]:
        assert verify.poll() is None, verify.communicate()[1][-2000:]
        time.sleep(0.1)
    batch = [("status", "--format", "csv"), ("calibrate", "--format", "csv"), ("sql", "SELECT count(*) FROM runs")]
    reads = []  # (command, exit code, stdout, stderr, whether verify was still writing when the read ended)
    while verify.poll() is None:  # every batch starts while verify writes
        readers = [(args[0], ifledger(db, *args)) for args in batch]
        for command, reader in readers:
            out, err = reader.communicate(timeout=HANG)
            reads.append((command, reader.returncode, out, err, verify.poll() is None))
        batch = [("sql", "SELECT count(*) FROM runs")] * 2
    finish(verify)
    return {"db": db, "reads": reads}


def session(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # fields 6 (session) and 3 (state)
                found.append(int(stat.parent.name))
    return sorted(found)


def status(out: str) -> dict[str, str]:
    header, row = out.splitlines()
    return {k: v for k, v in zip(header.split(","), row.split(",")) if k in ("pending", "running", "done", "failed")}


def test_readers_succeed_while_verify_writes(reference):
    """Every read started while verify wrote succeeded, and at least one also ended before verify did (a read that
    overlapped the writes). Which reads end in time depends only on the processes' relative speed (13 `sql` reads on
    a loaded 2-core CI; on an idle one verify can finish before a `calibrate` reader has started its Prefect
    server), so the test asks for each command started during verify and one read ended during it, not for a
    count."""
    reads = reference["reads"]
    assert {r[0] for r in reads} == {"status", "calibrate", "sql"}
    assert all(code == 0 for _, code, _, _, _ in reads), [err for _, code, _, err, _ in reads if code]
    during = [r for r in reads if r[4]]
    assert during, "no read ended while verify wrote"
    for out in [r[2] for r in during if r[0] == "status"]:
        assert int(status(out)["running"]) >= 1  # claimed by the live verify


def test_killed_verify_resumes_without_losing_or_redoing_a_chunk(registered, reference):
    db = registered.with_name("killed.duckdb")
    shutil.copy(registered, db)
    verify = ifledger(db, "verify", "--chunk-size", "2", start_new_session=True)
    done = "SELECT count(*) FROM runs WHERE status = 'done' AND started_at IS NOT NULL"
    while query(db, done)[0][0] < 4:  # two chunks of this verify finished
        assert verify.poll() is None, verify.communicate()[1][-2000:]
        time.sleep(0.1)
    assert session(verify.pid) != [verify.pid]  # it started its temporary Prefect server
    verify.send_signal(signal.SIGKILL)
    verify.wait()
    try:
        deadline = time.monotonic() + 10
        while session(verify.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session(verify.pid) == []  # the server died with it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(verify.pid, signal.SIGKILL)
    verify.communicate()
    before = query(db, FINISHED)
    assert len(before) < JOBS, "verify finished before it was killed"
    assert query(db, "SELECT count(*) FROM runs r LEFT JOIN outcomes o USING (run_id) "
                     "WHERE r.status = 'done' AND o.run_id IS NULL OR r.status <> 'done' AND o.run_id IS NOT NULL"
                 ) == [(0,)]  # no half-written chunk

    done, failed = len(before), 0
    assert status(finish(ifledger(db, "status", "--format", "csv"))) == {  # the dead verify's chunk is pending again
        "pending": str(JOBS - done), "running": "0", "done": str(done), "failed": str(failed)}

    out = finish(ifledger(db, "verify", "--chunk-size", "2"))
    assert f"retrained {JOBS - len(before)} models" in out
    after = query(db, FINISHED)
    assert len(after) == JOBS and {r[1] for r in after} == {"done"}
    assert set(before) <= set(after)  # finished runs were not redone: same finished_at
    assert_same_outcomes(db, reference["db"], rel=1e-12)  # threads may differ: another ifledger was computing
    assert query(db, "SELECT count(*) - count(DISTINCT (run_id, measurement_id)) FROM outcomes") == [(0,)]


def test_a_long_read_during_verify_leaves_verify_finishing_every_run(registered):
    """A read that holds the ledger longer than a reader's patience (20 s here; 37 s made verify give up and drop a
    trained chunk): verify keeps its finished chunk, waits, saying so, and records every outcome."""
    db = registered.with_name("long-read.duckdb")
    shutil.copy(registered, db)
    verify = ifledger(db, "verify", "--chunk-size", "2")
    # past its first chunk (the study loaded, torch warmed up): the next chunks end well within the read
    while query(db, "SELECT count(*) FROM runs WHERE status = 'done' AND started_at IS NOT NULL")[0][0] < 2:
        assert verify.poll() is None, verify.communicate()[1][-2000:]
        time.sleep(0.1)
    reader = ifledger(db, "sql", "SELECT count(*) FROM range(1e13::BIGINT) t(i) WHERE hash(i) % 7 = 1",
                      "--timeout", "20")
    _, err = reader.communicate(timeout=HANG)
    assert reader.returncode == 2 and "longer than 20 s" in err and len(err.strip().splitlines()) == 1
    out, err = verify.communicate(timeout=HANG)
    assert verify.returncode == 0, err[-2000:]
    assert "is busy" in err and "waiting" in err
    assert len(query(db, FINISHED)) == JOBS and {r[1] for r in query(db, FINISHED)} == {"done"}
    assert query(db, "SELECT count(*) FROM outcomes") == [(JOBS * 5,)]  # 5 measurements of every run


def test_commands_succeed_under_a_cpu_hog(tmp_path):
    """Four busy processes on the machine: the command's temporary Prefect server starts slower than Prefect's
    20 s default, and `run` (register, verify, calibrate and report under that one server) still succeeds."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        db = tmp_path / "hog.duckdb"
        out = finish(ifledger(db, "run", "linreg", "--sets", "single:n=4", "--report-dir", str(tmp_path / "r")))
        assert all(proc.poll() is None for proc in hogs)  # the load lasted while the command ran
        assert "registered 400 new predictions" in out and "retrained 8 models: 8 done" in out
        assert "exact   scratch  single" in out and "chain head: seq" in out
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_verify_reports_progress_off_a_terminal_and_stops_on_a_signal_releasing_its_claims(registered, signum, code):
    """Output to a pipe: a progress line every second (done/total, models/s, ETA). Ctrl-C or SIGTERM, sent to the
    process group as a terminal or a job scheduler does (the temporary Prefect server gets it too): one line, exit
    130 or 143 within 10 s, and no run left `running`, so that `status` shows the claimed jobs pending at once."""
    db = registered.with_name(f"interrupted-{signum}.duckdb")
    shutil.copy(registered, db)
    verify = ifledger(db, "verify", "--chunk-size", "2", env={"IFLEDGER_PROGRESS_SECONDS": "1"},
                      start_new_session=True)
    lines = []
    while not any(re.search(r"scratch \d+/40 models, [\d.e+-]+ models/s, eta \d+:\d\d:\d\d", x) for x in lines):
        line = verify.stderr.readline()
        assert line, (verify.wait(timeout=HANG), lines[-20:])
        lines.append(line)
    assert query(db, "SELECT count(*) FROM runs WHERE status = 'running'")[0][0] > 0
    start = time.monotonic()
    os.killpg(verify.pid, signum)
    returned = verify.wait(timeout=HANG)
    elapsed = time.monotonic() - start
    rest = verify.stderr.read().strip().splitlines()
    assert returned == code and elapsed < 10, (returned, elapsed, rest[-20:])
    # one line beside progress (and the notice a write prints while this test's own read holds the lock)
    assert [x for x in rest if "models/s" not in x and " models" not in x and "is busy" not in x] == [rest[-1]]
    assert ("interrupted" if signum == signal.SIGINT else "stopped by SIGTERM") in rest[-1]
    assert "pending again" in rest[-1]
    assert query(db, "SELECT count(*) FROM runs WHERE status = 'running'") == [(0,)]
    counts = status(finish(ifledger(db, "status", "--format", "csv")))
    assert counts["running"] == "0" and int(counts["pending"]) > 0


def test_two_verifies_at_once_share_the_work_without_redoing_any(registered, reference):
    """Overlapping verifies (a scheduled run that outlasts its interval): each job is claimed by one of them."""
    db = registered.with_name("twice.duckdb")
    shutil.copy(registered, db)
    one_core_each = {"OMP_NUM_THREADS": "1"}
    outs = [finish(p) for p in [ifledger(db, "verify", "--chunk-size", "4", env=one_core_each) for _ in range(2)]]
    trained = [int(re.search(r"retrained (\d+) models", out)[1]) for out in outs]
    assert sum(trained) == JOBS - 2, outs
    assert any("by another verify" in out for out in outs), outs
    assert {r[1] for r in query(db, FINISHED)} == {"done"} and len(query(db, FINISHED)) == JOBS
    assert_same_outcomes(db, reference["db"], rel=1e-9)  # chunks differ: models trained together share rounding


@pytest.mark.parametrize("runner", ["process"])  # dask: a local cluster in tests/test_finetune.py, a given one below
def test_other_runners_get_the_thread_runners_outcomes(registered, reference, runner):
    db = registered.with_name(f"{runner}.duckdb")
    shutil.copy(registered, db)
    verify = ifledger(db, "verify", "--chunk-size", "2", "--runner", runner, "--workers", "2")
    out, err = verify.communicate(timeout=HANG)
    assert verify.returncode == 0, err[-2000:]
    assert f"retrained {JOBS - 2} models: {JOBS - 2} done" in out
    assert "INFO" not in err  # the workers' logs are quiet unless --verbose
    assert_same_outcomes(db, reference["db"], rel=1e-12)


def test_dask_runner_uses_an_existing_scheduler_at_address(registered, reference):
    from distributed import LocalCluster

    db = registered.with_name("address.duckdb")
    shutil.copy(registered, db)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        out = finish(ifledger(db, "verify", "--chunk-size", "2", "--runner", "dask", "--address",
                              cluster.scheduler_address))
        assert cluster.scheduler.task_prefixes  # the work went through this scheduler
    assert f"retrained {JOBS - 2} models: {JOBS - 2} done" in out
    assert_same_outcomes(db, reference["db"], rel=1e-12)


def test_schedule_builds_the_verify_deployment(tmp_path):
    from flows.configs import VerifyConfig
    from flows.schedule import verify_deployment

    config = VerifyConfig(str(tmp_path / "l.duckdb"), "linreg", runner="process", workers=2)
    hourly = verify_deployment("nightly", config, every="90m")
    assert hourly.name == "nightly" and hourly.flow_name == "verify"
    assert [s.schedule.interval for s in hourly.schedules] == [timedelta(minutes=90)]
    assert hourly.parameters == {"config": {"db": str(tmp_path / "l.duckdb"), "study": "linreg", "regimes": (),
                                            "chunk_size": 64, "retry_failed": False, "runner": "process",
                                            "workers": 2, "address": None, "device": "cpu", "pool": None}}
    (cron,) = verify_deployment("c", VerifyConfig("l.duckdb"), cron="0 * * * *").schedules
    assert cron.schedule.cron == "0 * * * *"


@pytest.mark.parametrize("argv, message", [
    (["--every", "soon"], "--every 'soon'"),
    (["--every", "0h"], "--every '0h'"),
    (["--cron", "61 * * *"], "not a cron expression"),
    (["--every", "1h", "--runner", "thread", "--workers", "3"], "one task at a time"),
])
def test_schedule_refuses_bad_input(argv, message, capsys):
    from flows.cli import main

    assert main(["schedule", "verify", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_running_runs_of_dead_or_old_processes_are_pending_again(tmp_path):
    import store
    from store import PredictionRecord, RemovalSetRecord, RunRecord, StudyRecord

    sets = [RemovalSetRecord("h0", "single", f"single:{i}", (i,)) for i in range(5)]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with store.connect(tmp_path / "l.duckdb") as con:
        store.register_study(con, StudyRecord("toy", "h0", "toy", {}, n_train=10, n_params=3, measurements={"m": ""}))
        store.register_removal_sets(con, sets)
        store.register_predictions(con, [PredictionRecord("h0", "exact", {}, s.set_id, "m", 0.1) for s in sets], "t")
        store.record_runs(con, [RunRecord("h0", store.full_set_id("h0"), 0, "scratch", "done", outcomes={"m": 1.0}),
                                RunRecord("h0", sets[0].set_id, 0, "scratch", "failed", reason="diverged")])
        store.start_runs(con, "h0", [(s.set_id, 0, "scratch") for s in sets[1:]])  # by this live process
        con.execute("UPDATE runs SET pid = ? WHERE set_id = ?", [dead.pid, sets[2].set_id])
        con.execute("UPDATE runs SET started_at = started_at - INTERVAL 13 HOUR WHERE set_id = ?", [sets[3].set_id])
        # a claim by an earlier process whose pid is now this live one's: the start time tells them apart
        con.execute("UPDATE runs SET pid_start = pid_start - 1 WHERE set_id = ?", [sets[4].set_id])
        states = {s: state for s, _, _, state, _ in store.job_states(con, "h0", [0], ["scratch"])}
        assert [states[s.set_id] for s in sets] == ["failed", "running", "pending", "pending", "pending"]
        assert store.pending_jobs(con, "h0", [0], ["scratch"]) == sorted(
            [(s.set_id, 0, "scratch") for s in sets[2:]])
        assert sorted(store.pending_jobs(con, "h0", [0], ["scratch"], retry_failed=True)) == sorted(
            [(s.set_id, 0, "scratch") for s in (sets[0], *sets[2:])])


def test_a_claim_leaves_jobs_done_or_running_elsewhere_alone(tmp_path):
    import store
    from store import RemovalSetRecord, RunRecord, StudyRecord

    sets = [RemovalSetRecord("h0", "single", f"single:{i}", (i,)) for i in range(4)]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another live verify
    try:
        with store.connect(tmp_path / "l.duckdb") as con:
            store.register_study(con, StudyRecord("toy", "h0", "toy", {}, n_train=10, n_params=3,
                                                  measurements={"m": ""}))
            store.register_removal_sets(con, sets)
            store.record_runs(con, [RunRecord("h0", sets[0].set_id, 0, "scratch", "done", outcomes={"m": 1.0}),
                                    RunRecord("h0", sets[3].set_id, 0, "scratch", "failed", reason="diverged")])
            store.start_runs(con, "h0", [(sets[1].set_id, 0, "scratch")])
            con.execute("UPDATE runs SET pid = ?, pid_start = ? WHERE set_id = ?",
                        [other.pid, store.process_start(other.pid), sets[1].set_id])
            jobs = [(s.set_id, 0, "scratch") for s in sets]
            assert store.start_runs(con, "h0", jobs) == jobs[2:3]  # failed in the meantime: left alone
            assert con.execute("SELECT pid FROM runs WHERE set_id = ?", [sets[1].set_id]).fetchall() == [(other.pid,)]
            assert store.start_runs(con, "h0", jobs, retry_failed=True) == jobs[3:]
            other.kill()
            other.wait()
            assert store.start_runs(con, "h0", jobs) == jobs[1:2]  # its claim died with it; ours are still live
    finally:
        other.kill()
        other.wait()


def test_a_reader_gives_up_on_a_held_lock_with_one_line(tmp_path):
    db = tmp_path / "l.duckdb"
    holder = duckdb.connect(str(db))  # a writer that does not let go
    try:
        start = time.monotonic()
        reader = ifledger(db, "sql", "SELECT 1")
        _, err = reader.communicate(timeout=HANG)
    finally:
        holder.close()
    assert reader.returncode == 2
    assert "busy: gave up after waiting 10 s" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - start >= 10  # it retried with backoff first
