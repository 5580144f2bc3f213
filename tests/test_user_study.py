"""The README's user-study example, run exactly as a user would run it."""

from __future__ import annotations

import duckdb
import pytest
from conftest import readme_block

from flows.cli import main
from retrain import load_study
from store.records import InputError


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


LINEAR = '''
import torch
from datasets import Dataset, DatasetDict
from torch import nn

from retrain import Recipe, Study


class Line(Study):
    name = "line"
    recipe = Recipe(optimizer="newton", epochs=1, weight_decay=1e-2, damping=0.0, seeds=1)

    def dataset(self):
        x = torch.linspace(-1, 1, 12)[:, None]
        split = lambda a: Dataset.from_dict({"x": a.tolist(), "y": (2 * a[:, 0]).tolist()})
        return DatasetDict(train=split(x), query=split(x[:3]))

    def model(self):
        return nn.Linear(1, 1)
'''
LOSS = '''
    def loss(self, outputs, targets):
        return 0.5 * (outputs.squeeze(-1) - targets) ** 2
'''


def _write(path, text):
    path.write_text(text)
    return f"{path}:Line"


def test_a_study_without_loss_is_refused_at_load_with_one_line(tmp_path, capsys):
    spec = _write(tmp_path / "line.py", LINEAR)
    assert main(["--db", str(tmp_path / "l.duckdb"), "register", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"ifledger: error: {tmp_path / 'line.py'}:Line must define loss (abstract in Study)"]
    assert not (tmp_path / "l.duckdb").exists()


def test_the_study_hash_covers_the_studys_code(tmp_path):
    base = load_study(_write(tmp_path / "a.py", LINEAR + LOSS))
    comment = "# squared error\n        return"
    commented = load_study(_write(tmp_path / "a.py", LINEAR + LOSS.replace("return", comment)))
    doubled = load_study(_write(tmp_path / "a.py", LINEAR + LOSS.replace("0.5 *", "1.25 *")))
    assert base.config()["data_sha256"] == doubled.config()["data_sha256"]  # same data, model and recipe
    assert base.study_hash == commented.study_hash  # a comment is not code
    assert base.study_hash != doubled.study_hash  # a new loss is a new study


def test_measurements_are_matched_by_id_not_by_position(tmp_path):
    study = load_study(_write(tmp_path / "b.py", LINEAR + LOSS))
    theta = study.init_params(0)
    values = study.measure(study.forward(theta))
    forward = study.forward(theta)
    study.measure = lambda f: dict(reversed(list(values.items())))  # the same values, the other order
    assert study.measurement_vector(forward).tolist() == [values[i].item() for i in study.measurements()]
    study.measure = lambda f: {"query_loss/0": values["query_loss/0"]}
    with pytest.raises(InputError, match=r"missing \['query_loss/1', 'query_loss/2'\]"):
        study.measurement_vector(forward)
