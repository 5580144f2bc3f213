"""Predicted weight changes against retraining: on ridge regression the first-order Δθ̂ has the direction of the
PBRF solution exactly (Sherman-Morrison: removing a point changes A by a rank-one term along its own gradient) and
its size to within the leverage factor; the ledger pairs them per block, chains both sides, and scores a scoped
method only against the frozen retraining of the same scope."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import scipy.stats
import torch

import store
from predictions import parse_method, predict
from predictions.weight_change import predicted_weight_changes
from reports.localisation import localisation_rows, localisation_section
from retrain import load_study, train
from retrain.blocks import SKETCH_SIZE, block_changes, parameter_blocks, sketch
from retrain.regimes import Job, parse_regime
from store import RemovalSetRecord


def test_sketches_keep_small_blocks_whole_and_estimate_the_dot_products_of_large_ones():
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(2, SKETCH_SIZE, dtype=torch.float64, generator=generator)
    assert torch.equal(sketch("w", small), small)
    a = torch.randn(40 * SKETCH_SIZE, dtype=torch.float64, generator=generator)
    b = 0.8 * a + 0.6 * torch.randn(len(a), dtype=torch.float64, generator=generator)  # cosine ≈ 0.8
    sa, sb = sketch("layer", torch.stack([a, b]))
    assert sa.shape == (SKETCH_SIZE,)
    assert torch.equal(sketch("layer", a[None])[0], sa)  # the same map for every vector of a block
    cosine = a.dot(b) / (a.norm() * b.norm())
    assert abs(float(sa.dot(sb) / (a.norm() * b.norm()) - cosine)) < 0.05
    assert abs(float(sketch("other", torch.stack([a, b])).prod(0).sum() - sa.dot(sb))) > 0  # a block's own map


def test_blocks_follow_the_studys_map_else_one_per_named_parameter():
    study = load_study("digits-mlp")
    assert {b: len(i) for b, i in parameter_blocks(study).items()} == {"0.weight": 2048, "0.bias": 32,
                                                                      "2.weight": 320, "2.bias": 10}
    grouped = type("Grouped", (type(study),), {"parameter_blocks": {"first layer": r"^0\.", "second layer": r"^2\."}})()
    blocks = parameter_blocks(grouped)
    assert {b: len(i) for b, i in blocks.items()} == {"first layer": 2080, "second layer": 330}
    assert torch.equal(torch.cat(list(blocks.values())).sort().values, torch.arange(2410))


@pytest.fixture(scope="module")
def ridge():
    """linreg's full-data model and its PBRF solutions without single points, with their weight changes."""
    study = load_study("linreg")
    full = train(study, torch.ones(1, study.n_train, dtype=torch.bool), [0]).params[0]
    sets = [RemovalSetRecord(study.study_hash, "single", f"single:{j}", (j,)) for j in range(0, study.n_train, 11)]
    jobs = [Job(s.set_id, 0, s.indices, weight_change=True) for s in sets]
    runs = parse_regime("pbrf").run(study, jobs, {0: full})
    return study, full, sets, runs


def test_predicted_weight_changes_are_the_pbrf_responses_of_ridge_regression(ridge):
    study, full, sets, runs = ridge
    predicted = predicted_weight_changes(study, parse_method("exact", study), full[None], [0], sets)
    assert {(w.set_id, w.block) for w in predicted} == {(s.set_id, b) for s in sets for b in ("weight", "bias")}
    x = torch.cat([study.tensors("train")[0], torch.ones(study.n_train, 1, dtype=torch.float64)], 1)
    a_inverse = torch.linalg.inv(x.T @ x / len(x) + study.recipe.weight_decay * torch.eye(11, dtype=torch.float64))
    for s, run in zip(sets, runs):
        leverage = float(x[s.indices[0]] @ a_inverse @ x[s.indices[0]]) / len(x)
        pred = {w.block: w for w in predicted if w.set_id == s.set_id}
        p = torch.tensor([*pred["weight"].direction, *pred["bias"].direction], dtype=torch.float64)
        a = torch.tensor([*run.weight_changes["weight"][1], *run.weight_changes["bias"][1]], dtype=torch.float64)
        assert float(p.dot(a) / (p.norm() * a.norm())) > 0.9999  # the direction of the response
        # its size to first order: (A − x_j x_jᵀ/N)⁻¹ x_j = A⁻¹ x_j / (1 − x_jᵀ A⁻¹ x_j / N)
        assert float(p.norm() / a.norm()) == pytest.approx(1 - leverage, rel=1e-5)  # PBRF solved to 1e-8
        assert pred["weight"].norm == pytest.approx(float(p[:10].norm()))


def test_only_asked_jobs_measure_weight_changes_and_their_deltas_are_from_the_seeds_full_model(ridge):
    study, full, sets, runs = ridge
    scratch = parse_regime("scratch")
    assert scratch.run(study, [Job(sets[0].set_id, 0, sets[0].indices)], {0: full})[0].weight_changes == {}
    masks = torch.ones(1, study.n_train, dtype=torch.bool)
    masks[0, list(sets[0].indices)] = False
    theta = train(study, masks, [0]).params
    measured = scratch.run(study, [Job(sets[0].set_id, 0, sets[0].indices, weight_change=True)], {0: full})
    assert measured[0].weight_changes == block_changes(study, theta - full)[0]


def _ledger(tmp_path, study, sets, runs, changes):
    db = str(tmp_path / "ledger.duckdb")
    with store.connect(db) as con:
        store.register_study(con, study.record())
        store.register_removal_sets(con, sets)
        store.register_weight_changes(con, changes, "test")
        store.record_runs(con, runs)
    return db


def test_the_view_pairs_blocks_per_seed_and_the_chain_covers_both_sides(ridge, tmp_path):
    study, full, sets, runs = ridge
    exact = parse_method("exact", study)
    changes = predicted_weight_changes(study, exact, full[None], [0], sets)
    baseline = parse_regime("pbrf").run(study, [Job(store.full_set_id(study.study_hash), 0, (), weight_change=True)],
                                        {0: full})
    db = _ledger(tmp_path, study, sets, [*baseline, *runs], changes)
    with store.connect(db) as con:
        rows = con.execute("SELECT block, count(*), min(cosine), min(norm_spearman) FROM weight_change "
                           "WHERE regime = 'pbrf' GROUP BY block ORDER BY block").fetchall()
        assert [r[:2] for r in rows] == [("(all)", len(sets)), ("bias", len(sets)), ("weight", len(sets))]
        assert min(r[2] for r in rows) > 0.99
        assert rows[0][3] == 1.0  # two blocks, ranked alike
        assert store.audit(con) == []
        assert store.register_weight_changes(con, changes, "test") == 0  # registered once
        per_set = [r[0] for r in con.execute("SELECT norm_spearman FROM weight_change WHERE regime = 'pbrf' "
                                             "AND block = '(all)' AND method = 'exact'").fetchall()]
        summary = con.execute("SELECT sets, norm_spearman, norm_spearman_lo, norm_spearman_hi FROM "
                              "weight_change_summary WHERE regime = 'pbrf' AND block = '(all)'").fetchone()
        half = scipy.stats.t.ppf(0.975, len(per_set) - 1) * np.std(per_set, ddof=1) / np.sqrt(len(per_set))
        assert summary[0] == len(sets)  # the interval is over the sets, the units of the summary
        assert summary[1:] == pytest.approx((np.mean(per_set), np.mean(per_set) - half, np.mean(per_set) + half))
        lines = localisation_section(localisation_rows(con, "linreg"), tmp_path)
        assert (tmp_path / "weight_change.png").stat().st_size > 0
        assert "`exact` against `pbrf`: the predicted weight change points the way the model moved with median " \
               "cosine 1" in lines[-2]
        con.execute("UPDATE run_weight_changes SET direction = list_transform(direction, lambda v: v * 2) "
                    "WHERE block = 'bias' AND run_id = ?", [runs[0].run_id])
        con.execute("UPDATE predicted_weight_changes SET norm = norm * 2 WHERE set_id = ? AND block = 'weight'",
                    [sets[1].set_id])
        problems = store.audit(con)
    assert any("runs" in p and runs[0].run_id in p for p in problems)
    assert any("predicted_weight_changes" in p for p in problems)


def test_a_scoped_method_is_scored_only_against_the_frozen_retraining_of_its_scope(ridge, tmp_path):
    study, full, sets, _ = ridge
    scoped = parse_method("exact:scope=weight", study)
    changes = predicted_weight_changes(study, scoped, full[None], [0], sets[:3])
    assert all(w.norm == 0 for w in changes if w.block == "bias")  # the scope's complement does not move
    jobs = [Job(s.set_id, 0, s.indices, weight_change=True)
            for s in [RemovalSetRecord(study.study_hash, "full", "full data", ()), *sets[:3]]]
    runs = [r for spec in ("scratch", "frozen:scope=weight,from=full", "frozen:scope=weight", "frozen:scope=bias,"
                           "from=full") for r in parse_regime(spec).run(study, jobs, {0: full})]
    db = _ledger(tmp_path, study, sets[:3], runs, changes)
    with store.connect(db) as con:  # the measurements' predictions pair the same way (calibration, reversal_test)
        store.register_predictions(con, [p for m in (scoped, parse_method("exact", study))
                                         for p in predict(study, m, full[None], sets[:3])], "test")
        pairs = con.execute("SELECT DISTINCT method, regime FROM prediction_accuracy ORDER BY ALL").fetchall()
        restricted = localisation_rows(con, "linreg")["restricted"]
        calibrated = con.execute("SELECT method, regime, set_kind, n, pearson FROM calibration").fetchall()
    # the report's correlations are the calibration view's, one row per set kind, never recomputed
    assert sorted((r["method"], r["regime"], r["set_kind"], r["n"], r["pearson"]) for r in restricted) == \
        sorted(calibrated)
    assert pairs == [("exact", "scratch"), ("exact:scope=weight", "frozen:scope=weight,from=full")]
    with duckdb.connect(db, read_only=True) as con:
        regimes = con.execute("SELECT DISTINCT regime FROM weight_change").fetchall()
        cosines = con.execute("SELECT min(cosine) FROM weight_change WHERE block = 'weight'").fetchone()[0]
        spearman = con.execute("SELECT DISTINCT norm_spearman FROM weight_change").fetchall()
    assert regimes == [("frozen:scope=weight,from=full",)]
    assert spearman == [(None,)]  # one block moves: the frozen bias (0 predicted, 0 moved) is no evidence of ranking
    # the refit renormalises the kept mean (1/(N − 1)), which also moves θ along A⁻¹wd·θ*: not in Δθ̂, so below 1
    assert cosines > 0.9
