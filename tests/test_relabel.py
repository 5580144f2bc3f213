"""Relabel sets: the points stay and take new labels. On ridge regression the first-order prediction
(1/N) ∇mᵀ(H + λI)⁻¹(∇L(x_j, y_j) − ∇L(x_j, y'_j)) is exact, so it must match exact refits; through the flows a
relabel set is registered, verified and calibrated like a removal set."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
from conftest import file_digest

from flows.cli import main
from predictions import build, parse, parse_method, predict
from retrain import load_study
from retrain.regimes import Job, run_regime, train_full
from store import RemovalSetRecord, removal_set_id


@pytest.fixture(scope="module")
def linreg():
    study = load_study("linreg")
    full, records = train_full(study, [0, 1], removal_set_id(study.study_hash, ()))
    return study, full, {r.seed: r.outcomes for r in records}


def _refit_effects(study, full, baseline, sets, regime="scratch") -> np.ndarray:
    """[S, M] the effect of each set, retrained under `regime` and averaged over the two seeds."""
    jobs = [Job(s.set_id, seed, s.indices, s.new_labels) for s in sets for seed in (0, 1)]
    runs = run_regime(study, regime, jobs, full)
    ids = study.measurement_ids
    effects = np.array([[r.outcomes[m] - baseline[j.seed][m] for m in ids] for j, r in zip(jobs, runs)])
    return effects.reshape(len(sets), 2, len(ids)).mean(1)


def _predicted(study, full, sets, method="exact") -> np.ndarray:
    m = parse_method(method, study)
    records = predict(study, m, torch.stack([full[0], full[1]]), sets)
    return np.array([r.predicted for r in records]).reshape(len(sets), -1)


def test_relabel_predictions_match_exact_refits_on_ridge_regression(linreg):
    study, full, baseline = linreg
    sets = build(parse("relabel:size=1,5,20,k=10,shift=1.5"), study)
    predicted, actual = _predicted(study, full, sets).ravel(), _refit_effects(study, full, baseline, sets).ravel()
    assert np.corrcoef(predicted, actual)[0, 1] >= 0.99
    assert 0.9 <= np.polyfit(actual, predicted, 1)[0] <= 1.1
    assert np.abs(actual).max() > 1e-3  # the targets moved the model: the agreement is not 0 against 0


def test_every_method_relabels_through_the_shared_scoring(linreg):
    """The relabel score is the removal score of (x_j, y_j) minus that of (x_j, y'_j): for grad_dot (A = I) it
    can be written out by hand, and a set relabelled to its own labels predicts exactly 0."""
    study, full, _ = linreg
    x, y = study.tensors("train")
    points = (3, 40, 41)
    new = tuple(float(v) for v in y[list(points)] - 2.0)
    sets = [RemovalSetRecord(study.study_hash, "relabel", "by hand", points, new_labels=new),
            RemovalSetRecord(study.study_hash, "relabel", "unchanged", points,
                             new_labels=tuple(float(v) for v in y[list(points)]))]
    theta = full[0]
    weight, bias = theta[:-1], theta[-1]
    xq, yq = study.tensors("query")
    dm = ((xq @ weight + bias - yq)[:, None] * torch.cat([xq, torch.ones(len(yq), 1, dtype=xq.dtype)], 1))  # [M, P]
    idx = list(points)
    xa = torch.cat([x[idx], torch.ones(3, 1, dtype=x.dtype)], 1)
    shift = torch.tensor(new, dtype=x.dtype) - y[idx]  # ∇L(y) − ∇L(y') = (y' − y)·(x, 1) for ½(f − y)²
    by_hand = dm @ (shift[:, None] * xa).sum(0) / study.n_train
    m = parse_method("grad_dot:models=1", study)
    predicted = predict(study, m, theta[None], sets)
    values = torch.tensor([r.predicted for r in predicted], dtype=x.dtype).reshape(2, -1)
    torch.testing.assert_close(values[0], by_hand)
    assert values[1].abs().max() < 1e-12


def test_warm_and_pbrf_retrain_relabel_sets_like_scratch_on_a_convex_model(linreg):
    study, full, baseline = linreg
    sets = build(parse("relabel:size=10,k=4,shift=-1"), study)
    scratch = _refit_effects(study, full, baseline, sets)
    for regime in ("warm", "pbrf"):
        np.testing.assert_allclose(_refit_effects(study, full, baseline, sets, regime), scratch, atol=1e-6)


def test_relabel_set_ids_cover_the_labels_and_differ_from_removal():
    a = RemovalSetRecord("s", "relabel", "a", (4, 2), new_labels=(1.0, 0.0))
    b = RemovalSetRecord("s", "relabel", "b", (2, 4), new_labels=(0.0, 1.0))
    c = RemovalSetRecord("s", "relabel", "c", (2, 4), new_labels=(1.0, 0.0))
    assert a.set_id == b.set_id and a.indices == (2, 4) and a.new_labels == (0.0, 1.0)
    assert c.set_id != a.set_id
    assert a.set_id != RemovalSetRecord("s", "random", "r", (2, 4)).set_id


def test_relabel_specs_are_checked_before_anything_runs():
    study = load_study("linreg")
    for spec, message in [("relabel:size=5", "either shift"), ("relabel:size=5,shift=1,value=2", "either shift"),
                          ("relabel:size=500,shift=1", "more than the 342")]:
        with pytest.raises(Exception, match=message):
            build(parse(spec), study)


@pytest.fixture(scope="module")
def relabel_ledger(prefect_harness, tmp_path_factory) -> str:
    """linreg with relabel and single sets, registered, verified (scratch and pbrf) and calibrated through the CLI
    (outside `capsys`: Prefect's log handler keeps the stream it first sees)."""
    db = str(tmp_path_factory.mktemp("relabel") / "l.duckdb")
    plan = ["linreg", "--methods", "exact", "--sets", "relabel:size=5,k=8,shift=1", "--sets", "single:n=5"]
    assert main(["--db", db, "register", *plan]) == 0
    assert main(["--db", db, "verify", "--regimes", "scratch", "pbrf"]) == 0
    assert main(["--db", db, "calibrate"]) == 0
    return db


def test_relabel_sets_go_through_register_verify_calibrate_and_audit(relabel_ledger, capsys):
    db = relabel_ledger
    con = duckdb.connect(db, read_only=True)
    try:
        labels = con.execute("SELECT kind, count(*), count(new_labels) FROM removal_sets GROUP BY kind "
                             "ORDER BY kind").fetchall()
        rows = con.execute("SELECT regime, n, pearson FROM calibration WHERE set_kind = 'relabel' "
                           "ORDER BY regime").fetchall()
        removal_entry = con.execute("SELECT content FROM chain WHERE entry = 'removal_sets' AND content NOT LIKE "
                                    "'%new_labels%' LIMIT 1").fetchone()
    finally:
        con.close()
    assert labels == [("full", 1, 0), ("relabel", 8, 8), ("single", 5, 0)]
    assert [r[0] for r in rows] == ["pbrf", "scratch"]
    assert all(n == 8 * 100 and pearson >= 0.99 for _, n, pearson in rows), rows
    assert removal_entry is not None  # a removal set's chained content is as before relabel sets existed
    assert main(["--db", db, "audit"]) == 0
    before = (file_digest(db), file_digest(f"{db}.receipts"))
    capsys.readouterr()
    assert main(["--db", db, "register", "linreg", "--sets", "relabel:size=5"]) == 2
    assert "either shift" in capsys.readouterr().err and (file_digest(db), file_digest(f"{db}.receipts")) == before
