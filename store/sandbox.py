"""`ifledger sql`: a user's SQL on a read-only connection that can read the ledger and nothing else."""

from __future__ import annotations

from pathlib import Path

import duckdb

from store.connection import fetch, read_only
from store.records import InputError

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
