"""The ledger API. The flow is the only writer: open, write one batch in a transaction, close."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from store.records import (
    InputError,
    PredictionRecord,
    RemovalSetRecord,
    RunRecord,
    StudyRecord,
    content_hash,
    removal_set_id,
    run_id,
)

GENESIS = "0" * 64
LOCK_RETRY_SECONDS = 10.0
STALE_AFTER = dt.timedelta(hours=12)  # a `running` run older than this is pending again, whatever its process


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _open(path: str | Path, read_only: bool, config: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """Open the ledger, retrying briefly while another process holds its lock."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--db {path} is a directory; give a DuckDB file path such as {path}/ifledger.duckdb")
    if read_only and not path.exists():
        raise InputError(f"no ledger at {path}; create one with `ifledger run linreg` or pass --db PATH")
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config or {})
        except duckdb.IOException as e:
            message = str(e)
            if "lock" in message.lower() and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if "lock" in message.lower():
                raise InputError(f"ledger {path} is busy: gave up after waiting {LOCK_RETRY_SECONDS:g} s for another "
                                 "process's lock; try again shortly") from e
            raise InputError(f"--db {path} is not a DuckDB ledger ({message.splitlines()[0]})") from e
        except duckdb.Error as e:
            raise InputError(f"--db {path} cannot be opened: {str(e).splitlines()[0]}") from e


@contextlib.contextmanager
def connect(path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Writable connection with the schema in place; closed on exit."""
    con = _open(path, read_only=False)
    try:
        con.execute(resources.files("store").joinpath("schema.sql").read_text())
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def read_only(path: str | Path, sandbox: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """Read-only connection. With `sandbox`, no file outside the ledger can be read or written
    and the configuration is locked, so arbitrary user SQL can read the ledger and nothing else."""
    config = {"enable_external_access": False, "lock_configuration": True} if sandbox else {}
    con = _open(path, read_only=True, config=config)
    try:
        yield con
    finally:
        con.close()


def _insert(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
            conflict: str = "ON CONFLICT DO NOTHING") -> None:
    """Bulk insert through a DataFrame (executemany is row by row)."""
    if not rows:
        return
    frame = pd.DataFrame([list(r) for r in rows], columns=list(columns))  # noqa: F841 (read by DuckDB)
    con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM frame {conflict}")


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def register_study(con: duckdb.DuckDBPyConnection, study: StudyRecord) -> None:
    """Record a study, its measurements and its `full` (empty) removal set; idempotent."""
    with _transaction(con):
        con.execute(
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [study.study_hash, study.name, study.source, json.dumps(study.config, sort_keys=True),
             study.n_train, study.n_params, _now()],
        )
        _insert(con, "measurements", ("study_hash", "measurement_id", "description"),
                [[study.study_hash, m, d] for m, d in study.measurements.items()])
    register_removal_sets(con, [RemovalSetRecord(study.study_hash, "full", "full data", ())])


def register_removal_sets(con: duckdb.DuckDBPyConnection, sets: Sequence[RemovalSetRecord]) -> list[str]:
    """Store removal sets once (content-hashed); returns their ids in order."""
    now = _now()
    with _transaction(con):
        _insert(con, "removal_sets", ("set_id", "study_hash", "kind", "label", "size", "indices", "ranked_by",
                                      "target", "direction", "created_at"),
                [[s.set_id, s.study_hash, s.kind, s.label, len(s.indices), sorted(s.indices), s.ranked_by, s.target,
                  s.direction, now] for s in sets])
    return [s.set_id for s in sets]


def prediction_id(p: PredictionRecord) -> str:
    """A prediction's identity: the same method with the same config on the same (set, measurement)."""
    return content_hash("prediction", p.study_hash, p.method, p.method_config, p.set_id, p.measurement_id)


def _row_hash(prev_hash: str, row: Sequence[Any]) -> str:
    return content_hash(prev_hash, [float(v).hex() if isinstance(v, float) else v for v in row], length=64)


_CHAINED = ("seq, prediction_id, study_hash, method, config_hash, method_config, set_id, measurement_id, "
            "predicted, code_version, registered_at")


def register_predictions(
    con: duckdb.DuckDBPyConnection, predictions: Iterable[PredictionRecord], code_version: str
) -> int:
    """Append new predictions to the hash chain in one transaction; already registered ones are
    skipped (same id). Returns how many were added. row_hash = sha256(prev_hash, row content)."""
    now = _now()
    with _transaction(con):
        known = {r[0] for r in con.execute("SELECT prediction_id FROM predictions").fetchall()}
        last = con.execute("SELECT seq, row_hash FROM predictions ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0], last[1]) if last else (0, GENESIS)
        rows = []
        for p in predictions:
            pid = prediction_id(p)
            if pid in known:
                continue
            known.add(pid)
            seq += 1
            config = json.dumps(p.method_config, sort_keys=True)
            row = [seq, pid, p.study_hash, p.method, content_hash(p.method_config), config, p.set_id,
                   p.measurement_id, float(p.predicted), code_version, now]
            row_hash = _row_hash(prev, row)
            rows.append([*row, prev, row_hash])
            prev = row_hash
        _insert(con, "predictions", [*_CHAINED.split(", "), "prev_hash", "row_hash"], rows, conflict="")
    return len(rows)


def record_runs(con: duckdb.DuckDBPyConnection, runs: Sequence[RunRecord]) -> None:
    """Write finished runs and their outcomes in one transaction (run status is the only update)."""
    now = _now()
    with _transaction(con):
        _insert(con, "runs", ("run_id", "study_hash", "set_id", "seed", "regime", "status", "reason", "seconds",
                              "train_loss", "converged", "finished_at"),
                [[r.run_id, r.study_hash, r.set_id, r.seed, r.regime, r.status, r.reason, r.seconds,
                  r.train_loss, r.converged, now] for r in runs],
                conflict="ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, reason = excluded.reason, "
                         "seconds = excluded.seconds, train_loss = excluded.train_loss, "
                         "converged = excluded.converged, finished_at = excluded.finished_at")
        _insert(con, "outcomes", ("run_id", "measurement_id", "value"),
                [[r.run_id, m, float(v)] for r in runs if r.status == "done" for m, v in r.outcomes.items()])


def save_models(con: duckdb.DuckDBPyConnection, study_hash: str, params: dict[int, bytes]) -> None:
    """Cache trained full-data parameters by (study hash, seed)."""
    now = _now()
    with _transaction(con):
        _insert(con, "models", ("study_hash", "seed", "params", "created_at"),
                [[study_hash, s, b, now] for s, b in params.items()])


def load_models(con: duckdb.DuckDBPyConnection, study_hash: str) -> dict[int, bytes]:
    rows = con.execute("SELECT seed, params FROM models WHERE study_hash = ?", [study_hash]).fetchall()
    return {int(s): bytes(b) for s, b in rows}


def full_set_id(study_hash: str) -> str:
    return removal_set_id(study_hash, ())


def start_runs(con: duckdb.DuckDBPyConnection, study_hash: str, jobs: Sequence[tuple[str, int, str]],
               retry_failed: bool = False) -> list[tuple[str, int, str]]:
    """Claim (set_id, seed, regime) jobs as `running` by this process, in one transaction, and return those
    claimed: a job already `done` (or `failed`, unless retry_failed), or `running` in another live process (a
    second verify, e.g. an overlapping scheduled one), is left alone. One writer at a time holds the file, so
    two verifies never claim the same job."""
    now = _now()
    with _transaction(con):
        states = {}
        if jobs:
            ids = [run_id(study_hash, *j) for j in jobs]
            rows = con.execute("SELECT set_id, seed, regime, status, pid, host, started_at FROM runs "
                               "WHERE study_hash = ? AND run_id IN (SELECT unnest(?::VARCHAR[]))", [study_hash, ids]
                               ).fetchall()
            states = {(s, seed, r): _state(*run) for s, seed, r, *run in rows}
        claimed = [tuple(j) for j in jobs if states.get(tuple(j), "pending") in _claimable(retry_failed)]
        _insert(con, "runs", ("run_id", "study_hash", "set_id", "seed", "regime", "status", "pid", "host",
                              "started_at"),
                [[run_id(study_hash, s, seed, r), study_hash, s, seed, r, "running", os.getpid(),
                  socket.gethostname(), now] for s, seed, r in claimed],
                conflict="ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, reason = NULL, "
                         "pid = excluded.pid, host = excluded.host, started_at = excluded.started_at, "
                         "finished_at = NULL")
    return claimed


def _alive(pid: int) -> bool:
    """Whether a process of this host is running (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _state(status: str | None, pid: int | None, host: str | None, started_at: dt.datetime | None) -> str:
    """A job's queue state from its run row: the run's status, except that no run or a stale `running` one is
    `pending`."""
    if status is None or (status == "running" and not _live(pid, host, started_at)):
        return "pending"
    return status


def _claimable(retry_failed: bool) -> tuple[str, ...]:
    """The states a verify takes up: pending, and failed when asked to retry."""
    return ("pending", "failed") if retry_failed else ("pending",)


def _live(pid: int | None, host: str | None, started_at: dt.datetime | None) -> bool:
    """A `running` row is live while its process is (same host) and it is younger than STALE_AFTER."""
    if started_at is None or _now() - started_at > STALE_AFTER:
        return False
    return host != socket.gethostname() or (pid is not None and _alive(pid))


def job_states(
    con: duckdb.DuckDBPyConnection, study_hash: str, seeds: Sequence[int], regimes: Sequence[str]
) -> list[tuple[str, int, str, str, float | None]]:
    """(set_id, seed, regime, state, seconds) of every job that has registered predictions (or is the
    full-data baseline): state `done`, `failed`, `running` (claimed by a live process) or `pending` (no run,
    or a stale `running` one). Ordered so that baselines come first."""
    rows = con.execute(
        """
        WITH wanted AS (
            SELECT DISTINCT set_id FROM predictions WHERE study_hash = $study
            UNION SELECT set_id FROM removal_sets WHERE study_hash = $study AND kind = 'full'
        )
        SELECT w.set_id, s.seed, g.regime, r.status, r.seconds, r.pid, r.host, r.started_at
        FROM wanted w
        JOIN removal_sets rs ON rs.set_id = w.set_id
        CROSS JOIN unnest($seeds::INTEGER[]) s(seed)
        CROSS JOIN unnest($regimes::VARCHAR[]) g(regime)
        LEFT JOIN runs r ON r.set_id = w.set_id AND r.seed = s.seed AND r.regime = g.regime
        ORDER BY rs.kind <> 'full', g.regime, s.seed, w.set_id
        """,
        {"study": study_hash, "seeds": list(seeds), "regimes": list(regimes)},
    ).fetchall()
    return [(set_id, int(seed), regime, _state(status, pid, host, started_at), seconds)
            for set_id, seed, regime, status, seconds, pid, host, started_at in rows]


def pending_jobs(
    con: duckdb.DuckDBPyConnection, study_hash: str, seeds: Sequence[int], regimes: Sequence[str],
    retry_failed: bool = False,
) -> list[tuple[str, int, str]]:
    """(set_id, seed, regime) with registered predictions (or the full-data baseline) and no finished run
    (`done`, or `failed` unless `retry_failed`) nor a live `running` one. Baselines first."""
    return [(s, seed, r) for s, seed, r, state, _ in job_states(con, study_hash, seeds, regimes)
            if state in _claimable(retry_failed)]


def audit(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Recompute the prediction hash chain and the removal-set content ids.
    Returns one line per problem (empty when the ledger is intact)."""
    problems = []
    prev = GENESIS
    rows = con.execute(f"SELECT {_CHAINED}, prev_hash, row_hash FROM predictions ORDER BY seq").fetchall()
    for expected_seq, row in enumerate(rows, start=1):
        content, prev_hash, row_hash = list(row[:11]), row[11], row[12]
        seq = content[0]
        if seq != expected_seq:
            problems.append(f"predictions: seq {expected_seq} is missing (chain jumps to seq {seq})")
        if prev_hash != prev:
            problems.append(f"predictions seq {seq} (prediction_id {content[1]}): prev_hash does not match "
                            "the row before it")
        if content[1] != _recompute_prediction_id(content):
            problems.append(f"predictions seq {seq}: prediction_id does not match its content")
        if _row_hash(prev_hash, content) != row_hash:
            problems.append(f"predictions seq {seq} (prediction_id {content[1]}): content was altered "
                            "after registration (row_hash mismatch)")
        prev = row_hash
    for set_id, study_hash, indices in con.execute(
        "SELECT set_id, study_hash, indices FROM removal_sets ORDER BY set_id"
    ).fetchall():
        if removal_set_id(study_hash, indices) != set_id:
            problems.append(f"removal_sets set_id {set_id}: indices were altered (content hash mismatch)")
    return problems


def _recompute_prediction_id(content: list[Any]) -> str:
    _, _, study_hash, method, _, config, set_id, measurement_id = content[:8]
    return prediction_id(PredictionRecord(study_hash, method, json.loads(config), set_id, measurement_id, 0.0))


def fetch(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | dict | None = None
          ) -> tuple[list[str], list[tuple]]:
    """Run a query; return (column names, rows)."""
    cursor = con.execute(sql, params or [])
    return [d[0] for d in cursor.description or []], cursor.fetchall()


def studies(con: duckdb.DuckDBPyConnection, name: str | None = None) -> list[dict[str, Any]]:
    """Registered studies (optionally one name), oldest first."""
    cols, rows = fetch(con, "SELECT study, study_hash, source, n_train, n_params, created_at FROM studies "
                            "WHERE $name IS NULL OR study = $name ORDER BY created_at", {"name": name})
    return [dict(zip(cols, r)) for r in rows]


def removal_set_indices(con: duckdb.DuckDBPyConnection, set_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
    rows = con.execute("SELECT set_id, indices FROM removal_sets WHERE list_contains($ids, set_id)",
                       {"ids": list(set_ids)}).fetchall()
    return {s: tuple(i) for s, i in rows}


READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL"}


def user_query(path: str | Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Run a user's SQL on a sandboxed read-only connection: it can read the ledger and nothing else,
    and change nothing. Anything else is refused with an InputError saying why."""
    with read_only(path) as con:
        try:
            statements = con.extract_statements(sql)
        except duckdb.ParserException as e:
            raise InputError(f"malformed SQL: {_first_line(e)}") from None
        if not statements:
            raise InputError("no SQL statement given; try: ifledger sql \"SELECT * FROM calibration\"")
        for statement in statements:
            kind = statement.type.name
            if kind not in READ_STATEMENTS:
                raise InputError(f"ifledger sql only reads: a {kind} statement is refused (the ledger is "
                                 "changed only by ifledger's own commands)")
        try:
            return fetch(con, sql)
        except duckdb.PermissionException:
            raise InputError("ifledger sql reads the ledger only: files, ATTACH, COPY ... TO, INSTALL and "
                             "LOAD are disabled") from None
        except duckdb.Error as e:
            if "read-only" in str(e):
                raise InputError("ifledger sql only reads: that statement would change the ledger") from None
            raise InputError(f"SQL error: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


INTERVAL_COLUMNS = ("study_hash", "method", "config_hash", "regime", "set_kind", "include_post_hoc", "n",
                    "replicates", "pearson_lo", "pearson_hi", "spearman_lo", "spearman_hi", "slope_lo", "slope_hi",
                    "lds_lo", "lds_hi")


def save_calibration_intervals(con: duckdb.DuckDBPyConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the bootstrap intervals of each calibration group (derived data, recomputed by calibrate)."""
    now = _now()
    with _transaction(con):
        _insert(con, "calibration_intervals", (*INTERVAL_COLUMNS, "computed_at"),
                [[r[c] for c in INTERVAL_COLUMNS] + [now] for r in rows],
                conflict="ON CONFLICT DO UPDATE SET n = excluded.n, replicates = excluded.replicates, "
                         + ", ".join(f"{c} = excluded.{c}" for c in INTERVAL_COLUMNS[8:])
                         + ", computed_at = excluded.computed_at")
