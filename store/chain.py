"""One hash chain for everything that decides a verdict. Each chained row (a study, a measurement, a removal
set, a prediction, a finished run with its outcomes, a cached model's parameter hash, a known-flipped label, a
detection score) is appended to the
`chain` table as an entry: seq, the row's table and key, its canonical content, the previous entry's hash and
entry_hash = sha256(prev_hash, seq, table, key, content, legacy), or HMAC-SHA256 under IFLEDGER_KEY when it is
set. Every JSON text (an entry's content, a chained JSON column) must be the canonical serialisation of its
parsed value, without duplicate keys, so that SQL's `->>` reads exactly what the chain hashed. `audit` recomputes
every entry, checks each row's whole history against the ledger's rules and compares the latest entry of each row
with the table as it is now. Order in the chain, not the clock, decides `post_hoc` (see schema.sql)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb

from store.connection import insert, now, transaction
from store.records import PredictionRecord, content_hash

GENESIS = "0" * 64
KEY_VARIABLE = "IFLEDGER_KEY"

# table -> (the SQL key of a row, the SQL columns whose values are chained). Timestamps are information only.
CHAINED: dict[str, tuple[str, str]] = {
    "studies": ("study_hash", "study, source, config, n_train, n_params, pairing"),
    "measurements": ("study_hash || '/' || measurement_id", "description, differentiable, tags"),
    "removal_sets": ("set_id", "study_hash, kind, label, size, indices, ranked_by, target, direction, new_labels"),
    "predictions": ("prediction_id", "study_hash, method, config_hash, method_config, set_id, measurement_id, "
                                     "predicted, code_version"),
    "runs": ("run_id", "study_hash, set_id, seed, regime, status, reason, train_loss, converged, checkpoint_sha256"),
    "models": ("study_hash || '/' || seed", "coalesce(params_sha256, sha256(params)) AS params_sha256, "
                                                "supplied_sha256, retrained_distance, retrained_relative_distance"),
    "flipped_labels": ("study_hash || '/' || train_index", "given_label, true_label"),
    "self_influence": ("study_hash || '/' || method || '/' || config_hash || '/' || seed || '/' || train_index",
                       "method_config, score, code_version"),
    "invocations": ("invocation_id", "command, config, code_version"),
    "prediction_failures": ("failure_id", "study_hash, method, config_hash, method_config, reason, code_version"),
    "predicted_weight_changes": ("weight_change_id", "study_hash, method, config_hash, method_config, set_id, seed, "
                                                     "block, norm, sha256(direction::VARCHAR) AS direction_sha256, "
                                                     "code_version"),
}
# columns added after ledgers had chained rows: left out of a row's content while NULL, so older entries still match
_LATER_COLUMNS: dict[str, tuple[str, ...]] = {"removal_sets": ("new_labels",),
                                            "measurements": ("differentiable", "tags"), "studies": ("pairing",),
                                            "runs": ("checkpoint_sha256",)}
# the order an older ledger's rows are chained in on its first write: by the time each was written
_LEGACY_TIME = {"studies": "created_at", "removal_sets": "created_at",
                "measurements": "(SELECT s.created_at FROM studies s WHERE s.study_hash = measurements.study_hash)",
                "predictions": "registered_at", "runs": "finished_at", "models": "created_at",
                "flipped_labels": "(SELECT s.created_at FROM studies s WHERE s.study_hash = flipped_labels.study_hash)",
                "self_influence": "registered_at", "invocations": "started_at",
                "prediction_failures": "failed_at", "predicted_weight_changes": "registered_at"}


JSON_COLUMNS = ("config", "method_config", "tags")  # chained columns of type JSON, chained as their parsed value


class DuplicateKey(ValueError):
    """A JSON object names a key twice: Python's json keeps the last value, DuckDB's `->>` reads the first."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise DuplicateKey(f"duplicate JSON key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def parse_json(text: str) -> Any:
    """JSON text parsed; a duplicate key raises DuplicateKey."""
    return json.loads(text, object_pairs_hook=_refuse_duplicates)


def canonical_json(value: Any) -> str:
    """The one text of a JSON value that the ledger stores: keys sorted, Python's default separators."""
    return json.dumps(value, sort_keys=True)


def chained_json(text: str) -> Any:
    """A JSON column's value as the chain holds it: parsed, when `text` is its canonical serialisation; otherwise
    the text itself (duplicate keys, other spacing or order), which then differs from any chained value. (Canonical
    text never holds a duplicate key: the round trip drops it.)"""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if canonical_json(value) == text else text


def _canonical(value: Any) -> Any:
    """JSON-ready value whose text is the same every time it is read: floats as exact hex, JSON documents
    re-serialised with sorted keys."""
    if isinstance(value, float):
        return float.hex(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def contents(con: duckdb.DuckDBPyConnection, table: str, keys: Sequence[str] | None = None, claims: bool = False
             ) -> dict[str, dict]:
    """key -> the chained content of each row of `table` (only `keys` when given), as the table holds it now.
    A run's content includes every outcome value and, when it has any, its measured weight changes (each block's
    norm and the sha256 of its vector); a `running` run (a claim, queue state) is left out unless `claims` (a failed
    run claimed again by --retry-failed is chained as a retry entry)."""
    key, columns = CHAINED[table]
    where = [] if keys is None else [f"{key} IN (SELECT unnest($keys::VARCHAR[]))"]
    if table == "runs" and not claims:
        where.append("status <> 'running'")
    sql = f"SELECT {key} AS k, {columns} FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
    cursor = con.execute(sql, {"keys": list(keys)} if keys is not None else {})
    names = [d[0] for d in cursor.description][1:]
    rows = {k: dict(zip(names, values)) for k, *values in cursor.fetchall()}
    for row in rows.values():
        for field in _LATER_COLUMNS.get(table, ()):
            if row[field] is None:
                del row[field]
        for field in JSON_COLUMNS:
            if row.get(field) is not None:
                row[field] = chained_json(row[field])
    if table == "runs" and rows:
        for run, measurement, value in con.execute(
                "SELECT run_id, measurement_id, value FROM outcomes WHERE run_id IN (SELECT unnest($k::VARCHAR[])) "
                "ORDER BY ALL", {"k": list(rows)}).fetchall():
            rows[run].setdefault("outcomes", {})[measurement] = value
        for run, block, norm, digest in con.execute(
                "SELECT run_id, block, norm, sha256(direction::VARCHAR) FROM run_weight_changes "
                "WHERE run_id IN (SELECT unnest($k::VARCHAR[])) ORDER BY ALL", {"k": list(rows)}).fetchall():
            rows[run].setdefault("weight_changes", {})[block] = [norm, digest]
    return {k: _canonical(v) for k, v in rows.items()}


def entry_hash(prev_hash: str, seq: int, table: str, key: str, content: dict, legacy: bool,
               secret: bytes | None) -> str:
    """sha256 (or HMAC-SHA256 with `secret`) of the canonical JSON of the entry and the hash before it."""
    text = json.dumps([prev_hash, seq, table, key, content, legacy], sort_keys=True, separators=(",", ":"))
    if secret is not None:
        return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(text.encode()).hexdigest()


def secret() -> bytes | None:
    """The HMAC key from IFLEDGER_KEY, or None."""
    key = os.environ.get(KEY_VARIABLE)
    return key.encode() if key else None


def head(con: duckdb.DuckDBPyConnection) -> tuple[int, str]:
    """(seq, entry_hash) of the chain's last entry; (0, GENESIS) for an empty chain or a ledger without one."""
    if not has_chain(con):
        return 0, GENESIS
    row = con.execute("SELECT seq, entry_hash FROM chain ORDER BY seq DESC LIMIT 1").fetchone()
    return (int(row[0]), row[1]) if row else (0, GENESIS)


def has_chain(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the ledger has a chain table (ledgers written before it have none until their next write)."""
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'chain' "
                            "AND database_name = current_database()").fetchone()[0])


def entry_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """How many chain entries each table has."""
    if not has_chain(con):
        return {}
    return dict(con.execute("SELECT entry, count(*) FROM chain GROUP BY entry ORDER BY entry").fetchall())


def latest_entries(con: duckdb.DuckDBPyConnection, table: str, keys: Sequence[str] | None = None) -> dict[str, tuple]:
    """key -> (seq, content) of the latest chain entry of each row of `table` (content as chained_json reads it)."""
    where = "" if keys is None else " AND key IN (SELECT unnest($keys::VARCHAR[]))"
    rows = con.execute(f"SELECT key, seq, content FROM chain WHERE entry = $t{where} QUALIFY "
                       "row_number() OVER (PARTITION BY key ORDER BY seq DESC) = 1",
                       {"t": table, **({"keys": list(keys)} if keys is not None else {})}).fetchall()
    return {k: (seq, chained_json(c)) for k, seq, c in rows}


def append(con: duckdb.DuckDBPyConnection, table: str, keys: Sequence[str], legacy: bool = False,
           claims: bool = False) -> int:
    """Chain the rows `keys` of `table` whose content is new or changed since their latest entry (inside the
    caller's transaction; `claims`: `running` runs too). Returns how many entries were appended."""
    current = contents(con, table, keys, claims)
    chained = latest_entries(con, table, list(current))
    seq, prev = head(con)
    key = secret()
    at = now()
    rows = []
    for k in keys:
        if k not in current or (k in chained and chained[k][1] == current[k]):
            continue
        seq += 1
        digest = entry_hash(prev, seq, table, k, current[k], legacy, key)
        rows.append([seq, table, k, canonical_json(current[k]), legacy, key is not None, at, prev,
                     digest])
        chained[k] = (seq, current[k])
        prev = digest
    insert(con, "chain", ("seq", "entry", "key", "content", "legacy", "keyed", "recorded_at", "prev_hash",
                          "entry_hash"), rows, conflict="")
    return len(rows)


def chain_legacy_rows(con: duckdb.DuckDBPyConnection) -> int:
    """An older ledger (rows but no chain) chains all its rows on its first write, marked `legacy`, in the
    order they were written (by their timestamps). Returns how many entries that added."""
    if con.execute("SELECT count(*) FROM chain").fetchone()[0]:
        return 0
    parts = " UNION ALL ".join(f"SELECT '{t}' AS t, {k} AS k, {_LEGACY_TIME[t]} AS written, {i} AS i FROM {t}"
                               + (" WHERE status <> 'running'" if t == "runs" else "")
                               for i, (t, (k, _)) in enumerate(CHAINED.items()))
    ordered = con.execute(f"SELECT t, k FROM ({parts}) ORDER BY written NULLS FIRST, i, k").fetchall()
    if not ordered:
        return 0
    added = 0
    with transaction(con):
        start = 0
        for i in range(1, len(ordered) + 1):  # consecutive rows of one table are appended together
            if i == len(ordered) or ordered[i][0] != ordered[start][0]:
                added += append(con, ordered[start][0], [k for _, k in ordered[start:i]], legacy=True)
                start = i
    return added


def prediction_id(p: PredictionRecord) -> str:
    """A prediction's identity: the same method with the same config on the same (set, measurement)."""
    return content_hash("prediction", p.study_hash, p.method, p.method_config, p.set_id, p.measurement_id)


def register_predictions(
    con: duckdb.DuckDBPyConnection, predictions: Iterable[PredictionRecord], code_version: str,
    invocation_id: str | None = None,
) -> int:
    """Append new predictions and their chain entries in one transaction; already registered ones are
    skipped (same id). Returns how many were added. `seq` numbers the predictions in registration order; the
    `invocation_id` that registered them is stored beside them, not chained."""
    at = now()
    with transaction(con):
        known = {r[0] for r in con.execute("SELECT prediction_id FROM predictions").fetchall()}
        (seq,) = con.execute("SELECT coalesce(max(seq), 0) FROM predictions").fetchone()
        rows = []
        for p in predictions:
            pid = prediction_id(p)
            if pid in known:
                continue
            known.add(pid)
            seq += 1
            rows.append([seq, pid, p.study_hash, p.method, content_hash(p.method_config),
                         canonical_json(p.method_config), p.set_id, p.measurement_id, float(p.predicted),
                         code_version, at, "", "", invocation_id])
        insert(con, "predictions", ("seq", "prediction_id", "study_hash", "method", "config_hash", "method_config",
                                    "set_id", "measurement_id", "predicted", "code_version", "registered_at",
                                    "prev_hash", "row_hash", "invocation_id"), rows, conflict="")
        append(con, "predictions", [r[1] for r in rows])
    return len(rows)
