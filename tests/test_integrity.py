"""The second tamper campaign (issue 23), replayed on a small ledger written with ifledger's own functions, with
receipts, with and without IFLEDGER_KEY: duplicate JSON keys, override entries followed by a legitimate write,
failed runs re-marked `running`, a forged macro behind a shipped copy, tables rebuilt without their keys. Each is
caught by `ifledger audit` (exit 1, a line naming what changed); a write refuses to go on over it."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest
from conftest import file_digest

import store
from flows.cli import main
from store import InputError, PredictionRecord, RemovalSetRecord, RunRecord, StudyRecord
from store.chain import append
from store.connection import schema_sql

STUDY = StudyRecord("toy", "h0", "toy", {"recipe": {"seeds": 2}}, n_train=10, n_params=3,
                    measurements={"m0": "", "m1": ""}, measurement_tags={"m0": {"direction": "forward"}})
SETS = [RemovalSetRecord("h0", "single", f"single:{i}", (i,)) for i in range(4)]


@pytest.fixture(params=[None, "the lab's secret"], ids=["unkeyed", "keyed"])
def ledger(request, tmp_path, monkeypatch) -> Path:
    """Predictions, then two seeds of runs (set 3's seed-1 run failed), written through `store.connect` (receipts
    beside the file), under IFLEDGER_KEY in the keyed case."""
    if request.param:
        monkeypatch.setenv(store.KEY_VARIABLE, request.param)
    db = tmp_path / "l.duckdb"
    full = store.full_set_id("h0")
    with store.connect(db) as con:
        store.register_study(con, STUDY)
        store.register_removal_sets(con, SETS)
        store.register_predictions(con, [PredictionRecord("h0", "exact", {"damping": 0.0}, s.set_id, m, 0.1 * k)
                                         for k, s in enumerate(SETS) for m in ("m0", "m1")], "test")
    with store.connect(db) as con:
        store.record_runs(con, [RunRecord("h0", full, seed, "scratch", "done", outcomes={"m0": 1.0, "m1": 1.0})
                                for seed in range(2)])
        store.record_runs(con, [RunRecord("h0", s.set_id, seed, "scratch", "done",
                                          outcomes={"m0": 1.0 + 0.1 * k + 0.01 * seed, "m1": 1.0 + 0.1 * k})
                                for k, s in enumerate(SETS) for seed in range(2) if (k, seed) != (3, 1)]
                          + [RunRecord("h0", SETS[3].set_id, 1, "scratch", "failed", reason="diverged")])
    assert _audit(db) == (0, "")
    return db


def _audit(db: Path, *options: str) -> tuple[int, str]:
    """`ifledger audit`'s exit code and its ALTERED lines."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--db", str(db), "audit", *options])
    return code, err.getvalue()


def _written(db: Path) -> tuple:
    """The chain head, the number of removal sets and the receipts: what a refused write must leave as it was."""
    with duckdb.connect(str(db), read_only=True) as con:
        return store.head(con), con.execute("SELECT count(*) FROM removal_sets").fetchone(), \
            Path(f"{db}.receipts").read_text()


def _tamper(db: Path, *statements: str) -> None:
    with duckdb.connect(str(db)) as con:
        for sql in statements:
            con.execute(sql)


def test_duplicate_keys_in_a_chain_entry_are_caught(ledger):
    """`"status": "x"` put first in each run's entry: Python's json keeps the last duplicate (the hash still
    matches), DuckDB's ->> reads the first, so the runs dropped out of chain_positions."""
    _tamper(ledger, "UPDATE chain SET content = '{\"status\": \"x\", ' || content[2:] WHERE entry = 'runs'")
    with duckdb.connect(str(ledger), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM chain_positions WHERE entry = 'runs'").fetchone() == (0,)
    code, err = _audit(ledger)
    assert code == 1 and "duplicate JSON key 'status'" in err and "(runs " in err, err


@pytest.mark.parametrize("table, column, key, first", [
    ("studies", "config", "recipe", '{"seeds": 1}'),
    ("measurements", "tags", "direction", '"reverse"'),
    ("predictions", "method_config", "damping", "1"),
])
def test_duplicate_keys_in_a_chained_json_column_are_caught(ledger, table, column, key, first):
    """A duplicate key put first in a JSON column: what SQL reads (the first) is not what Python parsed."""
    _tamper(ledger, f"UPDATE {table} SET {column} = '{{\"{key}\": {first}, ' || {column}[2:] "
                    f"WHERE {column} IS NOT NULL")
    code, err = _audit(ledger)
    assert code == 1 and f"ALTERED {table} " in err and column in err, err


def test_a_json_column_in_another_spelling_is_caught(ledger):
    _tamper(ledger, "UPDATE studies SET config = '{\"recipe\":{\"seeds\":2}}'")  # same value, other text
    code, err = _audit(ledger)
    assert code == 1 and "ALTERED studies h0: changed" in err and "config" in err, err


OVERRIDES = {  # rows edited, then re-chained with ifledger's own `append`
    "predictions set to the outcomes": (
        "UPDATE predictions p SET predicted = a.actual FROM prediction_accuracy a WHERE a.seq = p.seq",
        "predictions", "a prediction never changes after registration"),
    "outcomes moved": ("UPDATE outcomes SET value = value + 0.5 WHERE run_id IN (SELECT run_id FROM runs r JOIN "
                       "removal_sets s USING (set_id) WHERE s.kind <> 'full')", "runs",
                       "an outcome never changes once written"),
    "runs re-marked failed": ("UPDATE runs SET status = 'failed', reason = 'x' WHERE status = 'done' AND set_id <> "
                              f"'{store.full_set_id('h0')}'", "runs", "a run never moves from 'done' to 'failed'"),
}


@pytest.mark.parametrize("name", OVERRIDES)
def test_override_entries_are_caught_and_no_later_write_covers_them(ledger, name):
    sql, table, rule = OVERRIDES[name]
    keys = {"predictions": "SELECT prediction_id FROM predictions", "runs": "SELECT run_id FROM runs"}[table]
    with duckdb.connect(str(ledger)) as con:
        con.execute(sql)
        if table == "runs":
            con.execute("DELETE FROM outcomes WHERE run_id IN (SELECT run_id FROM runs WHERE status = 'failed')")
        assert append(con, table, [k for (k,) in con.execute(keys).fetchall()]) > 0
    before = _written(ledger)
    with pytest.raises(InputError, match="does not audit clean"), store.connect(ledger) as con:  # a legitimate write
        store.register_removal_sets(con, [RemovalSetRecord("h0", "single", "single:9", (9,))])
    assert _written(ledger) == before  # refused: nothing written, no receipt
    code, err = _audit(ledger)
    assert code == 1 and f"ALTERED {table} " in err and "re-chained" in err and rule in err, err


def test_failed_runs_re_marked_running_are_caught_and_a_retry_is_not(ledger):
    _tamper(ledger, "UPDATE runs SET status = 'running' WHERE status = 'failed'")
    code, err = _audit(ledger)
    assert code == 1 and "status changed 'failed' -> 'running'" in err, err
    _tamper(ledger, "UPDATE runs SET status = 'failed' WHERE status = 'running'")
    with store.connect(ledger) as con:  # --retry-failed: its claim is chained as a retry entry
        assert store.start_runs(con, "h0", [(SETS[3].set_id, 1, "scratch")], retry_failed=True)
    assert _audit(ledger) == (0, "")


def test_a_macro_forged_behind_a_shipped_copy_is_caught_and_nothing_reads_through_it(ledger, tmp_path):
    shipped = re.search(r"CREATE OR REPLACE MACRO t975\(df\) AS.*?;", schema_sql(), re.S).group(0)
    _tamper(ledger, "CREATE SCHEMA shadow", shipped.replace("MACRO t975", "MACRO shadow.t975"),
            "CREATE OR REPLACE MACRO t975(df) AS 0.0")
    code, err = _audit(ledger)
    assert code == 1 and "ALTERED schema: macro t975 differs" in err and "macro shadow.t975 is not one" in err, err
    digest = file_digest(ledger)
    for command in (["sql", "SELECT 1"], ["report", "--report-dir", str(tmp_path / "r")], ["calibrate"]):
        assert main(["--db", str(ledger), *command]) == 2, command
    assert file_digest(ledger) == digest


def test_a_table_rebuilt_without_its_primary_key_is_caught(ledger):
    _tamper(ledger, "CREATE TABLE copied AS SELECT * FROM outcomes", "INSERT INTO copied SELECT * FROM outcomes",
            "DROP TABLE outcomes", "ALTER TABLE copied RENAME TO outcomes")
    with duckdb.connect(str(ledger), read_only=True) as con:
        assert con.execute("SELECT count(*) > count(DISTINCT (run_id, measurement_id)) FROM outcomes").fetchone()[0]
    code, err = _audit(ledger)
    assert code == 1 and "ALTERED schema: table outcomes differs" in err, err


def test_entries_appended_outside_ifledger_stop_the_next_write(ledger):
    with duckdb.connect(str(ledger)) as con:
        store.register_predictions(con, [PredictionRecord("h0", "grad_dot", {}, SETS[0].set_id, "m0", 9.0)], "x")
    with pytest.raises(InputError, match="not covered by any receipt"), store.connect(ledger):
        pass


@pytest.fixture
def plain(tmp_path) -> Path:
    """A small unkeyed ledger with receipts (no IFLEDGER_KEY)."""
    db = tmp_path / "plain.duckdb"
    with store.connect(db) as con:
        store.register_study(con, STUDY)
        store.register_removal_sets(con, SETS)
    return db


@pytest.mark.parametrize("target", ["ledger", "receipts", "link to the ledger", "existing file"])
def test_sql_output_refuses_the_ledger_its_receipts_and_an_existing_file(plain, tmp_path, capsys, target):
    path = {"ledger": plain, "receipts": Path(f"{plain}.receipts"), "link to the ledger": tmp_path / "link.csv",
            "existing file": tmp_path / "mine.csv"}[target]
    if target == "link to the ledger":
        path.symlink_to(plain)
    if target == "existing file":
        path.write_text("keep me\n")
    before = {p: file_digest(p) for p in (plain, Path(f"{plain}.receipts"), path)}
    capsys.readouterr()
    assert main(["--db", str(plain), "sql", "SELECT 1", "--format", "csv", "--output", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("--force" in err if target == "existing file" else "refusing" in err), err
    assert {p: file_digest(p) for p in before} == before
    forced = main(["--db", str(plain), "sql", "SELECT 1 AS one", "--format", "csv", "--output", str(path), "--force"])
    assert forced == (0 if target == "existing file" else 2)  # --force never reaches the ledger or its receipts
    if target == "existing file":
        assert path.read_text() == "one\n1\n"


@pytest.mark.parametrize("fmt", ["table", "csv", "parquet"])
def test_a_result_over_the_memory_limit_stops_with_one_line(plain, tmp_path, capsys, fmt):
    """Two million rows hold ~100 MB as Python objects (~16 MB in Arrow): over a 10MB limit, though DuckDB itself
    needs little memory to produce them; nothing is left at --output."""
    out = tmp_path / f"big.{fmt}"
    capsys.readouterr()
    code = main(["--db", str(plain), "sql", "SELECT i, i * 2 AS j FROM range(2000000) t(i)", "--memory", "10MB",
                 "--format", fmt, *(["--output", str(out)] if fmt != "table" else [])])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out[:200]
    assert captured.err.count("\n") == 1 and "result is larger than 10MB" in captured.err, captured.err
    assert list(tmp_path.glob("big*")) == [] and list(tmp_path.glob(".big*")) == []


def test_a_small_memory_limit_bounds_the_query_not_the_schema_check(plain, capsys):
    """`--memory` limits the user's query; the schema check that guards it runs before the limit (under 1MB it
    failed with DuckDB's out-of-memory traceback, and under 10MB it did so on a loaded machine)."""
    capsys.readouterr()
    assert main(["--db", str(plain), "sql", "SELECT count(*) AS n FROM predictions", "--memory", "1MB"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.splitlines()[0].strip() == "n", captured


def test_sql_output_streams_csv_and_parquet(plain, tmp_path):
    import pyarrow.parquet as pq

    query = "SELECT i, i / 4 AS q FROM range(25000) t(i) ORDER BY i"
    assert main(["--db", str(plain), "sql", query, "--format", "csv", "--output", str(tmp_path / "r.csv")]) == 0
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "i,q" and lines[2] == "1,0.25" and len(lines) == 25001
    assert main(["--db", str(plain), "sql", query, "--format", "parquet", "--output", str(tmp_path / "r.pq")]) == 0
    table = pq.read_table(tmp_path / "r.pq")
    assert table.num_rows == 25000 and table.column("q").to_pylist()[-1] == 24999 / 4


def _head(db: Path) -> str:
    with store.read_only(db) as con:
        return store.head_line(con)


def test_a_published_head_catches_both_files_rolled_back_or_rewritten(plain, tmp_path, capsys):
    """Case 6: the ledger and its receipts rolled back together, or rewritten together, audit clean against each
    other; a head published before catches both (SEQ:HASH, or the line `ifledger head` printed, in a file)."""
    import shutil

    from store.chain import chain_legacy_rows

    receipts = Path(f"{plain}.receipts")
    shutil.copy(plain, tmp_path / "old.duckdb")
    shutil.copy(receipts, tmp_path / "old.receipts")
    with store.connect(plain) as con:
        store.register_predictions(con, [PredictionRecord("h0", "exact", {}, s.set_id, "m0", 1.0) for s in SETS], "t")
    published = _head(plain)
    seq, digest = re.search(r"seq (\d+) sha256 (\w+)", published).groups()
    (tmp_path / "heads.txt").write_text(f"# heads we published\n{published}\n")
    assert _audit(plain, "--head", f"{seq}:{digest}") == (0, "")

    shutil.copy(tmp_path / "old.duckdb", plain)  # both files rolled back
    shutil.copy(tmp_path / "old.receipts", receipts)
    assert _audit(plain) == (0, "")
    code, err = _audit(plain, "--heads", str(tmp_path / "heads.txt"))
    assert code == 1 and f"seq {seq} is not in the chain" in err and "rolled back" in err, err

    with store.connect(plain) as con:  # both files rewritten: the predictions registered afresh, other values
        store.register_predictions(con, [PredictionRecord("h0", "exact", {}, s.set_id, "m0", 2.0) for s in SETS], "t")
    with duckdb.connect(str(plain)) as con:
        con.execute("DELETE FROM chain")
        chain_legacy_rows(con)
        receipts.write_text(store.head_line(con) + "\n")
    assert _audit(plain) == (0, "")
    code, err = _audit(plain, "--head", f"{seq}:{digest}")
    assert code == 1 and f"chain seq {seq} has another hash than the one published" in err, err

    capsys.readouterr()
    assert main(["--db", str(plain), "audit", "--head", "42"]) == 2
    assert "give SEQ:HASH" in capsys.readouterr().err
