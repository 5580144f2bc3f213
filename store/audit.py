"""`ifledger audit`: the chain recomputed entry by entry, every chained row compared with its latest entry,
the chain checked against the receipts written outside the file, and the schema's views and macros against
the ones the code ships."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import duckdb

from store.chain import CHAINED, GENESIS, contents, entry_hash, has_chain, head, latest_entries, prediction_id, secret
from store.connection import schema_sql
from store.records import InputError, PredictionRecord, RemovalSetRecord

RECEIPT = re.compile(r"seq (\d+) (?:sha256|hmac) ([0-9a-f]{64})")  # as written by anchor.receipt_line


def schema_objects(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """name -> sha256 of the definition of every view and macro in the database, plus which tables exist."""
    objects = {f"view {n}": s for n, s in con.execute(
        "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal AND database_name = current_database()"
    ).fetchall()}
    objects.update({f"macro {n}": d for n, d in con.execute(
        "SELECT function_name, macro_definition FROM duckdb_functions() WHERE NOT internal "
        "AND function_type IN ('macro', 'table_macro') AND database_name = current_database()").fetchall()})
    objects.update({f"table {n}": "" for (n,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE NOT internal AND database_name = current_database()"
    ).fetchall()})
    return {k: hashlib.sha256((v or "").encode()).hexdigest() for k, v in objects.items()}


@cache
def _shipped() -> tuple[dict[str, str], frozenset[str]]:
    """schema_objects and table columns of a fresh database built from the schema the code ships."""
    with duckdb.connect(":memory:") as con:
        con.execute(schema_sql())
        return schema_objects(con), frozenset(table_columns(con))


def shipped_schema() -> dict[str, str]:
    """schema_objects of a fresh database built from the schema the code ships."""
    return dict(_shipped()[0])


def table_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """`table.column` of every table in the database."""
    return [f"{t}.{c}" for t, c in con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal "
        "AND database_name = current_database()").fetchall()]


def missing_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Columns the shipped schema has and the ledger's tables lack: a ledger written by an older ifledger."""
    found, objects = set(table_columns(con)), schema_objects(con)
    return sorted(c for c in _shipped()[1] if c not in found and f"table {c.split('.')[0]}" in objects)


def older_than_shipped(con: duckdb.DuckDBPyConnection) -> list[str]:
    """What a ledger written by an older ifledger lacks: shipped columns, tables, views and macros (a view that
    exists but differs is not age but a change, which `audit` names and `ifledger sql` refuses to read through)."""
    objects = schema_objects(con)
    return [*missing_columns(con), *sorted(name for name in _shipped()[0] if name not in objects)]


def schema_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The views, macros and tables that differ from the shipped schema, one line each."""
    found, shipped = schema_objects(con), shipped_schema()
    problems = [f"schema: {name} differs from the one ifledger ships" for name in sorted(shipped)
                if name in found and found[name] != shipped[name]]
    problems += [f"schema: {name} is missing" for name in sorted(shipped) if name not in found]
    problems += [f"schema: {name} is not one ifledger ships" for name in sorted(found) if name not in shipped]
    return problems


def _short(value: Any) -> str:
    """A chained value as a reader would write it (floats are chained as exact hex)."""
    if isinstance(value, str) and re.fullmatch(r"-?0x[0-9a-f.]+p[-+]\d+", value):
        return repr(float.fromhex(value))
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: dict, new: dict) -> str:
    fields = sorted(f for f in {*old, *new} if old.get(f) != new.get(f))
    return "; ".join(f"{f} {_short(old.get(f))} -> {_short(new.get(f))}" for f in fields)


def chain_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Recompute every entry's hash and link, in order."""
    problems, prev, expected = [], GENESIS, 1
    key = secret()
    rows = con.execute("SELECT seq, entry, key, content, legacy, keyed, prev_hash, entry_hash FROM chain ORDER BY seq"
                       ).fetchall()
    for seq, table, k, content, legacy, keyed, prev_hash, digest in rows:
        where = f"chain seq {seq} ({table} {k})"
        if seq != expected:
            problems.append(f"chain: seq {expected}..{seq - 1} deleted (the chain jumps to seq {seq})")
        expected = seq + 1
        if prev_hash != prev:
            problems.append(f"{where}: prev_hash does not match the entry before it")
        if keyed and key is None:
            problems.append(f"{where}: keyed with IFLEDGER_KEY; set it to audit this ledger")
            break
        if key is not None and not keyed:
            problems.append(f"{where}: not keyed, but IFLEDGER_KEY is set (forged, or written without the key)")
        elif entry_hash(prev_hash, seq, table, k, json.loads(content), legacy, key if keyed else None) != digest:
            problems.append(f"{where}: entry altered (its hash does not match its content)")
        prev = digest
    return problems


def row_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Compare every chained table with the latest chain entry of each row: changed, deleted, or never chained."""
    problems = []
    for table in CHAINED:
        current, chained = contents(con, table), latest_entries(con, table)
        for k, (seq, content) in sorted(chained.items(), key=lambda item: item[1][0]):
            if k not in current:
                status = _run_status(con, k) if table == "runs" else None
                if status == "running" and content.get("status") == "failed":
                    continue  # a failed run claimed again by --retry-failed
                problems.append(f"{table} {k}: " + (f"status changed {content.get('status')!r} -> {status!r}"
                                                    if status else f"deleted (chained at seq {seq})"))
            elif current[k] != content:
                problems.append(f"{table} {k}: changed since chain seq {seq}: {_differences(content, current[k])}")
        problems += [f"{table} {k}: not in the chain (added outside ifledger)" for k in sorted(current)
                     if k not in chained]
    orphans = con.execute("SELECT DISTINCT o.run_id FROM outcomes o LEFT JOIN runs r USING (run_id) "
                          "WHERE r.run_id IS NULL OR r.status = 'running' ORDER BY 1").fetchall()
    problems += [f"outcomes of run {r}: no finished run holds them (added outside ifledger)" for (r,) in orphans]
    for set_id, study_hash, kind, indices, ranked_by, target, direction, labels in con.execute(
            "SELECT set_id, study_hash, kind, indices, ranked_by, target, direction, new_labels FROM removal_sets"
    ).fetchall():
        s = RemovalSetRecord(study_hash, kind, "", tuple(indices), ranked_by, target, direction,
                             None if labels is None else tuple(labels))
        if set_id not in (s.set_id, s.members_id):  # members_id: the full set, and an older ledger's sets
            problems.append(f"removal_sets {set_id}: indices (or new labels) do not match its content id")
    for pid, study_hash, method, config, set_id, measurement in con.execute(
            "SELECT prediction_id, study_hash, method, method_config, set_id, measurement_id FROM predictions"
    ).fetchall():
        record = PredictionRecord(study_hash, method, json.loads(config), set_id, measurement, 0.0)
        if prediction_id(record) != pid:
            problems.append(f"predictions {pid}: prediction_id does not match its content")
    return problems


def _run_status(con: duckdb.DuckDBPyConnection, run: str) -> str | None:
    row = con.execute("SELECT status FROM runs WHERE run_id = ?", [run]).fetchone()
    return row[0] if row else None


def read_receipts(path: Path) -> list[tuple[int, int, str]]:
    """(line number, seq, hash) of every receipt in the file."""
    return [(n, int(m.group(1)), m.group(2)) for n, line in enumerate(path.read_text().splitlines(), start=1)
            if (m := RECEIPT.search(line))]


def receipt_problems(con: duckdb.DuckDBPyConnection, path: Path) -> list[str]:
    """Every receipt must name an entry of the chain with the same hash, and every entry must be covered by
    a receipt (the last receipt names the head)."""
    if not path.exists():
        return [f"receipts: none at {path} (pass --receipts PATH): the chain cannot be checked against its anchor"]
    try:
        receipts = read_receipts(path)
    except (OSError, UnicodeDecodeError) as e:
        return [f"receipts: {path} cannot be read ({e})"]
    hashes = dict(con.execute("SELECT seq, entry_hash FROM chain").fetchall())
    last, _ = head(con)
    problems = []
    for line, seq, digest in receipts:
        if seq not in hashes:
            problems.append(f"receipts line {line}: seq {seq} is not in the chain (it ends at seq {last}): "
                            "entries were deleted")
        elif hashes[seq] != digest:
            problems.append(f"receipts line {line}: chain seq {seq} has another hash than its receipt: "
                            "the chain was rewritten")
    anchored = max((seq for _, seq, _ in receipts), default=0)
    if last > anchored:
        problems.append(f"receipts: chain seq {anchored + 1}..{last} are not covered by any receipt in {path} "
                        "(appended outside ifledger, or a write was killed before its receipt)")
    return problems


def audit(con: duckdb.DuckDBPyConnection, receipts: Path | None = None) -> list[str]:
    """Every problem found, one line each (empty when the ledger is intact): the chain, the rows against it,
    the receipts (when a path is given) and the schema."""
    missing = missing_columns(con)
    if missing:
        raise InputError(f"the ledger was written by an older ifledger (it lacks {missing[0]}"
                         f"{f' and {len(missing) - 1} more columns' if len(missing) > 1 else ''}): any other command, "
                         "e.g. `ifledger status`, brings its schema up to date without changing a chained row; then "
                         "audit it")
    try:
        return _problems(con, receipts)
    except duckdb.Error as e:  # a truncated or damaged file: the chain cannot even be read
        raise InputError(f"the ledger cannot be read whole (truncated or damaged): {str(e).strip().splitlines()[0]}"
                         ) from None


def _problems(con: duckdb.DuckDBPyConnection, receipts: Path | None) -> list[str]:
    if not has_chain(con):
        return ["chain: none yet (the ledger was written by an ifledger without one); its next write chains every "
                "row as a legacy entry (e.g. `ifledger calibrate`)"]
    return [*chain_problems(con), *row_problems(con),
            *(receipt_problems(con, receipts) if receipts is not None else []), *schema_problems(con)]
