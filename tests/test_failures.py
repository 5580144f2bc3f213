"""Diverged runs are recorded as failed with their reason, counted in the report, and the flow goes on."""

from __future__ import annotations

import duckdb

from flows.cli import main
from reports.render import report_folder

FRAGILE = '''
import numpy as np
from datasets import Dataset, DatasetDict
from torch import nn

from retrain import Recipe, Study


class Fragile(Study):
    """Regression MLP with one extreme example: harmless among many, explosive when most data is removed."""

    name = "fragile"
    recipe = Recipe(optimizer="sgd", epochs=10, lr=0.01, momentum=0.9, batch_size=32, weight_decay=1e-3, seeds=1)

    def dataset(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(96, 4))
        y = x[:, 0].copy()
        x[0] = 50.0
        split = lambda a, b: Dataset.from_dict({"x": a.tolist(), "y": b.tolist()})
        return DatasetDict(train=split(x, y), query=split(x[:8], y[:8]))

    def model(self):
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def loss(self, outputs, targets):
        return (outputs.squeeze(-1) - targets) ** 2
'''


def test_a_diverged_run_is_failed_with_its_reason_and_the_flow_goes_on(prefect_harness, tmp_path, capsys):
    (tmp_path / "fragile.py").write_text(FRAGILE)
    (tmp_path / "sets.txt").write_text(" ".join(str(i) for i in range(1, 60)) + "\n1\n")
    db, reports = tmp_path / "l.duckdb", tmp_path / "reports"
    argv = ["--db", str(db), "run", f"{tmp_path / 'fragile.py'}:Fragile", "--methods", "exact",
            "--sets", f"user:path={tmp_path / 'sets.txt'}", "--report-dir", str(reports)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 failed" in out and "diverged: non-finite parameters" in out
    con = duckdb.connect(str(db), read_only=True)
    runs = con.execute("SELECT s.size, r.status, r.reason, (SELECT count(*) FROM outcomes o WHERE o.run_id = r.run_id)"
                       " FROM runs r JOIN removal_sets s USING (set_id) WHERE s.kind = 'user' ORDER BY ALL").fetchall()
    n = con.execute("SELECT n FROM calibration").fetchone()[0]
    con.close()
    assert [(size, status) for size, status, _, _ in runs] == [(1, "done"), (59, "failed")]
    assert all(reason.startswith("diverged") for _, status, reason, _ in runs if status == "failed")
    assert [outcomes for _, status, _, outcomes in runs if status == "failed"] == [0]  # no half-written outcomes
    assert n == 8  # the surviving set's 8 measurements are still scored
    report = (report_folder(db, "fragile", reports) / "report.md").read_text()
    assert "| removal sets | scratch | failed | 1 |" in report and "diverged" in report
    # a rerun does not retry deterministic failures; --retry-failed does (and it fails the same way)
    assert main(argv) == 0
    assert "retrained 0 models" in capsys.readouterr().out
    assert main(["--db", str(db), "verify", "--retry-failed"]) == 0
    assert "retrained 1 models: 0 done, 1 failed" in capsys.readouterr().out


def test_every_full_model_diverging_is_a_clear_error(prefect_harness, tmp_path, capsys):
    (tmp_path / "fragile.py").write_text(FRAGILE.replace("lr=0.01", "lr=0.05"))
    db = tmp_path / "l.duckdb"
    assert main(["--db", str(db), "register", f"{tmp_path / 'fragile.py'}:Fragile", "--sets", "single:n=3"]) == 2
    err = capsys.readouterr().err
    assert "every full-data model of fragile failed (diverged" in err
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM runs WHERE status = 'failed'").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM predictions").fetchone()[0] == 0
    con.close()
