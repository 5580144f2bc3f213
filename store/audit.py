"""`ifledger audit`: the chain recomputed entry by entry (each content in its canonical form), the history of
every chained row checked against the ledger's rules, every row compared with its latest entry, every model file
beside the ledger against the sha256 that names it, the chain checked
against the receipts written outside the file and against heads the user published, and every schema object
(tables with their keys and constraints, views, macros, schemas, sequences, indexes, types) against the ones the
code ships, by content."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb

from store.chain import (
    CHAINED,
    GENESIS,
    canonical_json,
    chained_json,
    contents,
    entry_hash,
    has_chain,
    head,
    latest_entries,
    parse_json,
    prediction_id,
    secret,
)
from store.connection import schema_sql
from store.model_files import model_file_problems
from store.records import InputError, PredictionRecord, RemovalSetRecord

RECEIPT = re.compile(r"seq (\d+) (?:sha256|hmac) ([0-9a-f]{64})")  # as written by anchor.receipt_line


# every user-made object: (kind, database, schema, name, definition). A table is its columns with their types,
# NOT NULL and defaults, and apart its keys and constraints (primary key, unique, check, foreign key), each in name
# order, so that a column an older ledger gained by ALTER TABLE matches one a newer CREATE TABLE lists elsewhere
_OBJECTS = """
SELECT 'schema', database_name, schema_name, '', '' FROM duckdb_schemas() WHERE NOT internal
UNION ALL SELECT 'table', c.database_name, c.schema_name, c.table_name,
                 array_to_string(list_sort(list(c.column_name || ' ' || c.data_type
                     || CASE WHEN c.is_nullable THEN '' ELSE ' NOT NULL' END
                     || coalesce(' DEFAULT ' || c.column_default, ''))), ', ')
          FROM duckdb_columns() c SEMI JOIN duckdb_tables() t USING (database_name, schema_name, table_name)
          WHERE NOT c.internal GROUP BY c.database_name, c.schema_name, c.table_name
UNION ALL SELECT 'keys of table', database_name, schema_name, table_name,
                 array_to_string(list_sort(list(constraint_type || ' ('
                     || array_to_string(list_sort(constraint_column_names), ', ') || ')'
                     || coalesce(' ' || expression, ''))), '; ')
          FROM duckdb_constraints() WHERE constraint_type <> 'NOT NULL'
          GROUP BY database_name, schema_name, table_name
UNION ALL SELECT 'view', database_name, schema_name, view_name, sql FROM duckdb_views() WHERE NOT internal
UNION ALL SELECT 'macro', database_name, schema_name, function_name,
                 string_agg(parameters::VARCHAR || ' ' || macro_definition, '; ' ORDER BY macro_definition)
          FROM duckdb_functions() WHERE NOT internal AND function_type IN ('macro', 'table_macro')
          GROUP BY database_name, schema_name, function_name
UNION ALL SELECT 'sequence', database_name, schema_name, sequence_name, sql FROM duckdb_sequences()
UNION ALL SELECT 'index', database_name, schema_name, index_name, sql FROM duckdb_indexes()
UNION ALL SELECT 'type', database_name, schema_name, type_name, logical_type FROM duckdb_types() WHERE NOT internal
"""


def schema_objects(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """`kind name` (`kind schema.name` outside the main schema, prefixed with `database.` outside the ledger's)
    -> sha256 of its definition, for every
    schema, table (columns and types; keys and constraints apart), view, macro, sequence, index and type in every
    database of the connection but DuckDB's own."""
    current = con.execute("SELECT current_database()").fetchone()[0]
    rows = con.execute(f"SELECT * FROM ({_OBJECTS}) WHERE database_name NOT IN ('system', 'temp')").fetchall()
    return {f"{kind} {'' if database == current else database + '.'}{'' if schema == 'main' and name else schema}"
            f"{'.' if schema != 'main' and name else ''}{name}": hashlib.sha256((text or "").encode()).hexdigest()
            for kind, database, schema, name, text in rows}


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
    """`table.column` of every table in the ledger's main schema."""
    return [f"{t}.{c}" for t, c in con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal "
        "AND database_name = current_database() AND schema_name = 'main'").fetchall()]


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
    """The schema objects that differ from the shipped schema, are missing, or are not shipped at all, one line
    each (a table differs when its columns, their types, its keys or its constraints do)."""
    found, shipped = schema_objects(con), shipped_schema()
    problems = [f"schema: {name} differs from the one ifledger ships" for name in sorted(shipped)
                if name in found and found[name] != shipped[name]]
    problems += [f"schema: {name} is missing" for name in sorted(shipped) if name not in found]
    problems += [f"schema: {name} is not one ifledger ships" for name in sorted(found) if name not in shipped]
    return problems


def refuse_swapped_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Before reading through the ledger's views and macros: an InputError unless every schema object is the one
    ifledger ships (a view, macro or table swapped, shadowed or added would change what is read)."""
    swapped = schema_problems(con)
    if swapped:
        raise InputError(f"the ledger's schema is not the one ifledger ships ({swapped[0].removeprefix('schema: ')}"
                         f"{f' and {len(swapped) - 1} more' if len(swapped) > 1 else ''}): refusing to read through "
                         "it; run `ifledger audit` (a ledger of an older ifledger is brought up to date by any write)")


def _not_canonical(text: str) -> str:
    """Why a JSON text is not canonical: a duplicate key (Python's json keeps the last, DuckDB's ->> the first), or
    other spacing or key order."""
    try:
        parse_json(text)
    except ValueError as e:
        return str(e)
    return "other spacing or key order"


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
    """Recompute every entry's hash and link, in order; each content must be the canonical text of its value
    (no duplicate keys), the text SQL reads."""
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
        try:
            value = json.loads(content)
        except ValueError as e:
            problems.append(f"{where}: content is not JSON ({e})")
            prev = digest
            continue
        if canonical_json(value) != content:
            problems.append(f"{where}: content is not in its canonical form ({_not_canonical(content)}): SQL reads "
                            "other text than the chain hashed")
        if key is not None and not keyed:
            problems.append(f"{where}: not keyed, but IFLEDGER_KEY is set (forged, or written without the key)")
        elif entry_hash(prev_hash, seq, table, k, value, legacy, key if keyed else None) != digest:
            problems.append(f"{where}: entry altered (its hash does not match its content)")
        prev = digest
    return problems


# a run's status along its chain entries: a failed run may be claimed again (a retry entry, `running`, which
# `start_runs` writes) and then fail or finish; older ledgers retried without the retry entry. A done run is final.
RUN_TRANSITIONS = {"failed": {"running", "done", "failed"}, "running": {"done", "failed"}}


def history_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Every row chained more than once, checked entry by entry against the ledger's rules: a prediction's content
    never changes after registration, an outcome never changes after it is written, a run moves only along
    RUN_TRANSITIONS, and no other chained row changes once chained."""
    problems = []
    for table, k, seqs, texts in con.execute(
            "SELECT entry, key, list(seq ORDER BY seq), list(content ORDER BY seq) FROM chain "
            "GROUP BY entry, key HAVING count(*) > 1 ORDER BY min(seq)").fetchall():
        for (before, old), (seq, new) in pairwise(zip(seqs, (chained_json(t) for t in texts))):
            if not (isinstance(old, dict) and isinstance(new, dict)):
                continue  # a content that is not canonical JSON is named by chain_problems
            was, now = old.get("status"), new.get("status")
            if table == "runs" and now in RUN_TRANSITIONS.get(was, ()):
                continue
            rule = {"predictions": "a prediction never changes after registration",
                    "runs": "an outcome never changes once written" if was == now == "done"
                    else f"a run never moves from {was!r} to {now!r}"}.get(table, "a chained row never changes")
            problems.append(f"{table} {k}: re-chained at seq {seq} over seq {before} ({rule}): "
                            f"{_differences(old, new) or 'same content'}")
    return problems


def row_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Compare every chained table with the latest chain entry of each row: changed, deleted, or never chained."""
    problems = []
    for table in CHAINED:
        current, chained = contents(con, table), latest_entries(con, table)
        for k, (seq, content) in sorted(chained.items(), key=lambda item: item[1][0]):
            if not isinstance(content, dict):
                continue  # an entry whose text is not canonical JSON: named by chain_problems
            if k not in current:
                status = _run_status(con, k) if table == "runs" else None
                if status == "running" and content.get("status") == "running":
                    continue  # a failed run claimed again by --retry-failed, as its retry entry says
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
        record = PredictionRecord(study_hash, method, chained_json(config), set_id, measurement, 0.0)
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
    problems = anchor_problems(con, [(f"receipts line {line}", seq, digest) for line, seq, digest in receipts],
                               "its receipt", "entries were deleted", "the chain was rewritten")
    last, _ = head(con)
    anchored = max((seq for _, seq, _ in receipts), default=0)
    if last > anchored:
        problems.append(f"receipts: chain seq {anchored + 1}..{last} are not covered by any receipt in {path} "
                        "(appended outside ifledger, or a write was killed before its receipt)")
    return problems


HEAD = re.compile(r"(\d+):([0-9a-f]{64})")  # a published head as `audit --head` takes it


def published_heads(heads: list[str], files: list[Path]) -> list[tuple[str, int, str]]:
    """(where, seq, hash) of every head given as SEQ:HASH, or found in a file (a SEQ:HASH or an `ifledger head`
    line on each line; blank lines and lines starting with # are skipped); an InputError for anything else."""
    found = []
    for text in heads:
        if not (m := HEAD.fullmatch(text.strip())):
            raise InputError(f"--head {text!r}: give SEQ:HASH, e.g. 42:{'0' * 64} (`ifledger head` prints both)")
        found.append((f"--head {m.group(1)}", int(m.group(1)), m.group(2)))
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--heads {path} cannot be read ({e})") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not (m := HEAD.fullmatch(line.strip()) or RECEIPT.search(line)):
                raise InputError(f"--heads {path} line {n}: not a head (SEQ:HASH or a line `ifledger head` printed)")
            found.append((f"{path} line {n}", int(m.group(1)), m.group(2)))
    return found


def head_problems(con: duckdb.DuckDBPyConnection, heads: list[tuple[str, int, str]]) -> list[str]:
    """Each published head must name an entry of the chain with the same hash: anything it covers that was
    rewritten, rolled back or cut off, in the file and the receipts together, is caught."""
    return anchor_problems(con, [(f"published head ({where})", seq, digest) for where, seq, digest in heads],
                           "the one published", "the ledger was rolled back or cut off",
                           "the chain up to it was rewritten")


def anchor_problems(con: duckdb.DuckDBPyConnection, anchors: list[tuple[str, int, str]], kept_as: str,
                    missing: str, differs: str) -> list[str]:
    """One line for each (where, seq, hash) kept outside the file (a receipt, a published head) whose seq is not in
    the chain (`missing` says what that means) or whose entry has another hash (`differs`)."""
    hashes = dict(con.execute("SELECT seq, entry_hash FROM chain WHERE list_contains($seqs, seq)",
                              {"seqs": [seq for _, seq, _ in anchors]}).fetchall())
    last, _ = head(con)
    problems = []
    for where, seq, digest in anchors:
        if seq not in hashes:
            problems.append(f"{where}: seq {seq} is not in the chain (it ends at seq {last}): {missing}")
        elif hashes[seq] != digest:
            problems.append(f"{where}: chain seq {seq} has another hash than {kept_as}: {differs}")
    return problems


def audit(con: duckdb.DuckDBPyConnection, receipts: Path | None = None,
          heads: list[tuple[str, int, str]] | None = None) -> list[str]:
    """Every problem found, one line each (empty when the ledger is intact): the chain, each row's history, the
    rows against it, the model files beside the ledger (store.model_files), the receipts (when a path is given), the
    published `heads` (see published_heads) and the schema."""
    missing = missing_columns(con)
    if missing:
        raise InputError(f"the ledger was written by an older ifledger (it lacks {missing[0]}"
                         f"{f' and {len(missing) - 1} more columns' if len(missing) > 1 else ''}): any other command, "
                         "e.g. `ifledger status`, brings its schema up to date without changing a chained row; then "
                         "audit it")
    try:
        return _problems(con, receipts, heads or [])
    except duckdb.Error as e:  # a truncated or damaged file: the chain cannot even be read
        raise InputError(f"the ledger cannot be read whole (truncated or damaged): {str(e).strip().splitlines()[0]}"
                         ) from None


def _problems(con: duckdb.DuckDBPyConnection, receipts: Path | None, heads: list[tuple[str, int, str]]
              ) -> list[str]:
    if not has_chain(con):
        return ["chain: none yet (the ledger was written by an ifledger without one); its next write chains every "
                "row as a legacy entry (e.g. `ifledger calibrate`)"]
    return [*chain_problems(con), *history_problems(con), *row_problems(con), *model_file_problems(con),
            *(receipt_problems(con, receipts) if receipts is not None else []), *head_problems(con, heads),
            *schema_problems(con)]
