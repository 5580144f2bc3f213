"""The command line end to end (through the real Prefect flows), and its refusals of bad input."""

from __future__ import annotations

import csv
import io
import re

import duckdb
import matplotlib.pyplot as plt
import pytest
from conftest import file_digest

from flows.cli import main
from reports.render import report_folder


def _sql(db, query):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


COUNTS = ("SELECT (SELECT count(*) FROM predictions), (SELECT count(*) FROM runs), (SELECT count(*) FROM outcomes), "
          "(SELECT count(*) FROM removal_sets), (SELECT max(finished_at) FROM runs)")


def test_run_linreg_is_calibrated_against_leave_one_out(linreg_ledger):
    rows = _sql(linreg_ledger["db"], "SELECT n, pearson, slope, noise_ceiling FROM calibration "
                                     "WHERE study = 'linreg' AND method = 'exact' AND regime = 'scratch' "
                                     "AND set_kind = 'single'")
    n, pearson, slope, _ = rows[0]
    assert n == 100 * 100  # 100 single removals x 100 query measurements
    assert pearson >= 0.99
    assert 0.9 <= slope <= 1.1
    report = report_folder(linreg_ledger["db"], "linreg", linreg_ledger["reports"]) / "report.md"
    assert "| exact | scratch | single |" in report.read_text()
    height, width, _ = plt.imread(report.parent / "calibration.png").shape
    assert width < 1000 and height < 1000  # one method, one regime: one compact panel


def test_counts_agree_between_run_status_and_the_report(linreg_ledger, capsys):
    """`run` says how many full-data models it trained and how many models it retrained; together they are every
    finished run of the ledger, which `status` and the report's Runs table count too."""
    db, out = linreg_ledger["db"], linreg_ledger["out"]
    full = int(re.search(r"from (\d+) full-data models", out)[1])
    retrained = int(re.search(r"retrained (\d+) models: (\d+) done, 0 failed", out)[1])
    ((finished,),) = _sql(db, "SELECT count(*) FROM runs WHERE status IN ('done', 'failed')")
    assert full + retrained == finished
    assert main(["--db", str(db), "status", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sum(int(r["done"]) + int(r["failed"]) for r in rows) == finished
    report = (report_folder(db, "linreg", linreg_ledger["reports"]) / "report.md").read_text()
    table = report.split("## Runs")[1].split("\n\n")[1].splitlines()[2:]
    assert sum(int(line.split("|")[4]) for line in table) == finished


def test_report_is_rerendered_from_the_ledger_and_keyed_by_it(linreg_ledger, tmp_path, capsys):
    copy = tmp_path / "second.duckdb"
    copy.write_bytes(linreg_ledger["db"].read_bytes())
    for db in (linreg_ledger["db"], copy):
        assert main(["--db", str(db), "report", "--report-dir", str(tmp_path)]) == 0
    first, second = (report_folder(db, "linreg", tmp_path) / "report.md" for db in (linreg_ledger["db"], copy))
    assert first.parent != second.parent and first.exists() and second.exists()
    assert str(copy.resolve()) in second.read_text() and str(copy.resolve()) not in first.read_text()
    assert main(["--db", str(copy), "report", "nope"]) == 2


def test_rerun_adds_nothing_and_retrains_nothing(linreg_ledger, capsys):
    db = linreg_ledger["db"]
    before = _sql(db, COUNTS)
    assert main(["--db", str(db), "run", "linreg", "--report-dir", str(linreg_ledger["reports"])]) == 0
    assert "registered 0 new predictions" in capsys.readouterr().out
    assert _sql(db, COUNTS) == before
    assert main(["--db", str(db), "verify"]) == 0
    assert _sql(db, COUNTS) == before


def test_two_configs_of_one_method_are_two_methods(prefect_harness, tmp_path, capsys):
    db = tmp_path / "configs.duckdb"
    assert main(["--db", str(db), "register", "linreg", "--sets", "single:n=5",
                 "--methods", "exact", "exact:damping=10", "exact:damping=0"]) == 0  # the last is the default
    assert "by exact, exact:damping=10," in capsys.readouterr().out
    rows = _sql(db, "SELECT method, count(DISTINCT config_hash), count(*) FROM predictions GROUP BY 1 ORDER BY 1")
    assert rows == [("exact", 1, 5 * 100), ("exact:damping=10", 1, 5 * 100)]
    plain, damped = (dict(_sql(db, "SELECT set_id || measurement_id, predicted FROM predictions "
                                   f"WHERE method = '{m}'")) for m in ("exact", "exact:damping=10"))
    shrink = sum(abs(v) for v in damped.values()) / sum(abs(v) for v in plain.values())
    assert shrink < 0.5, shrink  # heavier damping shrinks the influences: each config was scored with its own


def test_top_k_sets_keep_a_ranking_method_whose_label_has_options(prefect_harness, tmp_path):
    db = tmp_path / "ranked.duckdb"
    method = "exact:damping=10"
    assert main(["--db", str(db), "run", "linreg", "--methods", method, "--sets",
                 f"top_k:k=3,direction=positive,method={method}", "--report-dir", str(tmp_path / "r")]) == 0
    ranked = _sql(db, "SELECT DISTINCT s.ranked_by, s.direction, s.target IN (SELECT measurement_id FROM measurements)"
                      " FROM removal_sets s WHERE kind = 'top_k'")
    assert ranked == [(method, "positive", True)]
    (moved,) = _sql(db, f"SELECT moved FROM top_k_effects WHERE ranked_by = '{method}'")[0]
    assert moved > 0  # removing the points most supporting a query example raises its loss


def test_audit_passes_then_names_an_altered_prediction(linreg_ledger, tmp_path, capsys):
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(linreg_ledger["db"].read_bytes())
    receipts = linreg_ledger["db"].parent / "ledger.duckdb.receipts"
    (tmp_path / "copy.duckdb.receipts").write_bytes(receipts.read_bytes())
    assert main(["--db", str(copy), "audit"]) == 0
    con = duckdb.connect(str(copy))
    con.execute("UPDATE predictions SET predicted = -predicted WHERE seq = 42")
    con.close()
    capsys.readouterr()
    assert main(["--db", str(copy), "audit"]) == 1
    err = capsys.readouterr().err
    assert "ALTERED predictions" in err and "predicted" in err


def test_sql_reads_and_formats(linreg_ledger, capsys):
    db = str(linreg_ledger["db"])
    assert main(["--db", db, "sql", "SELECT method, regime FROM calibration", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["method,regime", "exact,scratch"]
    assert main(["--db", db, "calibrate", "--format", "json"]) == 0
    assert '"pearson"' in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["run", "no-such-study"], "unknown study"),
    (["register", "linreg", "--methods", "magic"], "unknown method"),
    (["register", "linreg", "--methods", "exact:damping=lots"], "needs a number"),
    (["register", "linreg", "--sets", "user:path={sets_out_of_range}"], "out of range"),
    (["register", "linreg", "--sets", "user:path={sets_duplicate}"], "appears twice"),
    (["register", "linreg", "--sets", "single:n=0"], "between 1"),
    (["register", "linreg", "--sets", "bogus:k=1"], "unknown removal-set kind"),
    (["run", "linreg", "--regimes", "sideways"], "unknown regime"),
    (["sql", "SELEC 1"], "malformed SQL"),
    (["sql", "DELETE FROM runs"], "only reads"),
    (["sql", "SELECT * FROM read_csv('/etc/passwd')"], "reads the ledger only"),
    (["verify", "no-such-study"], "nothing registered"),
])
def test_bad_input_exits_2_with_one_line_and_leaves_the_ledger_unchanged(
        linreg_ledger, tmp_path, capsys, argv, message):
    (tmp_path / "range.txt").write_text("1 2 3\n4 99999\n")
    (tmp_path / "dup.txt").write_text("5 5\n")
    argv = [a.format(sets_out_of_range=tmp_path / "range.txt", sets_duplicate=tmp_path / "dup.txt") for a in argv]
    db = linreg_ledger["db"]
    before = file_digest(db)
    capsys.readouterr()
    assert main(["--db", str(db), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert file_digest(db) == before


def test_bad_db_paths_exit_2_and_create_nothing(prefect_harness, tmp_path, capsys):  # register starts a flow
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello")
    assert main(["--db", str(bogus), "sql", "SELECT 1"]) == 2
    assert "not a DuckDB ledger" in capsys.readouterr().err
    assert main(["--db", str(bogus), "register", "linreg", "--sets", "single:n=2"]) == 2
    assert bogus.read_text() == "hello"
    missing = tmp_path / "missing.duckdb"
    assert main(["--db", str(missing), "run", "nope"]) == 2
    assert main(["--db", str(missing), "audit"]) == 2
    assert not missing.exists()


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "ifledger run linreg" in out and "effect = measurement(without the set)" in out
