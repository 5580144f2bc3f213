"""Tampering with a ledger directly (Python's duckdb on the file), the way an attacker or a careless user would:
every change to what decides a verdict is caught by `ifledger audit` (exit 1, naming what changed), and
`post_hoc` cannot be faked through the clock."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import duckdb
import pytest

import store
from flows.cli import main
from store.chain import append, chain_legacy_rows
from store.connection import schema_sql


def _copy(ledger: dict, tmp_path) -> str:
    db = tmp_path / "copy.duckdb"
    shutil.copy(ledger["db"], db)
    shutil.copy(f"{ledger['db']}.receipts", f"{db}.receipts")
    return str(db)


def _forge_prediction(con) -> None:
    """A prediction appended with the project's own functions: its row, and its chain entry."""
    record = store.PredictionRecord(*con.execute(
        "SELECT study_hash, 'exact', {'damping': 1}, set_id, measurement_id, 0.5 FROM predictions LIMIT 1").fetchone())
    (seq,) = con.execute("SELECT max(seq) + 1 FROM predictions").fetchone()
    con.execute("INSERT INTO predictions VALUES (?, ?, ?, 'exact', 'x', '{\"damping\": 1}', ?, ?, 0.5, 'forged', "
                "now(), '', '', NULL)", [seq, store.prediction_id(record), record.study_hash, record.set_id,
                                   record.measurement_id])
    append(con, "predictions", [store.prediction_id(record)])


def _rewrite_consistently(con) -> None:
    """Every prediction set to its actual effect, registered 30 days earlier; then the whole chain recomputed."""
    con.execute("UPDATE predictions p SET predicted = a.actual, registered_at = p.registered_at - INTERVAL 30 DAY "
                "FROM prediction_accuracy a WHERE a.seq = p.seq AND a.regime = 'scratch'")
    con.execute("DELETE FROM chain")
    chain_legacy_rows(con)


def _override_predictions(con) -> None:
    """Every prediction set to its actual effect, and re-chained with ifledger's own `append` (an override entry)."""
    con.execute("UPDATE predictions p SET predicted = a.actual FROM prediction_accuracy a WHERE a.seq = p.seq "
                "AND a.regime = 'scratch'")
    append(con, "predictions", [k for (k,) in con.execute("SELECT prediction_id FROM predictions").fetchall()])


def _shadow_t975(con) -> None:
    """t975 replaced in the main schema, the shipped definition kept in another schema."""
    shipped = re.search(r"CREATE OR REPLACE MACRO t975\(df\) AS.*?;", schema_sql(), re.S).group(0)
    con.execute("CREATE SCHEMA shadow")
    con.execute(shipped.replace("MACRO t975", "MACRO shadow.t975"))
    con.execute("CREATE OR REPLACE MACRO t975(df) AS 0.0")


FULL = "(SELECT set_id FROM removal_sets WHERE kind = 'full')"
TAMPERS = {
    "delete the last prediction": ("DELETE FROM predictions WHERE seq = (SELECT max(seq) FROM predictions)",
                                   "predictions"),
    "delete the last 5,000 predictions": ("DELETE FROM predictions WHERE seq > (SELECT max(seq) - 5000 FROM "
                                          "predictions)", "predictions"),
    "delete every prediction": ("DELETE FROM predictions", "predictions"),
    "delete the last prediction and its chain entry": (
        "DELETE FROM predictions WHERE seq = (SELECT max(seq) FROM predictions); DELETE FROM chain WHERE seq = "
        "(SELECT max(seq) FROM chain WHERE entry = 'predictions')", "chain"),
    "delete the chain's tail and its rows": (
        "DELETE FROM outcomes WHERE run_id IN (SELECT key FROM chain WHERE seq > (SELECT max(seq) - 3 FROM chain)); "
        "DELETE FROM runs WHERE run_id IN (SELECT key FROM chain WHERE seq > (SELECT max(seq) - 3 FROM chain)); "
        "DELETE FROM chain WHERE seq > (SELECT max(seq) - 3 FROM chain)", "receipts"),
    "append a forged prediction hashed with ifledger's own function": (_forge_prediction, "receipts"),
    "rewrite the whole chain consistently": (_rewrite_consistently, "receipts"),
    "change a prediction": ("UPDATE predictions SET predicted = -predicted WHERE seq = 42", "predicted"),
    "move a prediction's chain entry": ("UPDATE chain SET seq = -seq WHERE seq = (SELECT min(seq) FROM chain WHERE "
                                        "entry = 'predictions')", "chain"),
    "change an outcome": ("UPDATE outcomes SET value = value + 1 WHERE rowid = 7", "outcomes"),
    "delete an outcome": ("DELETE FROM outcomes WHERE rowid = 7", "outcomes"),
    "set outcomes to baseline + prediction": (
        "UPDATE outcomes o SET value = b.value + p.predicted FROM runs r, predictions p, runs rb, outcomes b "
        f"WHERE o.run_id = r.run_id AND p.set_id = r.set_id AND p.measurement_id = o.measurement_id "
        f"AND rb.set_id = {FULL} AND rb.seed = r.seed AND rb.regime = r.regime AND b.run_id = rb.run_id "
        "AND b.measurement_id = o.measurement_id", "outcomes"),
    "change a run's status": ("UPDATE runs SET status = 'failed', reason = 'x' WHERE rowid = 5", "status"),
    "mark a done run as running": ("UPDATE runs SET status = 'running' WHERE rowid = 5", "status"),
    "change a run's seed": ("UPDATE runs SET seed = seed + 7 WHERE rowid = 5", "seed"),
    "delete a run": ("DELETE FROM runs WHERE rowid = 5", "deleted"),
    "change a study's config": ("UPDATE studies SET config = json_object('forged', 1)", "config"),
    "change the measurement ids": ("UPDATE measurements SET measurement_id = measurement_id || 'x'",
                                   "measurements"),
    "change a removal set's kind": ("UPDATE removal_sets SET kind = 'random' WHERE rowid = 3", "kind"),
    "change a removal set's label": ("UPDATE removal_sets SET label = 'forged' WHERE rowid = 3", "label"),
    "change a removal set's indices": ("UPDATE removal_sets SET indices = [1, 2] WHERE rowid = 3", "indices"),
    "delete a cached model": ("DELETE FROM models WHERE seed = 0", "models"),
    "replace a cached model": ("UPDATE models SET params = params || '\\x00'::BLOB WHERE seed = 0", "params_sha256"),
    "a duplicate status key first in every run's entry": (
        "UPDATE chain SET content = '{\"status\": \"x\", ' || content[2:] WHERE entry = 'runs'", "duplicate JSON key"),
    "a duplicate recipe key first in the study's config": (
        "UPDATE studies SET config = '{\"recipe\": {\"seeds\": 1}, ' || config[2:]", "config"),
    "predictions set to the outcomes and re-chained": (_override_predictions, "re-chained"),
    "a forged t975 behind a shipped copy": (_shadow_t975, "macro t975 differs"),
    "outcomes rebuilt without their primary key, doubled": (
        "CREATE TABLE o AS SELECT * FROM outcomes; INSERT INTO o SELECT * FROM outcomes; DROP TABLE outcomes; "
        "ALTER TABLE o RENAME TO outcomes", "table outcomes differs"),
    "replace the calibration view": (
        "CREATE OR REPLACE VIEW calibration AS SELECT * REPLACE (0.999999 AS pearson) "
        "FROM calibration_with_intervals(false)", "view calibration"),
}


def test_an_untouched_ledger_audits_clean_and_head_matches_the_receipts(linreg_ledger, tmp_path, capsys):
    db = _copy(linreg_ledger, tmp_path)
    capsys.readouterr()
    assert main(["--db", db, "audit"]) == 0
    assert "audit ok" in capsys.readouterr().out
    assert main(["--db", db, "head"]) == 0
    head = capsys.readouterr().out.strip()
    last = Path(f"{db}.receipts").read_text().splitlines()[-1]
    assert head.split(" at ")[0] == last.split(" at ")[0]  # seq and hash, as the last writing command left them


@pytest.mark.parametrize("name", TAMPERS)
def test_audit_catches_every_tamper(linreg_ledger, tmp_path, capsys, name):
    db = _copy(linreg_ledger, tmp_path)
    change, named = TAMPERS[name]
    con = duckdb.connect(db)
    try:
        change(con) if callable(change) else con.execute(change)
    finally:
        con.close()
    capsys.readouterr()
    assert main(["--db", db, "audit"]) == 1, name
    err = capsys.readouterr().err
    assert "ALTERED" in err and named in err, err[:2000]


def test_override_entries_are_not_covered_by_the_next_write(linreg_ledger, tmp_path, capsys):
    """Case 2 of the second campaign: rows edited and re-chained, then a rerun of `register`: it refuses to write
    (so no receipt covers the override entries) and audit names them."""
    db = _copy(linreg_ledger, tmp_path)
    with duckdb.connect(db) as con:
        _override_predictions(con)
    capsys.readouterr()
    assert main(["--db", db, "register", "linreg"]) == 2
    assert "does not audit clean" in capsys.readouterr().err
    assert main(["--db", db, "audit"]) == 1
    err = capsys.readouterr().err
    assert "a prediction never changes after registration" in err and "not covered by any receipt" in err, err[:2000]


def test_audit_without_the_receipts_says_so(linreg_ledger, tmp_path, capsys):
    db = tmp_path / "copy.duckdb"
    shutil.copy(linreg_ledger["db"], db)
    assert main(["--db", str(db), "audit"]) == 1
    assert "receipts: none at" in capsys.readouterr().err
    assert main(["--db", str(db), "--receipts", f"{linreg_ledger['db']}.receipts", "audit"]) == 0
    assert store.RECEIPTS_VARIABLE not in os.environ  # --receipts held for that command only, not for later ones


def test_post_hoc_follows_the_chain_not_the_clock(linreg_ledger, tmp_path, capsys):
    """Oracle predictions imported after the outcomes are post hoc; moving every timestamp does not change it."""
    db = _copy(linreg_ledger, tmp_path)
    con = duckdb.connect(db, read_only=True)
    rows = con.execute("SELECT measurement_id, predicted, actual, set_id FROM prediction_accuracy "
                       "WHERE regime = 'scratch' AND method = 'exact' ORDER BY seq LIMIT 200").fetchall()
    con.close()
    oracle = tmp_path / "oracle.csv"
    oracle.write_text("set_id,measurement_id,predicted\n" + "".join(f"{s},{m},{a!r}\n" for m, _, a, s in rows))
    assert main(["--db", db, "import-predictions", str(oracle), "--study", "linreg", "--method", "oracle"]) == 0
    con = duckdb.connect(db)
    try:
        con.execute("UPDATE runs SET finished_at = now() + INTERVAL 1 HOUR")
        con.execute("UPDATE predictions SET registered_at = registered_at - INTERVAL 30 DAY WHERE method LIKE 'imp%'")
        con.execute("UPDATE chain SET recorded_at = recorded_at - INTERVAL 30 DAY")
        (post_hoc, n) = con.execute("SELECT bool_and(post_hoc), count(*) FROM prediction_accuracy "
                                    "WHERE method = 'imported:oracle'").fetchone()
        (scored,) = con.execute("SELECT count(*) FROM calibration WHERE method = 'imported:oracle'").fetchone()
    finally:
        con.close()
    assert n == 200 and post_hoc and scored == 0
    capsys.readouterr()
    assert main(["--db", db, "audit"]) == 0  # timestamps are information only: the chain is intact


def test_a_truncated_ledger_is_one_line_and_exit_2(linreg_ledger, tmp_path, capsys):
    db = _copy(linreg_ledger, tmp_path)
    with open(db, "r+b") as f:
        f.truncate(Path(db).stat().st_size // 2)
    capsys.readouterr()
    assert main(["--db", db, "audit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("truncated" in err or "not a DuckDB ledger" in err), err
