"""Models trained elsewhere: a study supplies a seed's full-data model as a plain PyTorch checkpoint; predictions
are computed on it, `warm` starts from it, `scratch` still retrains the baseline, and the ledger records how far
the recipe's model is from the checkpoint."""

from __future__ import annotations

import dataclasses

import duckdb
import pytest
import torch
from conftest import file_digest
from torch import nn

import store
from flows.cli import main
from predictions import parse_method
from reports.render import report_folder
from retrain import load_study, measure, train
from retrain.regimes import load_params
from retrain.study import params_sha256

STUDY = '''
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from torch import nn

from retrain import Recipe, Study


class Blobs(Study):
    name = "blobs-supplied"
    recipe = Recipe(epochs=4, batch_size=16, lr=0.1, seeds=2, warm_epochs=2)

    def dataset(self):
        rng = np.random.default_rng(0)
        split = lambda n: Dataset.from_dict({"x": rng.normal(size=(n, 5)).tolist(),
                                             "y": rng.integers(0, 3, n).tolist()})
        return DatasetDict(train=split(40), query=split(6))

    def model(self):
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")


class Supplied(Blobs):
    def supplied_model(self, seed):
        return Path(__file__).parent / f"seed{seed}.pt"
'''


def save_state_dict(study, theta: torch.Tensor, path) -> None:
    """What a user's training script does at its end: torch.save(model.state_dict(), path)."""
    model = study.model().to(theta.dtype)
    nn.utils.vector_to_parameters(theta, model.parameters())
    torch.save(model.state_dict(), path)


def torch_optim_model(study, lr: float) -> torch.Tensor:
    """Seed 1 trained by a plain loop with another learning rate than the recipe's: not reproducible by it."""
    x, y = study.tensors("train")
    model = study.model().to(x.dtype)
    nn.utils.vector_to_parameters(study.init_params(1), model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=study.recipe.weight_decay)
    for epoch in range(study.recipe.epochs):
        for idx in study.checked_order(1, epoch).split(16):
            opt.zero_grad()
            study.loss(model(x[idx]), y[idx]).mean().backward()
            opt.step()
    return nn.utils.parameters_to_vector(model.parameters()).detach()


def test_predictions_on_supplied_checkpoints_with_their_distance_to_the_recipe(prefect_harness, tmp_path):
    (tmp_path / "study.py").write_text(STUDY)
    plain = load_study(f"{tmp_path / 'study.py'}:Blobs")
    ones = torch.ones(1, plain.n_train, dtype=torch.bool)
    retrained = dict(enumerate(train(plain, ones.expand(2, -1), [0, 1]).params))  # as `register` trains them
    save_state_dict(plain, retrained[0], tmp_path / "seed0.pt")  # the recipe reproduces seed 0 ...
    save_state_dict(plain, torch_optim_model(plain, lr=0.03), tmp_path / "seed1.pt")  # ... and not seed 1

    db = str(tmp_path / "l.duckdb")
    spec = f"{tmp_path / 'study.py'}:Supplied"
    assert main(["--db", db, "register", spec, "--methods", "exact", "--sets", "single:n=5"]) == 0
    assert main(["--db", db, "verify", "--regimes", "scratch", "warm"]) == 0

    study = load_study(spec)
    supplied = study.supplied_params
    con = duckdb.connect(db, read_only=True)
    models = {s: (load_params(p), h, d, rel) for s, p, h, d, rel in con.execute(
        "SELECT seed, params, supplied_sha256, retrained_distance, retrained_relative_distance FROM models"
    ).fetchall()}
    baselines = dict(((s, r), v) for s, r, v in con.execute(
        "SELECT seed, regime, list(value ORDER BY measurement_id) FROM runs JOIN outcomes USING (run_id) "
        "WHERE set_id = (SELECT set_id FROM removal_sets WHERE kind = 'full') GROUP BY ALL").fetchall())
    predicted = con.execute("SELECT indices[1], measurement_id, predicted FROM predictions "
                            "JOIN removal_sets USING (set_id, study_hash)").fetchall()
    con.close()

    assert models[0][3] < 1e-12  # the recipe reproduces the checkpoint (bit for bit at the same thread count)
    assert models[1][2] > 0 and models[1][3] > 1e-3
    for s in (0, 1):
        assert torch.equal(models[s][0], supplied[s])  # θ* is the supplied model
        assert models[s][1] == params_sha256(supplied[s])
        # scratch retrains the baseline from the recipe; warm continues the supplied model
        warm = train(study, ones, [s], init=supplied[s][None], epochs=2, first_epoch=4).params
        for regime, theta in (("scratch", retrained[s][None]), ("warm", warm)):
            recorded = torch.tensor(baselines[s, regime], dtype=torch.float64)
            assert (recorded - measure(study, theta)[0]).abs().max() < 1e-12, regime
    scores = parse_method("exact", study).scores(study, torch.stack([supplied[0], supplied[1]]))
    ids = list(study.measurements())
    assert len(predicted) == 5 * len(ids)
    for j, m, value in predicted:  # predictions were computed on the supplied models
        assert abs(value - float(scores[ids.index(m), j])) < 1e-12


@pytest.mark.full  # the CLI may start its temporary Prefect server first
def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path, capsys):
    (tmp_path / "study.py").write_text(STUDY)
    torch.save(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).state_dict(), tmp_path / "seed0.pt")
    torch.save({}, tmp_path / "seed1.pt")
    db = tmp_path / "l.duckdb"
    assert main(["--db", str(db), "register", f"{tmp_path / 'study.py'}:Supplied"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "supplied model of seed 0" in err and "'2.weight' has shape (4, 8), the model's is (3, 8)" in err
    assert not db.exists()


def test_a_ledger_from_before_supplied_models_still_loads(tmp_path):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE models (study_hash VARCHAR NOT NULL, seed INTEGER NOT NULL, params BLOB NOT NULL, "
                "created_at TIMESTAMP NOT NULL, PRIMARY KEY (study_hash, seed))")  # the table as it was
    con.execute("INSERT INTO models VALUES ('s', 0, 'abc'::BLOB, now())")
    con.close()
    with store.connect(db) as con:
        assert store.load_models(con, "s") == {0: b"abc"}
        store.save_models(con, [store.ModelRecord("s", 1, b"def", "f" * 64, 0.5, 0.1)])
        rows = con.execute("SELECT seed, supplied_sha256, retrained_distance FROM models ORDER BY seed").fetchall()
    assert rows == [(0, None, None), (1, "f" * 64, 0.5)]


def test_a_seed_whose_recipe_diverges_keeps_its_supplied_model(prefect_harness, tmp_path, capsys):
    """The recipe's own training of seed 0 diverges, and the study supplies that seed's model: predictions are made
    on it and pbrf verifies them; the failed scratch baseline is recorded and the other scratch runs are left out
    (before, the seed was dropped and register refused: every full-data model had failed)."""
    from test_failures import FRAGILE

    source = ("from pathlib import Path\n" + FRAGILE.replace("lr=0.01", "lr=0.05")
              + "\n\nclass Supplied(Fragile):\n    def supplied_model(self, seed):\n"
                "        return Path(__file__).parent / 'seed0.pt'\n")
    (tmp_path / "fragile.py").write_text(source)
    fragile = load_study(f"{tmp_path / 'fragile.py'}:Fragile")
    stable = type("Stable", (type(fragile),), {"recipe": dataclasses.replace(fragile.recipe, lr=0.01)})()
    theta = train(stable, torch.ones(1, stable.n_train, dtype=torch.bool), [0]).params[0]
    save_state_dict(stable, theta, tmp_path / "seed0.pt")

    db, spec = str(tmp_path / "l.duckdb"), f"{tmp_path / 'fragile.py'}:Supplied"
    assert main(["--db", db, "register", spec, "--methods", "exact", "--sets", "single:n=3"]) == 0
    assert main(["--db", db, "verify", "--regimes", "scratch", "pbrf"]) == 0
    out = capsys.readouterr().out
    assert "the full-data scratch run of seed 0 failed (diverged" in out and "were left out" in out
    con = duckdb.connect(db, read_only=True)
    model = con.execute("SELECT params, supplied_sha256, retrained_distance FROM models").fetchall()
    runs = con.execute("SELECT s.kind, r.regime, r.status, count(*) FROM runs r JOIN removal_sets s USING (set_id) "
                       "GROUP BY ALL ORDER BY ALL").fetchall()
    effects = con.execute("SELECT regime, count(*) FROM effects GROUP BY ALL").fetchall()
    n_predictions = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
    con.close()
    assert len(model) == 1 and torch.equal(load_params(model[0][0]), theta)
    assert model[0][1] == params_sha256(theta) and model[0][2] is None  # no distance to a diverged retraining
    assert runs == [("full", "pbrf", "done", 1), ("full", "scratch", "failed", 1), ("single", "pbrf", "done", 3)]
    assert n_predictions == 3 * 8 and effects == [("pbrf", 3 * 8)]
    assert main(["--db", db, "verify", "--regimes", "scratch", "pbrf"]) == 0
    assert "retrained 0 models" in capsys.readouterr().out  # nothing is left pending ...
    assert main(["--db", db, "status", "--format", "csv"]) == 0
    rows = {row[2]: row[3:7] for row in (line.split(",") for line in capsys.readouterr().out.splitlines()[1:])}
    assert rows["scratch"] == ["0", "0", "0", "1"] and rows["pbrf"] == ["0", "0", "4", "0"]  # ... as status says


def _swapped_checkpoints(tmp_path) -> str:
    """Seed 0's checkpoint is the recipe's model; seed 1's is trained with another learning rate (as a checkpoint
    of another run, supplied by mistake, would be)."""
    (tmp_path / "study.py").write_text(STUDY)
    plain = load_study(f"{tmp_path / 'study.py'}:Blobs")
    ones = torch.ones(1, plain.n_train, dtype=torch.bool)
    save_state_dict(plain, train(plain, ones, [0]).params[0], tmp_path / "seed0.pt")
    save_state_dict(plain, torch_optim_model(plain, lr=0.03), tmp_path / "seed1.pt")
    return f"{tmp_path / 'study.py'}:Supplied"


def test_a_supplied_model_the_recipe_does_not_reproduce_is_announced_and_its_scratch_effects_marked(
        prefect_harness, tmp_path, capsys):
    spec, db = _swapped_checkpoints(tmp_path), str(tmp_path / "l.duckdb")
    assert main(["--db", db, "register", spec, "--methods", "exact", "--sets", "single:n=3"]) == 0
    out = capsys.readouterr().out
    line = "supplied model not reproduced by the recipe (relative tolerance 1e-06): seed 1 (relative distance "
    assert out.count(line) == 1 and "seed 0" not in out.split(line)[1].splitlines()[0]
    assert main(["--db", db, "verify", "--regimes", "scratch", "warm"]) == 0
    assert main(["--db", db, "status"]) == 0
    assert line in capsys.readouterr().out
    assert main(["--db", db, "report", "--report-dir", str(tmp_path / "r")]) == 0
    report = (report_folder(db, "blobs-supplied", tmp_path / "r") / "report.md").read_text()
    assert line in report
    assert "a total shift of 0.003" in report and "| exact | 0, 1 | 0.002 | 0.003 |" in report  # λ beside wd + λ

    con = duckdb.connect(db, read_only=True)
    marked = con.execute("SELECT regime, seed, bool_and(other_model), bool_or(other_model) FROM seed_effects "
                         "GROUP BY ALL ORDER BY ALL").fetchall()
    supplied = con.execute("SELECT seed, reproduced FROM supplied_models ORDER BY seed").fetchall()
    counted = con.execute("SELECT DISTINCT regime, n_seeds, n_other_model FROM effects ORDER BY ALL").fetchall()
    con.close()
    assert supplied == [(0, True), (1, False)]
    # scratch retrains the recipe's seed 1, not the checkpoint the predictions were made on; warm starts from it
    assert marked == [("scratch", 0, False, False), ("scratch", 1, True, True), ("warm", 0, False, False),
                      ("warm", 1, False, False)]
    assert counted == [("scratch", 2, 1), ("warm", 2, 0)]


@pytest.mark.full  # the CLI may start its temporary Prefect server first
def test_supplied_must_reproduce_refuses_a_model_the_recipe_does_not_reproduce(prefect_harness, tmp_path, capsys):
    spec, db = _swapped_checkpoints(tmp_path), tmp_path / "l.duckdb"
    args = ["register", spec, "--methods", "exact", "--sets", "single:n=3", "--supplied-must-reproduce"]
    assert main(["--db", str(db), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed 1 (relative distance" in err and "--supplied-must-reproduce" in err
    assert not db.exists()  # nothing written
    assert main(["--db", str(db), *args[:-1]]) == 0  # registered without the option: its models are in the ledger
    before = file_digest(db)
    assert main(["--db", str(db), *args]) == 2  # the ledger's own record of the distance refuses it too
    assert "seed 1 (relative distance" in capsys.readouterr().err and file_digest(db) == before


def test_the_view_and_the_record_agree_on_what_reproduces(tmp_path):
    distances = [0.0, store.SUPPLIED_TOLERANCE, store.SUPPLIED_TOLERANCE * 1.01, 1.44, None]
    records = [store.ModelRecord("s", seed, b"p", "f" * 64, d, d) for seed, d in enumerate(distances)]
    with store.connect(tmp_path / "l.duckdb") as con:
        store.register_study(con, store.StudyRecord("blobs", "s", "x.py:B", {}, 1, 1, {}))
        store.save_models(con, [*records, store.ModelRecord("s", 9, b"p")])
        viewed = dict(con.execute("SELECT seed, reproduced FROM supplied_models").fetchall())
    assert viewed == {r.seed: r.reproduced for r in records} == {0: True, 1: True, 2: False, 3: False, 4: False}


@pytest.mark.full  # the CLI may start its temporary Prefect server first
def test_tracin_refuses_a_study_that_supplies_its_models(tmp_path, capsys):
    """tracin would sum over the recipe's retraining, not over the supplied model's training: refused in one line."""
    spec, db = _swapped_checkpoints(tmp_path), tmp_path / "l.duckdb"
    assert main(["--db", str(db), "detect", spec, "--methods", "loss", "tracin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tracin retrains the recipe's models" in err and "seeds 0, 1" in err
    assert not db.exists()
