"""Full-data models too large for a BLOB: content-addressed files beside the ledger, `<ledger>.models/<sha256>.pt`,
where sha256 is that of the file's bytes (the serialized parameters, the bytes a BLOB would hold). The `models` row
then holds no BLOB and names the file by `params_sha256`, which the chain holds for every row alike. No torch here."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import duckdb

from store.records import InputError

# serialized models larger than this go to files (16M float32 parameters): below it a BLOB, read whole with every
# seed's and pickled into the chunks that use it, costs little beside training; above it (a 100M-parameter model is
# 400 MB) BLOBs swell the DuckDB file and its write-ahead log, and every process would hold every seed's model
MODEL_FILE_BYTES = 64 * 2**20
MODEL_FILE_VARIABLE = "IFLEDGER_MODEL_FILE_BYTES"
_CHUNK = 2**24  # bytes read at a time when hashing a file


def model_file_bytes() -> int:
    """The size above which a model is stored as a file: $IFLEDGER_MODEL_FILE_BYTES, or MODEL_FILE_BYTES; an
    InputError for anything but a whole number of bytes, 0 or more."""
    text = os.environ.get(MODEL_FILE_VARIABLE, "").strip()
    if not text:
        return MODEL_FILE_BYTES
    if not (text.isascii() and text.isdigit()):
        raise InputError(f"{MODEL_FILE_VARIABLE}={text!r}: give a whole number of bytes, e.g. "
                         f"{MODEL_FILE_BYTES} (models serialized larger than it are stored as files)")
    return int(text)


def ledger_path(con: duckdb.DuckDBPyConnection) -> Path:
    """The ledger file of a connection; an InputError in memory (it has nowhere to keep model files)."""
    (path,) = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    if not path:
        raise InputError("an in-memory ledger cannot hold model files: give --db a file")
    return Path(path)


def models_folder(ledger: str | Path) -> Path:
    """`<ledger>.models`, absolute (a worker elsewhere in the tree finds it): where a ledger's model files are."""
    path = Path(ledger).resolve()
    return path.with_name(path.name + ".models")


def model_file(folder: Path, sha256: str) -> Path:
    """`folder/<sha256>.pt`; an InputError for a name that is not a sha256 (a row altered to point elsewhere)."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InputError(f"models: params_sha256 {sha256!r} is not a sha256; run `ifledger audit`")
    return folder / f"{sha256}.pt"


def write_model_file(folder: Path, params: bytes) -> str:
    """Store `params` as `folder/<sha256>.pt` and return its sha256. Written to a temporary name in the folder, flushed
    to disk and renamed, so that a crash never leaves a partial file under a valid name; an existing file of that name
    is kept as it is (`audit` checks it)."""
    digest = hashlib.sha256(params).hexdigest()
    path = model_file(folder, digest)
    if path.exists():
        return digest
    folder.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{digest}.", suffix=".tmp", delete=False) as out:
        try:
            out.write(params)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
    os.replace(out.name, path)
    return digest


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read a chunk at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_file_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """One line per `models` row that holds both a BLOB and a file's sha256 (the chain holds the sha256 only, so a
    BLOB swapped beside the hash it replaced would otherwise read as an intact row), and one per file-backed model
    whose file is missing or whose bytes no longer hash to its name."""
    both = con.execute("SELECT study_hash, seed FROM models WHERE params IS NOT NULL AND params_sha256 IS NOT NULL "
                       "ORDER BY ALL").fetchall()
    problems = [f"models {h}/{seed}: the row holds both a BLOB and params_sha256 (one of them was added afterwards)"
                for h, seed in both]
    rows = con.execute("SELECT study_hash, seed, params_sha256 FROM models WHERE params_sha256 IS NOT NULL "
                       "ORDER BY ALL").fetchall()
    if not rows:
        return problems
    folder = models_folder(ledger_path(con))
    for study_hash, seed, digest in rows:
        try:
            path = model_file(folder, digest)
        except InputError as e:
            problems.append(f"models {study_hash}/{seed}: {str(e).removeprefix('models: ')}")
            continue
        if not path.is_file():
            problems.append(f"models {study_hash}/{seed}: seed {seed}'s model file {path} is missing")
        elif (found := file_sha256(path)) != digest:
            problems.append(f"models {study_hash}/{seed}: seed {seed}'s model file {path} was altered (its bytes "
                            f"hash to {found}, not its name)")
    return problems
