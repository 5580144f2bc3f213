"""Predictions made elsewhere (kronfluence, dattri, TRAK, ...), read from CSV or Parquet and registered,
verified and scored exactly like ours. The whole file is refused at its first bad line; reading is strict:
numbers are plain ASCII decimals (no `1_000`, other scripts' digits, a nonzero number that underflows to 0,
booleans or strings in Parquet), indices whole numbers (a list in Parquet), every column named once and every CSV
row as wide as its header, a set_id must agree with the row's indices and never name the full-data set, and two
rows for one (set, measurement) must agree."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from predictions.removal_sets import validate
from retrain.study import Study
from store.records import InputError, PredictionRecord, RemovalSetRecord, removal_set_id

COLUMNS = "measurement_id, predicted, and set_id (an existing removal set) or indices (training indices)"
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", re.ASCII)  # what a CSV cell may hold as a prediction
INTEGER = re.compile(r"[-+]?\d+", re.ASCII)


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every data row; `where` names the line (CSV) or row (Parquet)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        names = table.column_names
        _check_columns(path, names)
        kind = table.schema.field("predicted").type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            raise InputError(f"{path}: column predicted holds {kind}, not numbers")
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"{path} row {i}", row
        return
    with path.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark is accepted
        reader = csv.DictReader(f)
        try:
            _check_columns(path, reader.fieldnames or [])
            for row in reader:
                if None in row or None in row.values():  # more fields than the header, or fewer
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or ())
                    raise InputError(f"{path} line {reader.line_num}: {fields} fields where the header has "
                                     f"{len(reader.fieldnames or [])} (an unquoted comma? quote a field that holds "
                                     "one, and separate indices with spaces: \"3 7 9\")")
                yield f"{path} line {reader.line_num}", row
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (byte {e.start} of a chunk: {e.reason}); save it as UTF-8 "
                             "CSV") from None
        except csv.Error as e:
            raise InputError(f"{path} line {reader.line_num}: not readable CSV ({e})") from None


def _check_columns(path: Path, names: list[str]) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{path}: column {twice[0]!r} appears twice; keep one")
    for needed in ("measurement_id", "predicted"):
        if needed not in names:
            raise InputError(f"{path}: missing column {needed!r}; the file needs {COLUMNS}")
    if "set_id" not in names and "indices" not in names:
        raise InputError(f"{path}: missing column 'set_id' or 'indices'; the file needs {COLUMNS}")


def _indices(value: Any, where: str) -> list[int]:
    """Whole numbers only: `7` or 7, never 1.7, True or `1_000`; in Parquet, a list of them."""
    if not isinstance(value, (str, list, tuple)):
        raise InputError(f"{where}: indices must be a list of whole numbers (a list column in Parquet), got "
                         f"{_shown(value)}")
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and INTEGER.fullmatch(v)
               for v in items):
        raise InputError(f"{where}: indices must be whole numbers (space-separated in CSV), got {_shown(value)}")
    return [int(v) for v in items]


def _predicted(value: Any, where: str) -> float:
    """A finite number: a float or int in Parquet (not a boolean or a string), a plain decimal in CSV."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()) or \
            isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if number == 0 and isinstance(value, str) and re.search(r"[1-9]", value.split("e")[0].split("E")[0]):
            raise InputError(f"{where}: predicted {_shown(value)} is too small for a double (it would read as 0.0)")
        if math.isfinite(number):
            return number
    raise InputError(f"{where}: predicted {_shown(value)} is not a finite number")


def _shown(value: Any) -> str:
    """A value as a message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


def read_imported(path: str | Path, study: Study, method: str, known_sets: dict[str, tuple[int, ...]]
                  ) -> tuple[list[RemovalSetRecord], list[PredictionRecord]]:
    """Parse and validate a whole file: every row needs a known measurement, a finite number, and either a known
    set_id (`known_sets`: set_id -> the points of each of the ledger's removal sets) or valid training indices.
    Returns the new removal sets and the predictions of method `imported:NAME`."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"prediction file {path} does not exist")
    measurements, without_gradient = set(study.measurements()), study.measurements_without_gradient()
    config = {"file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    sets: dict[str, RemovalSetRecord] = {}
    seen: dict[tuple[str, str], tuple[float, str]] = {}  # (set_id, measurement) -> (predicted, where first)
    records = []
    for where, row in _rows(file):
        measurement = str(row.get("measurement_id") or "")
        if measurement not in measurements:
            raise InputError(f"{where}: unknown measurement {_shown(measurement)} of study {study.name} "
                             f"(e.g. {next(iter(measurements))!r})")
        if measurement in without_gradient:
            raise InputError(f"{where}: {measurement} has no gradient (the study says so); no prediction of it is "
                             "registered")
        predicted = _predicted(row.get("predicted"), where)
        set_id = row.get("set_id")
        if row.get("indices") not in (None, ""):
            indices = validate(_indices(row.get("indices"), where), study.n_train, where)
            record = RemovalSetRecord(study.study_hash, "user", f"imported:{file.name}", indices)
            if set_id in known_sets and known_sets[set_id] == record.indices:  # one of the ledger's sets, any kind
                record = None
            elif set_id and set_id != record.set_id:
                raise InputError(f"{where}: set_id {_shown(set_id)} contradicts the row's indices (their set is "
                                 f"{record.set_id!r})")
            if record is not None:
                sets.setdefault(record.set_id, record)
                set_id = record.set_id
        elif not set_id:
            raise InputError(f"{where}: neither set_id nor indices given")
        elif set_id == removal_set_id(study.study_hash, ()):
            raise InputError(f"{where}: set_id {set_id} is the full-data set (it removes nothing): a prediction is "
                             "of removing a set; give the set_id or indices of one")
        elif set_id not in known_sets and set_id not in sets:
            raise InputError(f"{where}: no removal set {_shown(set_id)} in the ledger; give its indices instead")
        first = seen.setdefault((set_id, measurement), (predicted, where))
        if first[0] != predicted:
            raise InputError(f"{where}: a second prediction for set {set_id} and {measurement} ({predicted!r}; "
                             f"{first[1]} says {first[0]!r})")
        if first[1] == where:
            records.append(PredictionRecord(study.study_hash, f"imported:{method}", config, set_id, measurement,
                                            predicted))
    if not records:
        raise InputError(f"{path} holds no predictions")
    return list(sets.values()), records
