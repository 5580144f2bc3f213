"""Everyday commands on a small ledger built without training: fast read-only commands (no torch, no Prefect),
--version, help text on every command and argument, a closed pipe, exports, and `status`'s ETA."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import store
from flows.cli import main, parser
from store import PredictionRecord, RemovalSetRecord, RunRecord, StudyRecord

HANG = 120  # a guard against hangs, not a speed limit
STUDY = StudyRecord("toy", "h0", "toy", {"recipe": {"seeds": 2, "epochs": 10, "warm_epochs": 5}}, n_train=10,
                    n_params=3, measurements={"m": ""}, default_regimes=("scratch", "warm"))


@pytest.fixture
def ledger(tmp_path):
    sets = [RemovalSetRecord("h0", "single", f"single:{i}", (i,)) for i in range(4)]
    db = tmp_path / "l.duckdb"
    with store.connect(db) as con:
        store.register_study(con, STUDY)
        store.register_removal_sets(con, sets)
        store.register_predictions(con, [PredictionRecord("h0", "exact", {}, s.set_id, "m", 0.1 * i)
                                         for i, s in enumerate(sets)], "test")
    return db


def _ifledger(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


PROBE = """
import sys
from flows.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("LOADED", *sorted(m for m in ("torch", "prefect", "matplotlib") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["status"], ["studies"], ["sql", "SELECT count(*) FROM calibration"],
                                  ["audit"], ["status", "--help"]])
def test_read_only_commands_import_neither_torch_nor_prefect(ledger, argv):
    done = subprocess.run([sys.executable, "-c", PROBE, "--db", str(ledger), *argv], capture_output=True, text=True,
                          timeout=HANG)
    assert done.stdout.strip().splitlines()[-1] == "LOADED", (done.stdout[-500:], done.stderr[-2000:])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "ifledger 0.1.0"


def test_every_command_and_argument_has_help():
    missing = []
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        if not sub.description:
            missing.append(f"{name} (description)")
        missing += [f"{name} {a.dest}" for a in sub._actions if not a.help]
    missing += [f"ifledger {a.dest}" for a in parser()._actions if not a.help]
    assert not missing, missing


def test_studies_prints_whole_docstrings(ledger, capsys):
    assert main(["--db", str(ledger), "studies"]) == 0
    out = capsys.readouterr().out
    assert "one step is exact for a quadratic)." in out  # the last words of linreg's docstring
    assert "registered in" in out and "toy" in out


def test_a_closed_pipe_ends_quietly(ledger):
    reader = _ifledger("--db", str(ledger), "sql", "SELECT * FROM range(200000)")
    assert reader.stdout.readline().strip() == "range"
    reader.stdout.close()  # as `| head -1` does
    err = reader.stderr.read()
    assert reader.wait(timeout=HANG) == 141
    assert err == ""


def test_sql_exports_parquet_and_csv(ledger, tmp_path, capsys):
    query = "SELECT seq, method, predicted FROM predictions ORDER BY seq"
    out = tmp_path / "p.parquet"
    assert main(["--db", str(ledger), "sql", query, "--format", "parquet", "--output", str(out)]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["seq", "method", "predicted"]
    assert table.column("predicted").to_pylist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert main(["--db", str(ledger), "sql", query, "--format", "csv", "--output", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().splitlines()[:2] == ["seq,method,predicted", "1,exact,0.0"]
    capsys.readouterr()
    assert main(["--db", str(ledger), "sql", query, "--format", "parquet"]) == 2
    assert "add --output" in capsys.readouterr().err
    assert main(["--db", str(ledger), "sql", f"COPY predictions TO '{tmp_path / 'x.parquet'}'"]) == 2
    assert "--format parquet --output FILE" in capsys.readouterr().err  # COPY's refusal points to the export
    assert not (tmp_path / "x.parquet").exists()


def test_status_eta_comes_from_the_current_verifys_pace(ledger, capsys):
    """Eight models claimed at t0 and finished at t0 + 80 s by one verify: 10 s a model of wall-clock time, though
    each run's own `seconds` says 40 (two chunks in parallel); the other regime borrows the pace per epoch."""
    full = store.full_set_id("h0")
    with store.connect(ledger) as con:
        store.record_runs(con, [RunRecord("h0", full, s, "scratch", "done", outcomes={"m": 1.0}) for s in (0, 1)])
        jobs = store.pending_jobs(con, "h0", [0, 1], ["scratch"])
        assert len(jobs) == 8
        store.start_runs(con, "h0", jobs)
        store.record_runs(con, [RunRecord("h0", s, seed, r, "done", seconds=40.0, outcomes={"m": 1.0})
                                for s, seed, r in jobs])
        t0 = dt.datetime(2026, 1, 1)
        con.execute("UPDATE runs SET started_at = ?, finished_at = ? WHERE pid = ?",
                    [t0, t0 + dt.timedelta(seconds=80), os.getpid()])
    assert main(["--db", str(ledger), "status", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "study,study_hash,regime,pending,running,done,failed,seconds_per_model,eta"
    assert lines[1] == "toy,h0,scratch,0,0,10,0,10.0,0:00:00"  # the two full-data baselines count as jobs too
    assert lines[2] == "toy,h0,warm,10,0,0,0,5.0,~0:00:50"  # 5 of scratch's 10 epochs at 1 s an epoch, 10 jobs
