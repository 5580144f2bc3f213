"""The verify queue: a job is (removal set, seed, regime) with registered predictions (or the full-data
baseline). Its state is read from its run row: `done`, `failed`, `running` (claimed by a live process) or
`pending` (no run, or a claim whose process is gone). Claims are queue state, not results: they are not chained."""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import duckdb

from store.chain import append, latest_entries
from store.connection import insert, now, transaction
from store.ledger import full_set_id
from store.records import run_id

STALE_AFTER = dt.timedelta(hours=12)  # a `running` run older than this is pending again, whatever its process


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or None when it
    is not running. With the pid it names one process even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # fields[0] is field 3 (state); field 22 is fields[19]


def _alive(pid: int, started: int | None) -> bool:
    """Whether the process `pid` of this host that started at `started` is running (a zombie is not; a
    process that reused the pid is not). Without a recorded start time (older ledgers), any process with the
    pid counts."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    current = process_start(pid)
    if current is None:
        return not Path("/proc").is_dir() and started is None  # no /proc: trust the pid alone
    return started is None or current == started


def _live(pid: int | None, pid_start: int | None, host: str | None, started_at: dt.datetime | None) -> bool:
    """A `running` row is live while its process is (same host) and it is younger than STALE_AFTER."""
    if started_at is None or now() - started_at > STALE_AFTER:
        return False
    return host != socket.gethostname() or (pid is not None and _alive(pid, pid_start))


def _state(status: str | None, pid: int | None, pid_start: int | None, host: str | None,
           started_at: dt.datetime | None) -> str:
    """A job's queue state from its run row: the run's status, except that no run or a stale `running` one is
    `pending`."""
    if status is None or (status == "running" and not _live(pid, pid_start, host, started_at)):
        return "pending"
    return status


def _claimable(retry_failed: bool) -> tuple[str, ...]:
    """The states a verify takes up: pending, and failed when asked to retry."""
    return ("pending", "failed") if retry_failed else ("pending",)


def start_runs(con: duckdb.DuckDBPyConnection, study_hash: str, jobs: Sequence[tuple[str, int, str]],
               retry_failed: bool = False) -> list[tuple[str, int, str]]:
    """Claim (set_id, seed, regime) jobs as `running` by this process, in one transaction, and return those
    claimed: a job already `done` (or `failed`, unless retry_failed), or `running` in another live process (a
    second verify, e.g. an overlapping scheduled one), is left alone. A failed run claimed again gets a retry
    entry in the chain (status `running`); other claims are queue state, not chained. One writer at a time holds
    the file, so two verifies never claim the same job."""
    with transaction(con):
        states = {}
        if jobs:
            ids = [run_id(study_hash, *j) for j in jobs]
            rows = con.execute("SELECT set_id, seed, regime, status, pid, pid_start, host, started_at FROM runs "
                               "WHERE study_hash = ? AND run_id IN (SELECT unnest(?::VARCHAR[]))", [study_hash, ids]
                               ).fetchall()
            states = {(s, seed, r): _state(*run) for s, seed, r, *run in rows}
        claimed = [tuple(j) for j in jobs if states.get(tuple(j), "pending") in _claimable(retry_failed)]
        me, my_start, host, started = os.getpid(), process_start(os.getpid()), socket.gethostname(), now()
        insert(con, "runs", ("run_id", "study_hash", "set_id", "seed", "regime", "status", "pid", "pid_start", "host",
                             "started_at"),
               [[run_id(study_hash, s, seed, r), study_hash, s, seed, r, "running", me, my_start, host, started]
                for s, seed, r in claimed],
               conflict="ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, reason = NULL, "
                        "pid = excluded.pid, pid_start = excluded.pid_start, host = excluded.host, "
                        "started_at = excluded.started_at, finished_at = NULL")
        # a failed run taken up again: its retry entry, so that `running` over `failed` is no silent edit
        append(con, "runs", [run_id(study_hash, *j) for j in claimed if states.get(j) == "failed"], claims=True)
    return claimed


def job_states(
    con: duckdb.DuckDBPyConnection, study_hash: str, seeds: Sequence[int], regimes: Sequence[str]
) -> list[tuple[str, int, str, str, float | None]]:
    """(set_id, seed, regime, state, seconds) of every job that has registered predictions (or is the
    full-data baseline): state `done`, `failed`, `running` (claimed by a live process) or `pending` (no run,
    or a stale `running` one). Ordered so that baselines come first. A seed and regime whose baseline failed
    has no other job: its runs could give no effect."""
    rows = con.execute(
        """
        WITH wanted AS (
            SELECT DISTINCT set_id FROM predictions WHERE study_hash = $study
            UNION SELECT set_id FROM removal_sets WHERE study_hash = $study AND kind = 'full'
        )
        SELECT w.set_id, s.seed, g.regime, r.status, r.seconds, r.pid, r.pid_start, r.host, r.started_at
        FROM wanted w
        JOIN removal_sets rs ON rs.set_id = w.set_id
        CROSS JOIN unnest($seeds::INTEGER[]) s(seed)
        CROSS JOIN unnest($regimes::VARCHAR[]) g(regime)
        LEFT JOIN runs r ON r.set_id = w.set_id AND r.seed = s.seed AND r.regime = g.regime
        ORDER BY rs.kind <> 'full', g.regime, s.seed, w.set_id
        """,
        {"study": study_hash, "seeds": list(seeds), "regimes": list(regimes)},
    ).fetchall()
    full = full_set_id(study_hash)
    failed = failed_baselines(con, study_hash, full)
    return [(set_id, int(seed), regime, _state(status, *claim), seconds)
            for set_id, seed, regime, status, seconds, *claim in rows
            if set_id == full or (seed, regime) not in failed]


def pending_jobs(
    con: duckdb.DuckDBPyConnection, study_hash: str, seeds: Sequence[int], regimes: Sequence[str],
    retry_failed: bool = False,
) -> list[tuple[str, int, str]]:
    """(set_id, seed, regime) with registered predictions (or the full-data baseline) and no finished run
    (`done`, or `failed` unless `retry_failed`) nor a live `running` one. Baselines first."""
    return [(s, seed, r) for s, seed, r, state, _ in job_states(con, study_hash, seeds, regimes)
            if state in _claimable(retry_failed)]


def failed_baselines(con: duckdb.DuckDBPyConnection, study_hash: str, full_set_id: str) -> dict[tuple[int, str], str]:
    """(seed, regime) -> reason for every full-data baseline run of the study that failed."""
    rows = con.execute("SELECT seed, regime, reason FROM runs WHERE study_hash = ? AND set_id = ? "
                       "AND status = 'failed'", [study_hash, full_set_id]).fetchall()
    return {(int(seed), regime): reason for seed, regime, reason in rows}


def regimes_run(con: duckdb.DuckDBPyConnection, study_hash: str) -> list[str]:
    """The regimes that have any run of the study, sorted."""
    return [r for (r,) in con.execute("SELECT DISTINCT regime FROM runs WHERE study_hash = ? ORDER BY regime",
                                      [study_hash]).fetchall()]


def trainable_seeds(con: duckdb.DuckDBPyConnection, study_hash: str, full_set_id: str) -> list[int]:
    """The study's seeds (its recipe's `seeds`) but those whose full-data model failed to train and was not
    supplied by the study, sorted."""
    (n,) = con.execute("SELECT CAST(config->'$.recipe.seeds' AS INTEGER) FROM studies WHERE study_hash = ?",
                       [study_hash]).fetchone() or (0,)
    failed = {seed for seed, regime in failed_baselines(con, study_hash, full_set_id) if regime == "scratch"}
    kept = {s for (s,) in con.execute("SELECT seed FROM models WHERE study_hash = ?", [study_hash]).fetchall()}
    return [s for s in range(n or 0) if s not in failed or s in kept]


def recent_throughput(con: duckdb.DuckDBPyConnection, study_hash: str) -> dict[str, tuple[int, float]]:
    """Per regime, the pace of the verify that finished a run of it last (the current one while it runs):
    (models it finished, seconds from its first claim to its last finish). Models train in parallel chunks,
    so this wall-clock rate, not the sum of per-model seconds, is what predicts the time left."""
    rows = con.execute(
        """
        WITH claimed AS (
            SELECT * FROM runs WHERE study_hash = $h AND finished_at IS NOT NULL AND started_at IS NOT NULL
        ), latest AS (
            SELECT regime, arg_max(pid, finished_at) AS pid, arg_max(host, finished_at) AS host
            FROM claimed GROUP BY regime
        )
        SELECT c.regime, count(*), epoch(max(c.finished_at) - min(c.started_at))
        FROM claimed c JOIN latest l ON c.regime = l.regime AND c.pid = l.pid AND c.host = l.host
        GROUP BY c.regime
        """, {"h": study_hash}).fetchall()
    return {regime: (int(n), float(seconds)) for regime, n, seconds in rows}


def release_claims(con: duckdb.DuckDBPyConnection, pid: int, host: str) -> int:
    """Release the `running` claims of process `pid` on `host` (an interrupted verify), so that their jobs are
    pending at once; returns how many. A claim on a run that was never finished is removed; a claim on a failed
    run taken up again by --retry-failed (chained) stays `running` without a process, which reads as pending."""
    with transaction(con):
        claimed = [r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'running' AND pid = ? "
                                             "AND host = ?", [pid, host]).fetchall()]
        chained = set(latest_entries(con, "runs", claimed)) if claimed else set()
        con.execute("DELETE FROM runs WHERE list_contains($ids, run_id)",
                    {"ids": [r for r in claimed if r not in chained]})
        con.execute("UPDATE runs SET pid = NULL, pid_start = NULL, started_at = NULL "
                    "WHERE list_contains($ids, run_id)", {"ids": sorted(chained)})
    return len(claimed)
