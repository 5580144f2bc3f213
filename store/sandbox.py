"""`ifledger sql`: one user statement on a read-only connection that can read the ledger and nothing else,
within a time and a memory limit (the result's size included), and only once the ledger's schema is the one ifledger
ships."""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb

from store.audit import refuse_swapped_schema
from store.connection import read_only
from store.records import InputError

READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL"}
TIMEOUT_SECONDS = 60.0
MEMORY_LIMIT = "2GB"
BATCH_ROWS = 10_000
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_bytes(size: str) -> int:
    """A size such as 500MB or 4GiB in bytes; an InputError for anything else."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B)", size.strip(), re.I)
    if not match:
        raise InputError(f"--memory takes a size such as 500MB or 4GB, not {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@contextlib.contextmanager
def query_batches(path: str | Path, sql: str, timeout: float = TIMEOUT_SECONDS, memory_limit: str = MEMORY_LIMIT,
                  arrow: bool = False) -> Iterator[tuple[list[str], Iterator]]:
    """Run one read statement of a user's on a sandboxed read-only connection: it can read the ledger and
    nothing else and change nothing. Yields its column names and its rows in batches (lists of tuples, or Arrow
    record batches with `arrow`), fetched as they are read:
    from the start of the query to the last batch it runs at most `timeout` seconds, DuckDB uses at most
    `memory_limit` (nothing spills to disk), and the rows fetched may hold at most `memory_limit` too. Anything
    else is refused, and a query over a limit stopped, with an InputError saying why."""
    if not timeout > 0:
        raise InputError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    limit = size_bytes(memory_limit)
    def check(con: duckdb.DuckDBPyConnection) -> None:
        _refuse_unless_read(con, sql)
        refuse_swapped_schema(con)

    with read_only(path, memory_limit=memory_limit, check=check) as con:
        timer = threading.Timer(timeout, con.interrupt)
        timer.start()
        try:
            with _stopped_at_limits(timeout, memory_limit):
                if arrow:  # a relation's Arrow reader streams the result from DuckDB batch by batch
                    relation = con.sql(sql)
                    columns, reader = relation.columns, relation.to_arrow_reader(BATCH_ROWS)
                    fetch = lambda: next(reader, None)  # noqa: E731
                else:
                    cursor = con.execute(sql)
                    columns, fetch = [d[0] for d in cursor.description or []], lambda: cursor.fetchmany(BATCH_ROWS)
            yield columns, _batches(fetch, timeout, memory_limit, limit)
        finally:
            timer.cancel()


def user_query(path: str | Path, sql: str, timeout: float = TIMEOUT_SECONDS, memory_limit: str = MEMORY_LIMIT
               ) -> tuple[list[str], list[tuple]]:
    """query_batches' columns and all its rows."""
    with query_batches(path, sql, timeout, memory_limit) as (columns, batches):
        return columns, [row for batch in batches for row in batch]


def _batches(fetch: Callable[[], Any], timeout: float, memory_limit: str, limit: int) -> Iterator:
    """The result as `fetch` gives it (a list of tuples, or an Arrow record batch), until its size (the Python
    objects, or the Arrow buffers) passes `limit`."""
    held = 0
    while True:
        with _stopped_at_limits(timeout, memory_limit):
            batch = fetch()
        if not batch:
            return
        held += batch.nbytes if hasattr(batch, "nbytes") else \
            sum(sys.getsizeof(row) + sum(map(sys.getsizeof, row)) for row in batch)
        if held > limit:
            raise InputError(f"query stopped: its result is larger than {memory_limit} (--memory caps the result "
                             "as well as the query; narrow it with WHERE, LIMIT or an aggregate, or raise --memory)")
        yield batch


def _refuse_unless_read(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """An InputError unless `sql` is one statement that only reads."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.ParserException as e:
        raise InputError(f"malformed SQL: {_first_line(e)}") from None
    if not statements:
        raise InputError("no SQL statement given; try: ifledger sql \"SELECT * FROM calibration\"")
    if len(statements) > 1:
        raise InputError(f"ifledger sql runs one statement, not {len(statements)}; run them one at a time")
    kind = statements[0].type.name
    if kind == "COPY":
        raise InputError("ifledger sql only reads: to write a result to a file, use "
                         "`ifledger sql QUERY --format parquet --output FILE`")
    if kind not in READ_STATEMENTS:
        raise InputError(f"ifledger sql only reads: a {kind} statement is refused (the ledger is "
                         "changed only by ifledger's own commands)")


@contextlib.contextmanager
def _stopped_at_limits(timeout: float, memory_limit: str) -> Iterator[None]:
    """DuckDB's errors while a user's query runs, as one-line InputErrors."""
    try:
        yield
    except duckdb.InterruptException:
        raise InputError(f"query stopped: it ran longer than {timeout:g} s (raise it with --timeout)") from None
    except duckdb.OutOfMemoryException:
        raise InputError(f"query stopped: it needs more than {memory_limit} of memory (nothing spills to disk; "
                         "raise it with --memory)") from None
    except duckdb.PermissionException:
        raise InputError("ifledger sql reads the ledger only: files, ATTACH, COPY ... TO, INSTALL and "
                         "LOAD are disabled") from None
    except duckdb.Error as e:
        if "read-only" in str(e):
            raise InputError("ifledger sql only reads: that statement would change the ledger") from None
        raise InputError(f"SQL error: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
