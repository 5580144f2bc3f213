"""The README's user-study example, run exactly as a user would run it."""

from __future__ import annotations

import duckdb
from conftest import readme_block

from flows.cli import main


def test_readme_example_study_runs_end_to_end(prefect_harness, tmp_path, capsys):
    (tmp_path / "cancer_study.py").write_text(readme_block("example-study"))
    db = tmp_path / "l.duckdb"
    spec = f"{tmp_path / 'cancer_study.py'}:CancerLogReg"
    assert main(["--db", str(db), "run", spec, "--sets", "single:n=30", "--report-dir", str(tmp_path / "r")]) == 0
    assert "cancer-logreg" in capsys.readouterr().out
    con = duckdb.connect(str(db), read_only=True)
    pearson, n = con.execute("SELECT pearson, n FROM calibration WHERE study = 'cancer-logreg'").fetchone()
    source = con.execute("SELECT source FROM studies").fetchone()[0]
    con.close()
    assert n == 30 * 169
    assert pearson > 0.95  # a convex model: influence should match leave-one-out closely
    assert source.endswith("cancer_study.py:CancerLogReg")


def test_a_study_file_without_the_class_is_refused(tmp_path, capsys):
    (tmp_path / "s.py").write_text("x = 1\n")
    assert main(["--db", str(tmp_path / "l.duckdb"), "register", f"{tmp_path / 's.py'}:Nope"]) == 2
    assert "no Study subclass named 'Nope'" in capsys.readouterr().err
    assert main(["--db", str(tmp_path / "l.duckdb"), "register", f"{tmp_path / 'missing.py'}:Nope"]) == 2
    assert not (tmp_path / "l.duckdb").exists()
