"""Full-data models above IFLEDGER_MODEL_FILE_BYTES as content-addressed files beside the ledger: stored without a
BLOB, chained by the same sha256, checked by audit, loaded one at a time, and sent to a worker only with the chunk
whose jobs use them."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import duckdb
import pytest
import torch

import store
from flows.cli import main
from flows.runner import chunk_models
from retrain.regimes import Job, load_params, params_to_bytes, stacked_params
from store.chain import contents
from store.model_files import MODEL_FILE_VARIABLE, model_file_bytes


def _record(seed: int, theta: torch.Tensor, study: str = "s") -> store.ModelRecord:
    return store.ModelRecord(study, seed, params_to_bytes(theta))


@pytest.fixture
def tiny_threshold(monkeypatch) -> None:
    """Every model larger than 100 bytes goes to a file (a serialized tensor is a few hundred bytes at least)."""
    monkeypatch.setenv(MODEL_FILE_VARIABLE, "100")


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _audit(db: Path) -> list[str]:
    with store.read_only(db) as con:  # the sandboxed reader `ifledger audit` uses
        return store.audit(con, store.receipts_path(db))


def test_a_large_model_is_a_file_named_by_its_sha256_and_a_small_one_stays_a_blob(tmp_path, monkeypatch):
    db = tmp_path / "ledger.duckdb"
    large, small = torch.arange(64, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    threshold = len(params_to_bytes(large)) - 1
    assert len(params_to_bytes(small)) <= threshold
    monkeypatch.setenv(MODEL_FILE_VARIABLE, str(threshold))
    with store.connect(db) as con:
        store.save_models(con, [_record(0, large), _record(1, small)])
        rows = {s: (p, h) for s, p, h in con.execute("SELECT seed, params, params_sha256 FROM models").fetchall()}
        loaded = store.load_models(con, "s")
    digest = hashlib.sha256(params_to_bytes(large)).hexdigest()
    path = Path(f"{db}.models") / f"{digest}.pt"
    assert rows[0] == (None, digest) and path.read_bytes() == params_to_bytes(large)
    assert rows[1] == (params_to_bytes(small), None)
    assert loaded == {0: path.resolve(), 1: params_to_bytes(small)}
    assert torch.equal(load_params(loaded[0]), large) and torch.equal(load_params(loaded[1]), small)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert _audit(db) == []


def test_a_file_rows_chained_content_is_the_blob_rows(tmp_path, monkeypatch):
    """The chain holds sha256 of the parameters whichever way they are stored: a ledger's older BLOB rows keep
    their content, and a file row's is what a BLOB row of the same bytes would have."""
    theta = torch.linspace(0, 1, 50, dtype=torch.float64)
    chained = {}
    for name, threshold in (("blob", "1000000"), ("file", "0")):
        monkeypatch.setenv(MODEL_FILE_VARIABLE, threshold)
        with store.connect(tmp_path / f"{name}.duckdb") as con:
            store.save_models(con, [_record(0, theta)])
            chained[name] = contents(con, "models")
    assert chained["blob"] == chained["file"]
    assert chained["file"]["s/0"]["params_sha256"] == hashlib.sha256(params_to_bytes(theta)).hexdigest()


def test_an_existing_file_is_not_rewritten_and_audit_names_it(tmp_path, tiny_threshold):
    db = tmp_path / "ledger.duckdb"
    theta = torch.ones(40, dtype=torch.float64)
    digest = hashlib.sha256(params_to_bytes(theta)).hexdigest()
    folder = Path(f"{db}.models")
    folder.mkdir()
    (folder / f"{digest}.pt").write_bytes(b"not the model")
    with store.connect(db) as con:
        store.save_models(con, [_record(0, theta)])
    assert (folder / f"{digest}.pt").read_bytes() == b"not the model"
    problems = _audit(db)
    assert len(problems) == 1 and "seed 0" in problems[0] and str(folder / f"{digest}.pt") in problems[0]


def test_audit_names_one_altered_and_one_missing_model_file(tmp_path, tiny_threshold):
    db = tmp_path / "ledger.duckdb"
    with store.connect(db) as con:
        store.save_models(con, [_record(s, torch.full((30,), float(s), dtype=torch.float64)) for s in range(3)])
        paths = store.load_models(con, "s")
    assert _audit(db) == []
    _flip_a_byte(paths[1])
    problems = _audit(db)
    assert len(problems) == 1 and "seed 1" in problems[0] and str(paths[1]) in problems[0] and "altered" in problems[0]
    paths[2].unlink()
    problems = _audit(db)
    assert len(problems) == 2 and "seed 2" in problems[1] and str(paths[2]) in problems[1] and "missing" in problems[1]


def test_audit_names_a_blob_swapped_beside_the_hash_it_replaced(tmp_path):
    """The chain holds coalesce(params_sha256, sha256(params)): a BLOB row given the old BLOB's sha256 as
    params_sha256 and new parameters keeps its chained content, and audit still names it."""
    db = tmp_path / "ledger.duckdb"
    theta = torch.ones(30, dtype=torch.float64)
    with store.connect(db) as con:
        store.save_models(con, [_record(0, theta)])
        con.execute("UPDATE models SET params = ?, params_sha256 = ?",
                    [params_to_bytes(2 * theta), hashlib.sha256(params_to_bytes(theta)).hexdigest()])
    problems = _audit(db)
    assert any("s/0" in p and "both a BLOB and params_sha256" in p for p in problems), problems


def test_an_older_ledgers_models_table_is_migrated(tmp_path):
    """A ledger whose `models.params` was NOT NULL and had no params_sha256 gets both from the shipped schema."""
    db = tmp_path / "old.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE models (study_hash VARCHAR NOT NULL, seed INTEGER NOT NULL, params BLOB NOT NULL, "
                    "created_at TIMESTAMP NOT NULL, PRIMARY KEY (study_hash, seed))")
        con.execute("INSERT INTO models VALUES ('s', 0, 'abc'::BLOB, now())")
    store.bring_up_to_date(db)
    with duckdb.connect(str(db)) as con:
        columns = dict(con.execute("SELECT column_name, is_nullable FROM duckdb_columns() WHERE table_name = 'models'"
                                   ).fetchall())
        assert columns["params"] and "params_sha256" in columns
        assert con.execute("SELECT params, params_sha256 FROM models").fetchall() == [(b"abc", None)]


def test_a_bad_threshold_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MODEL_FILE_VARIABLE, "64MB")
    with pytest.raises(store.InputError, match=MODEL_FILE_VARIABLE):
        model_file_bytes()
    assert main(["--db", str(tmp_path / "ledger.duckdb"), "status"]) == 2
    assert MODEL_FILE_VARIABLE in capsys.readouterr().err
    assert not (tmp_path / "ledger.duckdb").exists()


def test_a_chunk_carries_only_the_models_of_its_seeds(tmp_path):
    """A file-backed model travels as its path, a loaded one as a CPU tensor, and only those of the chunk's seeds."""
    path = tmp_path / "m.pt"
    full = {0: torch.zeros(3), 1: path, 2: torch.ones(3)}
    jobs = [Job("a", 2, (1,)), Job("b", 1, (2,)), Job("c", 2, (3,))]
    chunk = chunk_models(full, jobs)
    assert list(chunk) == [1, 2] and chunk[1] == path and torch.equal(chunk[2], full[2])
    assert chunk[2].device.type == "cpu"


def test_stacked_params_loads_each_kind(tmp_path):
    thetas = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    path = tmp_path / "m.pt"
    path.write_bytes(params_to_bytes(thetas[1]))
    assert torch.equal(stacked_params([thetas[0], path, params_to_bytes(thetas[2])]), torch.stack(thetas))


def _rows(db: Path, sql: str) -> list[tuple]:
    with store.read_only(db) as con:
        return con.execute(sql).fetchall()


OUTCOMES = ("SELECT r.set_id, r.seed, r.regime, o.measurement_id, o.value FROM runs r JOIN outcomes o USING (run_id) "
            "ORDER BY ALL")
PREDICTIONS = "SELECT prediction_id, predicted FROM predictions ORDER BY ALL"


@pytest.mark.full
def test_run_linreg_with_model_files_matches_the_blob_ledger(linreg_ledger, tmp_path, monkeypatch):
    """`ifledger run linreg` with every model as a file (verify on two worker processes, each sent the paths of
    its chunk's models): no BLOB, the same outcomes and predictions bit for bit as the BLOB ledger, audit passes,
    then names an altered and a deleted file; export-model reads a file-backed model."""
    monkeypatch.setenv(MODEL_FILE_VARIABLE, "0")
    db = tmp_path / "ledger.duckdb"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--db", str(db), "run", "linreg", "--report-dir", str(tmp_path / "reports"),
                     "--runner", "process", "--workers", "2"]) == 0
    models = _rows(db, "SELECT seed, params IS NULL, params_sha256 FROM models ORDER BY seed")
    assert [(s, empty) for s, empty, _ in models] == [(0, True), (1, True)]
    files = [Path(f"{db}.models") / f"{digest}.pt" for _, _, digest in models]
    assert all(f.is_file() for f in files)
    blob = linreg_ledger["db"]
    assert _rows(blob, "SELECT count(*) FROM models WHERE params IS NULL") == [(0,)]
    assert _rows(db, OUTCOMES) == _rows(blob, OUTCOMES) and _rows(db, OUTCOMES)
    assert _rows(db, PREDICTIONS) == _rows(blob, PREDICTIONS) and _rows(db, PREDICTIONS)

    outputs = [tmp_path / "from_file.pt", tmp_path / "from_blob.pt"]
    for source, output in zip((db, blob), outputs):
        assert main(["--db", str(source), "export-model", "linreg", "--seed", "1", "--output", str(output)]) == 0
    exported = [torch.load(output, weights_only=True) for output in outputs]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])

    assert main(["--db", str(db), "audit"]) == 0
    _flip_a_byte(files[0])
    assert len(_audit(db)) == 1 and main(["--db", str(db), "audit"]) == 1
    _flip_a_byte(files[0])
    files[1].unlink()
    problems = _audit(db)
    assert len(problems) == 1 and "seed 1" in problems[0] and "missing" in problems[0]


def test_export_model_refuses_to_write_into_the_model_files_folder(tmp_path, capsys):
    db = tmp_path / "ledger.duckdb"
    store.models_folder(db).mkdir()
    output = store.models_folder(db) / "model.pt"
    assert main(["--db", str(db), "export-model", "linreg", "--seed", "0", "--output", str(output)]) == 2
    assert "model files" in capsys.readouterr().err and not output.exists()
