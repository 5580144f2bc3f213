"""Opening the ledger: the schema in place for writers, sandboxed read-only connections for readers, the
process lock retried with backoff, and one transaction per batch."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from store.records import InputError

LOCK_RETRY_SECONDS = 10.0


def now() -> dt.datetime:
    """UTC now, without a timezone (the ledger's TIMESTAMP columns are UTC)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def open_ledger(path: str | Path, read_only: bool, config: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
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


def schema_sql() -> str:
    """The schema the code ships: tables (created if missing), migrations of older ledgers, views and macros."""
    return resources.files("store").joinpath("schema.sql").read_text()


@contextlib.contextmanager
def connect(path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Writable connection with the schema in place; closed on exit."""
    con = open_ledger(path, read_only=False)
    try:
        con.execute(schema_sql())
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def read_only(path: str | Path, sandbox: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """Read-only connection. With `sandbox`, no file outside the ledger can be read or written
    and the configuration is locked, so arbitrary user SQL can read the ledger and nothing else."""
    config = {"enable_external_access": False, "lock_configuration": True} if sandbox else {}
    con = open_ledger(path, read_only=True, config=config)
    try:
        yield con
    finally:
        con.close()


def insert(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
           conflict: str = "ON CONFLICT DO NOTHING") -> None:
    """Bulk insert through a DataFrame (executemany is row by row)."""
    if not rows:
        return
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
