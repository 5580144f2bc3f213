"""`ifledger sql`: one user statement on a read-only connection that can read the ledger and nothing else,
within a time and a memory limit, and only once the ledger's views and macros are the ones ifledger ships."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import duckdb

from store.audit import refuse_swapped_schema
from store.connection import fetch, read_only
from store.records import InputError

READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL"}
TIMEOUT_SECONDS = 60.0
MEMORY_LIMIT = "2GB"


def user_query(path: str | Path, sql: str, timeout: float = TIMEOUT_SECONDS, memory_limit: str = MEMORY_LIMIT
               ) -> tuple[list[str], list[tuple]]:
    """Run one read statement of a user's on a sandboxed read-only connection: it can read the ledger and
    nothing else, change nothing, run at most `timeout` seconds and use at most `memory_limit` (nothing spills
    to disk). Anything else is refused with an InputError saying why."""
    if not timeout > 0:
        raise InputError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", memory_limit):
        raise InputError(f"--memory takes a size such as 500MB or 4GB, not {memory_limit!r}")
    with read_only(path, memory_limit=memory_limit) as con:
        return _answer(con, sql, timeout, memory_limit)


def _answer(con: duckdb.DuckDBPyConnection, sql: str, timeout: float, memory_limit: str
            ) -> tuple[list[str], list[tuple]]:
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
    refuse_swapped_schema(con)
    timer = threading.Timer(timeout, con.interrupt)
    timer.start()
    try:
        return fetch(con, sql)
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
    finally:
        timer.cancel()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
