"""The chain's anchor outside the file: every write that moves the chain head appends a receipt line (seq and
hash) to `<ledger>.receipts` (or $IFLEDGER_RECEIPTS, set by `--receipts`), so that truncation, deletion of
the tail and consistent rewrites of the file are caught by `audit`."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb

from store.audit import older_than_shipped
from store.chain import chain_legacy_rows, head
from store.connection import apply_schema, now, open_ledger, read_only
from store.records import InputError

RECEIPTS_VARIABLE = "IFLEDGER_RECEIPTS"


def receipts_path(db: str | Path) -> Path:
    """Where the ledger's receipts go: $IFLEDGER_RECEIPTS, or the ledger's path plus `.receipts`."""
    return Path(os.environ.get(RECEIPTS_VARIABLE) or f"{db}.receipts")


def receipt_line(seq: int, digest: str, keyed: bool) -> str:
    """How a chain head is written in receipts and printed by `ifledger head`."""
    return f"ifledger chain head: seq {seq} {'hmac' if keyed else 'sha256'} {digest} at {now():%Y-%m-%dT%H:%M:%SZ}"


def head_line(con: duckdb.DuckDBPyConnection) -> str:
    """The chain head as a receipt line."""
    seq, digest = head(con)
    keyed = seq > 0 and bool(con.execute("SELECT any_value(keyed) FROM chain WHERE seq = ?", [seq]).fetchone()[0])
    return receipt_line(seq, digest, keyed)


def _append_receipt(path: Path, line: str) -> None:
    try:
        with path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise InputError(f"the ledger was written but its receipt could not be appended to {path} ({e.strerror}); "
                         f"keep this line instead: {line}") from None


def _disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOSPC or \
        isinstance(error, duckdb.Error) and "No space left on device" in str(error)


@contextlib.contextmanager
def connect(path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Writable connection with the schema in place (an older ledger's rows are chained on its first write);
    on exit, a receipt of the new head if the chain moved; closed on exit."""
    con = open_ledger(path, read_only=False)
    before = None
    try:
        apply_schema(con)
        before = head(con)
        chain_legacy_rows(con)
        yield con
    except (OSError, duckdb.Error) as e:
        if _disk_full(e):
            raise InputError(f"the disk holding {path} is full: the write was rolled back; free some space and "
                             "run the command again") from None
        raise
    finally:
        try:
            if before is not None and head(con) != before:  # also when the block raised after a commit
                _append_receipt(receipts_path(path), head_line(con))
        finally:
            con.close()


def bring_up_to_date(path: str | Path) -> bool:
    """Before a command reads an existing ledger: when it lacks columns, tables, views or macros the code ships (a
    ledger of an older ifledger), put the shipped schema in place with the write every writer does first (columns
    added as NULL, views and macros replaced, older rows chained). No chained row changes. True if it wrote.
    `audit` does not call it: it asks for this step first."""
    if not Path(path).is_file():
        return False
    with read_only(path, sandbox=False) as con:
        if not older_than_shipped(con):
            return False
    with connect(path):
        pass
    return True
