"""The seed claim on a reduced digits-mlp, through the real flows: influence tracks PBRF, not retraining."""

from __future__ import annotations

import csv
import io

import duckdb
import pytest
from conftest import small_digits

from flows.cli import main
from reports.render import report_folder

SMALL = small_digits("digits-small")


@pytest.fixture(scope="module")
def digits(prefect_harness, tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    (folder / "small.py").write_text(SMALL)
    db = folder / "l.duckdb"
    assert main(["--db", str(db), "run", f"{folder / 'small.py'}:SmallDigits", "--methods", "exact",
                 "--sets", "single:n=40", "--report-dir", str(folder / "reports")]) == 0
    con = duckdb.connect(str(db), read_only=True)
    cols = ["regime", "n", "pearson", "spearman", "pearson_by_measurement", "noise_ceiling"]
    rows = con.execute(f"SELECT {', '.join(cols)} FROM calibration WHERE method = 'exact'").fetchall()
    unconverged = con.execute("SELECT count(*) FILTER (WHERE NOT converged) FROM runs WHERE regime = 'pbrf'").fetchone()
    con.close()
    return {r[0]: dict(zip(cols, r)) for r in rows}, unconverged[0], folder


def test_exact_influence_tracks_pbrf(digits):
    by_regime, unconverged, _ = digits
    pbrf = by_regime["pbrf"]
    assert pbrf["n"] == 40 * 10
    assert pbrf["pearson"] >= 0.9
    assert pbrf["spearman"] >= 0.9
    assert unconverged <= 2  # the PBRF solver reports convergence; nearly all single removals converge


def test_exact_influence_tracks_retraining_far_less(digits):
    by_regime = digits[0]
    for regime in ("scratch", "warm"):
        assert by_regime[regime]["spearman"] < by_regime["pbrf"]["spearman"] - 0.3, by_regime
    assert by_regime["scratch"]["noise_ceiling"] is not None  # read every correlation against the seeds' ceiling


def test_report_shows_every_regime_with_its_ceiling(digits):
    report = (report_folder(digits[2] / "l.duckdb", "digits-small", digits[2] / "reports") / "report.md").read_text()
    for regime in ("scratch", "warm", "pbrf"):
        assert f"| exact | {regime} | single | 400 |" in report
    assert "noise_ceiling" in report
    assert "`pbrf` run has converged when" in report  # what non-convergence means
    assert "n_converged" in report


def test_converged_only_scores_and_reports_the_converged_pbrf_runs_alone(digits, capsys):
    db, folder = str(digits[2] / "l.duckdb"), digits[2]
    assert main(["--db", db, "calibrate", "--converged-only", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    pbrf = next(r for r in rows if r["regime"] == "pbrf" and r["method"] == "exact")
    assert int(pbrf["n_runs"]) - int(pbrf["n_converged"]) == digits[1]  # the runs it left out, stated on the row
    with duckdb.connect(db, read_only=True) as con:
        (expected,) = con.execute("SELECT count(*) FROM prediction_accuracy_of(true) WHERE regime = 'pbrf' "
                                  "AND method = 'exact' AND NOT post_hoc").fetchone()
    assert int(pbrf["n"]) == expected and pbrf["pearson_lo"]  # its own intervals
    assert main(["--db", db, "report", "--converged-only", "--report-dir", str(folder / "reports")]) == 0
    report = report_folder(db, "digits-small", folder / "reports") / "converged-only" / "report.md"
    assert "scored against converged runs only" in report.read_text()
