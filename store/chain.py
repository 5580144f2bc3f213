"""The hash chain: every registered prediction carries the hash of its content and of the entry before it;
`audit` recomputes them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb

from store.connection import insert, now, transaction
from store.records import PredictionRecord, content_hash, removal_set_id

GENESIS = "0" * 64


def prediction_id(p: PredictionRecord) -> str:
    """A prediction's identity: the same method with the same config on the same (set, measurement)."""
    return content_hash("prediction", p.study_hash, p.method, p.method_config, p.set_id, p.measurement_id)


def _row_hash(prev_hash: str, row: Sequence[Any]) -> str:
    return content_hash(prev_hash, [float(v).hex() if isinstance(v, float) else v for v in row], length=64)


_CHAINED = ("seq, prediction_id, study_hash, method, config_hash, method_config, set_id, measurement_id, "
            "predicted, code_version, registered_at")


def register_predictions(
    con: duckdb.DuckDBPyConnection, predictions: Iterable[PredictionRecord], code_version: str
) -> int:
    """Append new predictions to the hash chain in one transaction; already registered ones are
    skipped (same id). Returns how many were added. row_hash = sha256(prev_hash, row content)."""
    at = now()
    with transaction(con):
        known = {r[0] for r in con.execute("SELECT prediction_id FROM predictions").fetchall()}
        last = con.execute("SELECT seq, row_hash FROM predictions ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0], last[1]) if last else (0, GENESIS)
        rows = []
        for p in predictions:
            pid = prediction_id(p)
            if pid in known:
                continue
            known.add(pid)
            seq += 1
            config = json.dumps(p.method_config, sort_keys=True)
            row = [seq, pid, p.study_hash, p.method, content_hash(p.method_config), config, p.set_id,
                   p.measurement_id, float(p.predicted), code_version, at]
            row_hash = _row_hash(prev, row)
            rows.append([*row, prev, row_hash])
            prev = row_hash
        insert(con, "predictions", [*_CHAINED.split(", "), "prev_hash", "row_hash"], rows, conflict="")
    return len(rows)


def audit(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Recompute the prediction hash chain and the removal-set content ids.
    Returns one line per problem (empty when the ledger is intact)."""
    problems = []
    prev = GENESIS
    rows = con.execute(f"SELECT {_CHAINED}, prev_hash, row_hash FROM predictions ORDER BY seq").fetchall()
    for expected_seq, row in enumerate(rows, start=1):
        content, prev_hash, row_hash = list(row[:11]), row[11], row[12]
        seq = content[0]
        if seq != expected_seq:
            problems.append(f"predictions: seq {expected_seq} is missing (chain jumps to seq {seq})")
        if prev_hash != prev:
            problems.append(f"predictions seq {seq} (prediction_id {content[1]}): prev_hash does not match "
                            "the row before it")
        if content[1] != _recompute_prediction_id(content):
            problems.append(f"predictions seq {seq}: prediction_id does not match its content")
        if _row_hash(prev_hash, content) != row_hash:
            problems.append(f"predictions seq {seq} (prediction_id {content[1]}): content was altered "
                            "after registration (row_hash mismatch)")
        prev = row_hash
    for set_id, study_hash, indices in con.execute(
        "SELECT set_id, study_hash, indices FROM removal_sets ORDER BY set_id"
    ).fetchall():
        if removal_set_id(study_hash, indices) != set_id:
            problems.append(f"removal_sets set_id {set_id}: indices were altered (content hash mismatch)")
    return problems


def _recompute_prediction_id(content: list[Any]) -> str:
    _, _, study_hash, method, _, config, set_id, measurement_id = content[:8]
    return prediction_id(PredictionRecord(study_hash, method, json.loads(config), set_id, measurement_id, 0.0))
