"""Opening the ledger: the schema in place for writers, sandboxed read-only connections for readers, the
process lock retried with backoff, and one transaction per batch."""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from store.records import InputError

LOCK_RETRY_SECONDS = 10.0  # a reader gives up after this; a writer waits WRITER_WAIT_SECONDS (its work is done)
WRITER_WAIT_SECONDS = 3600.0


def now() -> dt.datetime:
    """UTC now, without a timezone (the ledger's TIMESTAMP columns are UTC)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def open_ledger(path: str | Path, read_only: bool, config: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """Open the ledger, retrying with backoff while another process holds its lock: a reader for
    LOCK_RETRY_SECONDS, a writer (which may hold finished work, e.g. a trained chunk) for WRITER_WAIT_SECONDS,
    saying on stderr that it waits."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--db {path} is a directory; give a DuckDB file path such as {path}/ifledger.duckdb")
    if read_only and not path.exists():
        raise InputError(f"no ledger at {path}; create one with `ifledger run linreg` or pass --db PATH")
    patience = LOCK_RETRY_SECONDS if read_only else WRITER_WAIT_SECONDS
    deadline = time.monotonic() + patience
    delay, said = 0.05, False
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config or {})
        except duckdb.IOException as e:
            message = str(e)
            if "lock" in message.lower() and time.monotonic() < deadline:
                if not read_only and not said:
                    print(f"ifledger: ledger {path} is busy (another process holds its lock); waiting up to "
                          f"{patience:g} s to write", file=sys.stderr, flush=True)
                    said = True
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if "lock" in message.lower():
                raise InputError(f"ledger {path} is busy: gave up after waiting {patience:g} s for another "
                                 "process's lock; try again shortly") from e
            raise InputError(f"--db {path} is not a DuckDB ledger ({message.splitlines()[0]})") from e
        except duckdb.Error as e:
            raise InputError(f"--db {path} cannot be opened: {str(e).splitlines()[0]}") from e


def schema_sql() -> str:
    """The schema the code ships: tables (created if missing), migrations of older ledgers, views and macros."""
    return resources.files("store").joinpath("schema.sql").read_text()


def apply_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Put the shipped schema in place. A ledger written before `calibration_intervals` was keyed by
    `converged_only` keeps its intervals (as converged_only = false) in the re-keyed table: DuckDB cannot change a
    primary key in place."""
    (unkeyed,) = con.execute(
        "SELECT count(*) FILTER (WHERE table_name = 'calibration_intervals') > 0 AND count(*) FILTER "
        "(WHERE table_name = 'calibration_intervals' AND column_name = 'converged_only') = 0 FROM duckdb_columns() "
        "WHERE database_name = current_database()").fetchone()
    with transaction(con):
        if unkeyed:
            con.execute("ALTER TABLE calibration_intervals RENAME TO calibration_intervals_unkeyed")
        con.execute(schema_sql())
        if unkeyed:
            con.execute("INSERT INTO calibration_intervals BY NAME SELECT * FROM calibration_intervals_unkeyed; "
                        "DROP TABLE calibration_intervals_unkeyed")


@contextlib.contextmanager
def read_only(path: str | Path, sandbox: bool = True, memory_limit: str = "2GB",
              check: Callable[[duckdb.DuckDBPyConnection], None] | None = None
              ) -> Iterator[duckdb.DuckDBPyConnection]:
    """Read-only connection. With `sandbox`, no file outside the ledger can be read or written, memory is
    capped at `memory_limit` with nothing spilled to disk, and the configuration is locked, so arbitrary user
    SQL can read the ledger and nothing else. `check` (ifledger's own queries: the schema check) runs first,
    before the limit: a user's small `--memory` bounds the user's query, not the checks that guard it."""
    con = open_ledger(path, read_only=True, config={"temp_directory": ""} if sandbox else {})
    try:
        if check is not None:
            check(con)
        if sandbox:
            limit = memory_limit.replace("'", "''")
            con.execute(f"SET memory_limit = '{limit}'; SET enable_external_access = false; "
                        "SET lock_configuration = true")
        yield con
    finally:
        con.close()


def insert(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
           conflict: str = "ON CONFLICT DO NOTHING") -> None:
    """Bulk insert through a DataFrame (executemany is row by row)."""
    if not rows:
        return
    import pandas as pd  # here, not at the top: read-only commands need no pandas (0.6 s to import)

    frame = pd.DataFrame([list(r) for r in rows], columns=list(columns))  # noqa: F841 (read by DuckDB)
    con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM frame {conflict}")


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def fetch(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | dict | None = None
          ) -> tuple[list[str], list[tuple]]:
    """Run a query; return (column names, rows)."""
    cursor = con.execute(sql, params or [])
    return [d[0] for d in cursor.description or []], cursor.fetchall()
