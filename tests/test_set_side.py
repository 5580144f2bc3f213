"""Set-side solves (`side=sets`): each set predicted from one solve of A⁻¹ Σ_{j∈S} w_j ∇L_j, built by vector-Jacobian
products, never from per-example gradients; equal to the measurements side's sums of scores up to the solve."""

from __future__ import annotations

import dataclasses
import io
import re

import duckdb
import pytest
import torch
from torch import Tensor

import predictions.influence
from flows.cli import main
from flows.progress import ScoringProgress
from predictions import CurvatureMethod, build, parse, parse_method, predict
from predictions.influence import measurement_gradients, measurement_products, train_gradients, weighted_gradients
from retrain import Study, load_study, train
from store import RemovalSetRecord


def pearson(a: Tensor, b: Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def set_predictions(study: Study, thetas: Tensor, sets: list[RemovalSetRecord], spec: str) -> Tensor:
    """[M, S] of the method `spec`, as the register flow makes them (`predict`), measurement-major."""
    records = predict(study, parse_method(spec, study), thetas, sets)
    return torch.tensor([r.predicted for r in records], dtype=torch.float64).reshape(len(sets), -1).T


@pytest.fixture(scope="module")
def digits() -> tuple[Study, Tensor, dict[str, list[RemovalSetRecord]]]:
    study = load_study("digits-mlp")
    thetas = train(study, torch.ones(2, study.n_train), [0, 1]).params
    sets = {kind: build(parse(spec), study) for kind, spec in
            [("random", "random:alpha=0.5,k=20"), ("group", "group"), ("relabel", "relabel:size=1,10,k=5,shift=1")]}
    return study, thetas, sets


def test_weighted_gradients_and_measurement_products_are_the_matrix_products():
    study = load_study("linreg")
    theta = train(study, torch.ones(1, study.n_train), [0]).params[0]
    x, y = study.tensors("train")
    weights = torch.randn(study.n_train, 3, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weighted_gradients(study, theta, x, y, weights, chunk=50),
                               train_gradients(study, theta).T @ weights)
    vectors = torch.randn(theta.numel(), 5, dtype=theta.dtype, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(measurement_products(study, theta, vectors, chunk=2),
                               measurement_gradients(study, theta) @ vectors)


def test_the_sets_side_never_forms_per_example_or_measurement_gradients(monkeypatch):
    """With every function that returns per-example ([N, P]) or measurement ([M, P]) gradients broken, the sets
    side still predicts, and equals the measurements side computed before."""
    study = load_study("linreg")
    thetas = train(study, torch.ones(2, study.n_train), [0, 1]).params
    sets = build(parse("random:alpha=0.3,k=4"), study) + build(parse("relabel:size=5,k=3,shift=2"), study)
    expected = set_predictions(study, thetas, sets, "exact")

    def forbidden(*args, **kwargs):
        raise AssertionError("the sets side formed per-example or measurement gradients")

    for name in ("example_gradients", "train_gradients", "measurement_gradients"):
        monkeypatch.setattr(predictions.influence, name, forbidden)
    torch.testing.assert_close(set_predictions(study, thetas, sets, "exact:side=sets"), expected, rtol=1e-10,
                               atol=1e-10 * expected.abs().max().item())
    with pytest.raises(AssertionError, match="formed"):  # the measurements side needs them: the patch bites
        set_predictions(study, thetas, sets, "exact")


def test_exact_sides_agree_on_removal_group_and_relabel_sets(digits):
    study, thetas, sets = digits
    every = [s for kind in sets.values() for s in kind]
    measurements = set_predictions(study, thetas, every, "exact")
    sides = set_predictions(study, thetas, every, "exact:side=sets")
    torch.testing.assert_close(sides, measurements, rtol=1e-10, atol=1e-10 * measurements.abs().max().item())
    assert parse_method("exact:side=sets", study).config["side"] == "sets"


def test_scoped_sides_agree(digits):
    study, thetas, sets = digits
    measurements = set_predictions(study, thetas, sets["random"], r"exact:scope=^2\.")
    sides = set_predictions(study, thetas, sets["random"], r"exact:scope=^2\.,side=sets")
    torch.testing.assert_close(sides, measurements, rtol=1e-10, atol=1e-10 * measurements.abs().max().item())


@pytest.mark.parametrize("kind", ["random", "group"])
def test_cg_on_the_sets_side_equals_exact(digits, kind):
    study, thetas, sets = digits
    exact = set_predictions(study, thetas, sets[kind], "exact")
    cg = set_predictions(study, thetas, sets[kind], "cg:side=sets")
    print(f"cg:side=sets against exact, {kind} sets: Pearson {pearson(cg, exact):.6f}, largest difference "
          f"{(cg - exact).abs().max().item():.2e} of {exact.abs().max().item():.2e}")
    assert pearson(cg, exact) >= 0.999
    torch.testing.assert_close(cg, exact, rtol=1e-3, atol=1e-3 * exact.abs().max().item())


def test_scoring_reports_progress_per_model_with_a_rate():
    study = load_study("linreg")
    thetas = train(study, torch.ones(2, study.n_train), [0, 1]).params
    sets = build(parse("random:alpha=0.3,k=4"), study)
    stream = io.StringIO()
    with ScoringProgress("linreg", "exact:side=sets", 2, stream=stream, every=3600) as progress:
        predict(study, parse_method("exact:side=sets", study), thetas, sets, progress=progress)
        assert progress.done[progress.key] == 2
    assert re.fullmatch(r"linreg: scoring exact:side=sets 2/2 models, [0-9.e+-]+ models/s, eta 0:00:00\n",
                        stream.getvalue())


@pytest.mark.parametrize("spec", ["cg:precondition=4,iterations=30,tol=0", "lissa:iterations=40", "arnoldi:rank=4",
                                  "ekfac:samples=0"])
def test_an_iterative_solve_reports_its_steps_within_one_model(spec):
    """One seed model's scoring is not one silent step: the solver's steps arrive as fractions of the model (a
    rate and an ETA before the model ends), and the model still adds up to exactly one."""
    study = load_study("linreg")
    thetas = train(study, torch.ones(1, study.n_train), [0]).params
    sets = build(parse("random:alpha=0.3,k=4"), study)
    for side in ("sets", "measurements"):
        fractions: list[float] = []
        predict(study, parse_method(f"{spec},models=1,side={side}", study), thetas, sets, progress=fractions.append)
        assert len(fractions) > 3 and min(fractions) > 0 and sum(fractions[:-1]) < 1
        assert sum(fractions) == pytest.approx(1.0, abs=1e-12)
    stream = io.StringIO()
    with ScoringProgress("linreg", spec, 1, stream=stream, every=3600) as progress:
        progress(0.25)
        assert re.fullmatch(rf"linreg: scoring {re.escape(spec)} 0.25/1 models, [0-9.e+-]+ models/s, eta 0:00:\d\d",
                            progress.line())


def test_the_solves_of_one_model_share_its_progress(monkeypatch):
    """When a model's sets or measurements take several solves (a small gradient budget), each solve's steps are
    that share of the model: 2 chunks × 30 CG steps arrive as 60 steps, not 30 and then a stall at the end; on the
    measurements side the gradient products are counted too (grad_dot's identity solve has no steps)."""
    monkeypatch.setattr("predictions.influence.GRADIENT_BUDGET", 22)  # linreg: 11 parameters, 2 rows a chunk
    study = load_study("linreg")
    thetas = train(study, torch.ones(1, study.n_train), [0]).params
    sets = build(parse("random:alpha=0.3,k=4"), study)
    fractions: list[float] = []
    predict(study, parse_method("cg:iterations=30,tol=0,models=1,side=sets", study), thetas, sets,
            progress=fractions.append)
    assert len(fractions) == 2 * 30 + 1 and max(fractions[:-1]) == pytest.approx(1 / 60)
    assert sum(fractions) == pytest.approx(1.0, abs=1e-12)
    fractions = []  # the measurements side: the per-example gradient products are the other half of a model
    predict(study, parse_method("grad_dot:models=1", study), thetas, sets, progress=fractions.append)
    assert len(fractions) > 10 and sum(fractions[:-1]) == pytest.approx(0.5) and sum(fractions) == pytest.approx(1)


def test_both_sides_predict_a_float32_study():
    """A float32 model (as the reversal study's): the set sums and the set-side solves keep its dtype."""
    linreg = type(load_study("linreg"))

    class Linreg32(linreg):
        recipe = dataclasses.replace(linreg.recipe, dtype="float32")

    study = Linreg32()
    thetas = train(study, torch.ones(1, study.n_train), [0]).params
    assert thetas.dtype == torch.float32
    sets = build(parse("random:alpha=0.3,k=3"), study) + build(parse("relabel:size=5,k=2,shift=2"), study)
    measurements = set_predictions(study, thetas, sets, "exact")
    torch.testing.assert_close(set_predictions(study, thetas, sets, "exact:side=sets"), measurements,
                               rtol=1e-3, atol=1e-4 * measurements.abs().max().item())


def test_register_predicts_a_sets_side_method_through_the_method_without_scores(prefect_harness, tmp_path,
                                                                                monkeypatch):
    db = str(tmp_path / "l.duckdb")
    sets = ["--sets", "random:alpha=0.3,k=5", "--sets", "relabel:size=4,k=2,shift=1"]
    assert main(["--db", db, "register", "linreg", "--methods", "exact", *sets]) == 0

    def forbidden(*args, **kwargs):
        raise AssertionError("per-point scores of a sets-side method that no ranked kind needs")

    monkeypatch.setattr(CurvatureMethod, "scores", forbidden)
    assert main(["--db", db, "register", "linreg", "--methods", "exact:side=sets", *sets]) == 0
    with duckdb.connect(db, read_only=True) as con:
        pairs = con.execute("SELECT a.predicted, b.predicted, json_extract_string(b.method_config, '$.side') "
                            "FROM predictions a JOIN predictions b USING (set_id, measurement_id) "
                            "WHERE a.method = 'exact' AND b.method = 'exact:side=sets'").fetchall()
    assert len(pairs) == 7 * 100 and {side for *_, side in pairs} == {"sets"}
    measurements, sides = (torch.tensor(column, dtype=torch.float64) for column in list(zip(*pairs))[:2])
    torch.testing.assert_close(sides, measurements, rtol=1e-10, atol=1e-10 * measurements.abs().max().item())
