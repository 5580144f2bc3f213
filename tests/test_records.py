"""Every record says what was computed: a set's id covers what defines it (kind, ranking, target, direction,
new labels), so no registered set is dropped."""

from __future__ import annotations

import dataclasses
import json

import duckdb

import store
from flows.cli import main
from store import RemovalSetRecord, StudyRecord

MARGINS = '''
import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from torch import nn

from retrain import Recipe, Study


class Margins(Study):
    name = "margins"
    recipe = Recipe(epochs=6, batch_size=8, lr=0.1, seeds=2)

    def dataset(self):
        rng = np.random.default_rng(0)

        def split(n):
            x = rng.normal(size=(n, 4))
            return Dataset.from_dict({"x": x.tolist(), "y": x[:, :3].argmax(1).tolist()})
        return DatasetDict(train=split(24), query=split(3))

    def model(self):
        return nn.Linear(4, 3)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    def measurements(self):
        return {f"margin/{i}": f"margin of query example {i}" for i in range(3)}

    def measure(self, forward):
        x, y = self.tensors("query")
        out = forward(x)
        own = out.gather(1, y[:, None])[:, 0]
        other = out.masked_fill(F.one_hot(y, 3).bool(), -torch.inf).amax(1)
        return {f"margin/{i}": v for i, v in enumerate((own - other).unbind())}
'''


def test_a_set_id_covers_what_defines_the_set():
    single = RemovalSetRecord("h", "single", "single:5", (5,))
    top = RemovalSetRecord("h", "top_k", "top_k:exact:m0:positive:k=1", (5,), "exact", "m0", "positive")
    other_target = RemovalSetRecord("h", "top_k", "top_k:exact:m1:positive:k=1", (5,), "exact", "m1", "positive")
    other_method = RemovalSetRecord("h", "top_k", "top_k:cg:m0:positive:k=1", (5,), "cg", "m0", "positive")
    negative = RemovalSetRecord("h", "top_k", "top_k:exact:m0:negative:k=1", (5,), "exact", "m0", "negative")
    user = RemovalSetRecord("h", "user", "user:sets.txt:0", (5,))
    relabel = RemovalSetRecord("h", "relabel", "relabel", (5,), new_labels=(1.0,))
    ids = [s.set_id for s in (single, top, other_target, other_method, negative, user, relabel)]
    assert len(set(ids)) == len(ids)
    assert top.set_id == RemovalSetRecord("h", "top_k", "another label", (5,), "exact", "m0", "positive").set_id
    assert RemovalSetRecord("h", "full", "full data", ()).set_id == store.full_set_id("h")


def test_an_older_ledgers_sets_keep_their_ids_and_only_theirs(tmp_path):
    """A ledger written when a set's id hashed its points alone: registering the same sets again keeps their ids
    (and so their predictions and runs); a set of the same points with another definition gets its own."""
    single = RemovalSetRecord("h", "single", "single:5", (5,))
    top = RemovalSetRecord("h", "top_k", "top_k:exact:m0:positive:k=1", (5,), "exact", "m0", "positive")
    old_top = RemovalSetRecord("h", "top_k", "top_k:exact:m0:positive:k=2", (3, 4), "exact", "m0", "positive",
                               stored_by_members=True)
    with store.connect(tmp_path / "l.duckdb") as con:
        store.register_study(con, StudyRecord("toy", "h", "toy", {}, 10, 3, {"m0": ""}))
        store.register_removal_sets(con, [RemovalSetRecord("h", "single", "single:5", (5,), stored_by_members=True),
                                          old_top])
        again = store.keep_older_ids(con, [single, top, dataclasses.replace(old_top, stored_by_members=False)])
    assert [s.set_id for s in again] == [single.members_id, top.set_id, old_top.members_id]
    assert top.set_id != single.members_id


def test_single_and_top_k_sets_of_the_same_points_are_both_registered_and_scored(prefect_harness, tmp_path):
    (tmp_path / "margins.py").write_text(MARGINS)
    db = str(tmp_path / "l.duckdb")
    assert main(["--db", db, "run", f"{tmp_path / 'margins.py'}:Margins", "--methods", "exact", "--sets", "single",
                 "--sets", "top_k:k=1,2", "--regimes", "scratch", "--report-dir", str(tmp_path / "r")]) == 0
    con = duckdb.connect(db, read_only=True)
    kinds = dict(con.execute("SELECT kind, count(*) FROM removal_sets GROUP BY ALL").fetchall())
    shared = con.execute("SELECT count(*) FROM (SELECT indices FROM removal_sets WHERE kind = 'top_k' GROUP BY ALL "
                         "HAVING count(DISTINCT target) > 1)").fetchone()[0]
    moved = con.execute("SELECT k, sets FROM top_k_effects WHERE ranked_by = 'exact' ORDER BY k").fetchall()
    brittle = con.execute("SELECT DISTINCT k FROM brittleness ORDER BY k").fetchall()
    con.close()
    # every point alone; per measurement (3), direction (2) and k (2) one top_k set, even where they share points
    assert kinds["single"] == 24 and kinds["top_k"] == 3 * 2 * 2
    assert shared > 0  # two rankings picked the same points: both targets kept
    assert moved == [(1, 6), (2, 6)]
    assert brittle == [(1,), (2,)]


def test_tracin_records_the_epochs_it_sums_over(monkeypatch):
    """30 epochs: a checkpoint after each (30, not the 20 it used to record); 40 epochs: after every second."""
    import torch

    from predictions.detection import detector
    from retrain import Recipe, load_study, train

    study = load_study("linreg")
    monkeypatch.setattr(type(study), "recipe", Recipe(optimizer="sgd", epochs=30, lr=0.01, batch_size=64, seeds=1))
    config = detector("tracin").config(study, "tracin")
    assert config["checkpoint_epochs"] == list(range(1, 31))
    seen: dict[int, torch.Tensor] = {}
    train(study, torch.ones(1, study.n_train, dtype=torch.bool), [0],
          checkpoint=lambda e, th: seen.update({e: th[0].clone()}))
    x, y = study.tensors("train")
    by_hand = sum(study.recipe.lr * torch.func.vmap(torch.func.grad(
        lambda th, xi, yi: study.loss(study.flat(th, xi[None]), yi[None])[0]), in_dims=(None, 0, 0))(seen[e], x, y)
        .pow(2).sum(1) for e in config["checkpoint_epochs"])
    scores = detector("tracin").scorer(study, seen[30][None], [0])[0]
    torch.testing.assert_close(scores, by_hand, rtol=1e-10, atol=0)
    monkeypatch.setattr(type(study), "recipe", Recipe(optimizer="sgd", epochs=40, lr=0.01, batch_size=64, seeds=1))
    assert detector("tracin").config(study, "tracin")["checkpoint_epochs"] == list(range(2, 41, 2))


def test_a_method_that_averages_fewer_seeds_than_asked_records_which(prefect_harness, tmp_path, capsys):
    """Seed 1's full-data training diverges: exact (models=3 by default) averages seeds 0 and 2, says so, and
    registers models=2, seeds=[0, 2]; exact:models=1 averages seed 0 alone, as asked (its config is unchanged)."""
    from test_failures import FRAGILE

    (tmp_path / "f.py").write_text(FRAGILE.replace("seeds=1", "seeds=3").replace("lr=0.01", "lr=0.002") + '''

class OneFails(Fragile):
    def init_params(self, seed):
        theta = super().init_params(seed)
        return theta * 1e4 if seed == 1 else theta
''')
    db = str(tmp_path / "l.duckdb")
    assert main(["--db", db, "register", f"{tmp_path / 'f.py'}:OneFails", "--methods", "exact", "exact:models=1",
                 "--sets", "single:n=2"]) == 0
    out = capsys.readouterr().out
    assert "exact averages the full-data models of seeds 0, 2 (a seed" in out and "models=2, seeds=[0, 2]" in out
    assert "exact:models=1 averages" not in out
    con = duckdb.connect(db, read_only=True)
    rows = con.execute("SELECT DISTINCT method, method_config FROM predictions").fetchall()
    configs = {m: json.loads(c) for m, c in rows}
    con.close()
    assert configs["exact"]["models"] == 2 and configs["exact"]["seeds"] == [0, 2]
    assert configs["exact:models=1"]["models"] == 1 and "seeds" not in configs["exact:models=1"]
    assert main(["--db", db, "studies"]) == 0
    out = capsys.readouterr().out
    assert "exact: seeds 0, 2; damping λ 0.002 (curvature shift wd + λ = 0.003)" in out
    assert "exact:models=1: seeds 0; damping λ 0.002" in out
    assert "recipe: weight_decay 0.001, damping λ 0.002 (curvature shift wd + λ = 0.003)" in out


OPTIONED = '''
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from torch import nn

from retrain import Recipe, Study
from retrain.options import option


@dataclass(frozen=True)
class BlobOptions:
    n: int = option("training examples", 40, minimum=8)
    noise: float = option("label noise scale", 0.5, minimum=0)
    folder: str = option("where checkpoints would be", "")


class Optioned(Study):
    name = "optioned"
    recipe = Recipe(epochs=3, batch_size=16, lr=0.1, seeds=1)
    Options = BlobOptions

    def dataset(self):
        rng = np.random.default_rng(0)

        def split(n):
            x = rng.normal(size=(n, 4))
            y = (x[:, 0] + self.options.noise * rng.normal(size=n) > 0).astype(int)
            return Dataset.from_dict({"x": x.tolist(), "y": y.tolist()})
        return DatasetDict(train=split(self.options.n), query=split(4))

    def model(self):
        return nn.Linear(4, 2)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")
'''


def test_study_options_are_typed_stored_and_hashed(tmp_path):
    import pytest

    from retrain import load_study
    from store import InputError

    (tmp_path / "s.py").write_text(OPTIONED)
    spec = f"{tmp_path / 's.py'}:Optioned"
    plain, given = load_study(spec), load_study(f"{spec}:n=24,noise=0.25,folder=/tmp/ckpt")
    assert plain.n_train == 40 and plain.source == f"{(tmp_path / 's.py').resolve()}:Optioned"
    assert given.n_train == 24 and given.options.noise == 0.25 and given.options.folder == "/tmp/ckpt"
    assert given.source == f"{plain.source}:n=24,noise=0.25,folder=/tmp/ckpt"  # what verify loads again
    assert given.config()["options"] == {"n": 24, "noise": 0.25, "folder": "/tmp/ckpt"}
    assert load_study(given.source).study_hash == given.study_hash != plain.study_hash
    assert load_study(f"{spec}:folder=/tmp/other,n=24,noise=0.25").study_hash != given.study_hash
    assert load_study(f"{spec}:n=40").study_hash == plain.study_hash  # the defaults, spelled out
    for bad, message in [(":n=2", "n=2 must be at least 8"), (":n=3.5", "n needs an integer"),
                         (":size=3", "option 'size=3' not understood; optioned takes n=, noise=, folder=")]:
        with pytest.raises(InputError, match=message):
            load_study(spec + bad)
    assert "options" not in load_study("linreg").config()  # a study without options keeps its hash


def test_a_study_registered_with_options_verifies_without_them_in_the_environment(prefect_harness, tmp_path, capsys):
    (tmp_path / "s.py").write_text(OPTIONED)
    db = str(tmp_path / "l.duckdb")
    assert main(["--db", db, "register", f"{tmp_path / 's.py'}:Optioned:n=24", "--sets", "single:n=2"]) == 0
    assert main(["--db", db, "verify"]) == 0
    out = capsys.readouterr().out
    assert "retrained 2 models: 2 done" in out and "skipped" not in out
    con = duckdb.connect(db, read_only=True)
    source, options = con.execute("SELECT source, config->>'$.options.n' FROM studies").fetchone()
    con.close()
    assert source.endswith("s.py:Optioned:n=24") and options == "24"


def test_imported_rows_name_the_ledgers_sets_by_id_or_points(tmp_path):
    """A row may give a set's id with its points (any kind of set: here a `single` set); a set an older ledger
    imported (keyed by its points) keeps its id; new points make a new `user` set."""
    from flows.pipeline import read_predictions
    from retrain import load_study

    study = load_study("linreg")
    h, db = study.study_hash, tmp_path / "l.duckdb"
    single = RemovalSetRecord(h, "single", "single:2", (2,))
    older = RemovalSetRecord(h, "user", "imported:p.csv", (3, 4), stored_by_members=True)
    with store.connect(db) as con:
        store.register_study(con, study.record())
        store.register_removal_sets(con, [single, older])
    m = study.measurement_ids[0]
    (tmp_path / "p.csv").write_text(f"set_id,indices,measurement_id,predicted\n{single.set_id},2,{m},0.5\n"
                                    f",3 4,{m},0.25\n,5,{m},0.125\n")
    _, sets, records = read_predictions(str(db), "linreg", str(tmp_path / "p.csv"), "other")
    fresh = RemovalSetRecord(h, "user", "imported:p.csv", (5,))
    assert [r.set_id for r in records] == [single.set_id, older.members_id, fresh.set_id]
    assert sorted(s.set_id for s in sets) == sorted([older.members_id, fresh.set_id])
    assert fresh.set_id != fresh.members_id
