"""The chain's anchor outside the file: every write that moves the chain head appends a receipt line (seq and
hash) to `<ledger>.receipts` (or $IFLEDGER_RECEIPTS, set by `--receipts`), so that truncation, deletion of
the tail and consistent rewrites of the file are caught by `audit`. A write first audits the ledger and refuses
to go on (and so to issue a receipt) over a chain that does not audit clean: a receipt never covers entries that
no ifledger command wrote."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb

from store.audit import audit, older_than_shipped
from store.chain import chain_legacy_rows, head
from store.connection import apply_schema, now, open_ledger, read_only
from store.records import InputError

RECEIPTS_VARIABLE = "IFLEDGER_RECEIPTS"
_AUDITED: dict[Path, tuple[int, str]] = {}  # ledger -> the head this process left after a write that audited clean


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
        if before[0]:
            _refuse_unless_clean(con, Path(path))
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
                _AUDITED[Path(path).resolve()] = head(con)
        finally:
            con.close()


def _refuse_unless_clean(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Audit the ledger (against its receipts when it has any) before writing to it; an InputError names the
    first problem. Skipped when the head is the one this process's last clean write left."""
    if _AUDITED.get(path.resolve()) == head(con):
        return
    receipts = receipts_path(path)
    problems = audit(con, receipts if receipts.exists() else None)
    if problems:
        raise InputError(f"the ledger does not audit clean ({problems[0]}"
                         f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}): refusing to write, so "
                         "that no receipt covers it; run `ifledger audit` and restore the ledger from a copy (if a "
                         "write of yours was killed before its receipt, and audit names nothing else, append "
                         "`ifledger head` to the receipts)")
    _AUDITED[path.resolve()] = head(con)


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
