"""Predictions made elsewhere (kronfluence, dattri, TRAK, ...), read from CSV or Parquet and registered,
verified and scored exactly like ours. The whole file is refused at its first bad line."""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from predictions.removal_sets import validate
from retrain.study import Study
from store.records import InputError, PredictionRecord, RemovalSetRecord

COLUMNS = "measurement_id, predicted, and set_id (an existing removal set) or indices (training indices)"


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every data row; `where` names the line (CSV) or row (Parquet)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        names = table.column_names
        _check_columns(path, names)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"{path} row {i}", row
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        _check_columns(path, reader.fieldnames or [])
        for row in reader:
            yield f"{path} line {reader.line_num}", row


def _check_columns(path: Path, names: list[str]) -> None:
    for needed in ("measurement_id", "predicted"):
        if needed not in names:
            raise InputError(f"{path}: missing column {needed!r}; the file needs {COLUMNS}")
    if "set_id" not in names and "indices" not in names:
        raise InputError(f"{path}: missing column 'set_id' or 'indices'; the file needs {COLUMNS}")


def _indices(value: Any, where: str) -> list[int]:
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value or [])
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise InputError(f"{where}: indices must be whole numbers (space-separated in CSV), got {value!r}") from None


def read_imported(path: str | Path, study: Study, method: str, known_sets: set[str]
                  ) -> tuple[list[RemovalSetRecord], list[PredictionRecord]]:
    """Parse and validate a whole file: every row needs a known measurement, a finite number, and either a known
    set_id or valid training indices. Returns the new removal sets and the predictions of method `imported:NAME`."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"prediction file {path} does not exist")
    measurements = set(study.measurements())
    config = {"file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    sets: dict[str, RemovalSetRecord] = {}
    records = []
    for where, row in _rows(file):
        measurement = str(row.get("measurement_id") or "")
        if measurement not in measurements:
            raise InputError(f"{where}: unknown measurement {measurement!r} of study {study.name} "
                             f"(e.g. {next(iter(measurements))!r})")
        try:
            predicted = float(row.get("predicted"))
        except (TypeError, ValueError):
            raise InputError(f"{where}: predicted {row.get('predicted')!r} is not a number") from None
        if not math.isfinite(predicted):
            raise InputError(f"{where}: predicted {row.get('predicted')!r} is not a finite number")
        set_id = row.get("set_id")
        if set_id:
            if set_id not in known_sets and set_id not in sets:
                raise InputError(f"{where}: no removal set {set_id!r} in the ledger; give its indices instead")
        else:
            indices = validate(_indices(row.get("indices"), where), study.n_train, where)
            record = RemovalSetRecord(study.study_hash, "user", f"imported:{file.name}", indices)
            sets[record.set_id] = record
            set_id = record.set_id
        records.append(PredictionRecord(study.study_hash, f"imported:{method}", config, set_id, measurement,
                                        predicted))
    if not records:
        raise InputError(f"{path} holds no predictions")
    return list(sets.values()), records
