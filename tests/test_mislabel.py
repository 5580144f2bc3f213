"""digits-mislabel: flipped labels are ground truth in the ledger (never in the estimators' tensors), and
self-influence finds them far better than chance, scored by the `detection` view."""

from __future__ import annotations

import duckdb
import numpy as np
import torch

from flows.cli import main
from retrain import load_study
from retrain.engine import train

SMALL = '''
from retrain import Recipe
from retrain.studies.mislabel import DigitsMislabel


class SmallMislabel(DigitsMislabel):
    name = "digits-mislabel-small"
    recipe = Recipe(optimizer="sgd", epochs=10, lr=0.05, momentum=0.9, batch_size=64, weight_decay=1e-3,
                    seeds=2, damping=2e-3)
'''


def test_flipped_labels_are_hidden_from_the_estimators():
    study = load_study("digits-mislabel")
    truth = study.true_labels()
    y = study.tensors("train")[1]
    clean = load_study("digits-mlp").tensors("train")[1]
    assert len(truth) == round(0.1 * study.n_train)
    assert all(int(y[j]) != t and int(clean[j]) == t for j, t in truth.items())  # y holds the flipped label
    assert int((y != clean).sum()) == len(truth)
    assert study.record().flipped_labels == {j: (int(y[j]), t) for j, t in truth.items()}


def test_self_influence_finds_flipped_labels_far_better_than_random(prefect_harness, tmp_path, capsys):
    (tmp_path / "small.py").write_text(SMALL)
    db = tmp_path / "l.duckdb"
    spec = f"{tmp_path / 'small.py'}:SmallMislabel"
    assert main(["--db", str(db), "detect", spec, "--methods", "exact", "loss", "random", "--format", "csv"]) == 0
    assert "digits-mislabel-small" in capsys.readouterr().out
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT method, inspected_fraction, recall, recall_lo, recall_hi, auc, n_seeds, n_flipped "
                       "FROM detection").fetchall()
    by = {(m, round(p, 2)): (r, lo, hi, auc, n, f) for m, p, r, lo, hi, auc, n, f in rows}
    # the view's recall against a direct computation for one model
    flipped = {j for (j,) in con.execute("SELECT train_index FROM flipped_labels").fetchall()}
    scores = np.array([s for (s,) in con.execute("SELECT score FROM self_influence WHERE method = 'exact' AND seed = 1 "
                                                 "ORDER BY train_index").fetchall()])
    per_seed = con.execute("SELECT recall FROM detection_by_seed WHERE method = 'exact' AND seed = 1 "
                           "AND inspected_fraction = 0.1").fetchone()[0]
    con.close()
    top = np.argsort(-scores, kind="stable")[: int(np.ceil(0.1 * len(scores)))]
    assert per_seed == len(flipped & set(top.tolist())) / len(flipped)
    assert len(rows) == 3 * 4 and {r[6] for r in rows} == {2} and {r[7] for r in rows} == {len(flipped)}
    exact, random = by[("exact", 0.1)], by[("random", 0.1)]
    assert exact[0] >= 0.6 and exact[0] > random[0] + 0.4  # random inspection finds ~10% of flips in 10% of points
    assert exact[1] <= exact[0] <= exact[2]
    assert exact[3] > 0.9 and 0.35 < random[3] < 0.65  # AUC
    # the ground truth and the scores decide the detection verdict, so they are chained: editing either is caught
    assert main(["--db", str(db), "audit"]) == 0
    for change, named in (("UPDATE flipped_labels SET true_label = given_label WHERE rowid = 0", "flipped_labels"),
                          ("UPDATE self_influence SET score = score + 1 WHERE rowid = 5", "self_influence")):
        tampered = tmp_path / f"{named}.duckdb"
        tampered.write_bytes(db.read_bytes())
        (tmp_path / f"{named}.duckdb.receipts").write_bytes((tmp_path / "l.duckdb.receipts").read_bytes())
        with duckdb.connect(str(tampered)) as con:
            con.execute(change)
        capsys.readouterr()
        assert main(["--db", str(tampered), "audit"]) == 1
        assert named in capsys.readouterr().err


def test_detect_refuses_an_unknown_method(prefect_harness, tmp_path, capsys):
    assert main(["--db", str(tmp_path / "l.duckdb"), "detect", "digits-mislabel", "--methods", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("ifledger: error: unknown detection method 'nope'")
    assert not (tmp_path / "l.duckdb").exists()


def test_training_hands_each_epochs_parameters_to_the_checkpoint_hook():
    study = load_study("digits-mlp")
    seen: list[tuple[int, torch.Tensor]] = []
    trained = train(study, torch.ones(2, study.n_train, dtype=torch.bool), [0, 1], epochs=2,
                    checkpoint=lambda epoch, theta: seen.append((epoch, theta.clone())))
    assert [e for e, _ in seen] == [1, 2]
    assert not torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[1][1], trained.params)
