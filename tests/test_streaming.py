"""Streaming estimators: every loop over gradient rows (per-example gradients, measurement gradients and their
solves, sets' summed gradients and their solves) holds at most `GRADIENT_BUDGET` entries of them at once, and gives
the same predictions whatever the budget."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import predictions.influence as influence
import predictions.methods as methods
from predictions import build, parse, parse_method, predict
from predictions.detection import detector
from predictions.influence import self_influence, squared_gradient_norms, train_gradients
from retrain import Study, load_study, train
from store import RemovalSetRecord


@pytest.fixture(scope="module")
def linreg() -> tuple[Study, Tensor, list[RemovalSetRecord]]:
    study = load_study("linreg")
    thetas = train(study, torch.ones(2, study.n_train), [0, 1]).params
    sets = build(parse("random:alpha=0.3,k=5"), study) + build(parse("relabel:size=5,k=3,shift=2"), study)
    return study, thetas, sets


def predictions_of(study: Study, thetas: Tensor, sets: list[RemovalSetRecord], spec: str) -> Tensor:
    return torch.tensor([r.predicted for r in predict(study, parse_method(spec, study), thetas, sets)])


def held_rows(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Records (function, rows) of every block of per-example or measurement gradients, and (function, columns) of
    every block of sets' summed gradients and of solved vectors taken to the measurements, formed from now on."""
    seen: list[tuple[str, int]] = []

    def record(module, name: str, rows_of) -> None:
        original = getattr(module, name)

        def recording(*args, **kwargs):
            result = original(*args, **kwargs)
            seen.append((name, rows_of(args, result)))
            return result

        monkeypatch.setattr(module, name, recording)

    record(influence, "example_gradients", lambda args, result: result.shape[0])
    record(influence, "measurement_gradients", lambda args, result: result.shape[0])
    record(methods, "weighted_gradients", lambda args, result: result.shape[1])
    record(methods, "measurement_products", lambda args, result: args[2].shape[1])
    return seen


@pytest.mark.parametrize("spec", ["exact", "cg", "grad_dot", "arnoldi:rank=5,iterations=8", "exact:side=sets",
                                  "cg:side=sets", "grad_dot:side=sets"])
@pytest.mark.full  # seconds of solves or training: the full tier (make test-fast stays quick)
def test_predictions_are_the_same_under_a_budget_of_three_rows(linreg, monkeypatch, spec):
    study, thetas, sets = linreg
    unbounded = predictions_of(study, thetas, sets, spec)
    monkeypatch.setattr(influence, "GRADIENT_BUDGET", 3 * thetas.shape[1])
    seen = held_rows(monkeypatch)
    bounded = predictions_of(study, thetas, sets, spec)
    # CG stops each column at its tolerance (1e-6): rounding in a differently batched product can move that stop
    solve_error = 1e-6 if spec.startswith("cg") else 1e-12
    torch.testing.assert_close(bounded, unbounded, rtol=1e-9, atol=solve_error * unbounded.abs().max().item())
    if "side=sets" not in spec:
        assert ("measurement_gradients", 3) in seen
    assert seen and max(rows for _, rows in seen) <= 3, seen


@pytest.mark.full  # seconds of solves or training: the full tier (make test-fast stays quick)
def test_the_measurements_side_holds_no_more_rows_than_the_budget(linreg, monkeypatch):
    """Measured, not assumed: with a budget of 4 rows, no block of per-example or measurement gradients (whose
    solves these are) has more than 4 rows (the unchunked code formed all M = 100 measurement gradients at once)."""
    study, thetas, sets = linreg
    monkeypatch.setattr(influence, "GRADIENT_BUDGET", 4 * thetas.shape[1])
    seen = held_rows(monkeypatch)
    parse_method("cg:models=1", study).scores(study, thetas, sets)
    assert {name for name, _ in seen} == {"example_gradients", "measurement_gradients"}
    assert max(rows for _, rows in seen) == 4


def test_self_influence_and_gradient_norms_stream_to_the_whole_products(linreg, monkeypatch):
    study, thetas, _ = linreg
    theta = thetas[0]
    gradients = train_gradients(study, theta)
    expected_norms = gradients.pow(2).sum(1)
    expected_self = self_influence(study, theta, study.recipe.damping)
    monkeypatch.setattr(influence, "GRADIENT_BUDGET", 7 * theta.numel())
    seen = held_rows(monkeypatch)
    torch.testing.assert_close(squared_gradient_norms(study, theta), expected_norms)
    torch.testing.assert_close(self_influence(study, theta, study.recipe.damping), expected_self)
    torch.testing.assert_close(detector("grad_dot").scorer(study, thetas, [0, 1])[0], expected_norms / study.n_train)
    assert max(rows for _, rows in seen) == 7


def test_ekfac_takes_its_pseudo_gradients_within_the_budget_and_solves_the_same(linreg, monkeypatch):
    import predictions.ekfac as ekfac

    study, thetas, _ = linreg
    theta = thetas[0]
    vectors = torch.randn(theta.numel(), 3, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    expected = ekfac.ekfac_inverse(study, theta, study.recipe.damping)(vectors)
    monkeypatch.setattr(influence, "GRADIENT_BUDGET", 3 * theta.numel())  # one output per example: 3 examples
    seen = []
    original = ekfac._pseudo_gradients
    monkeypatch.setattr(ekfac, "_pseudo_gradients", lambda *args: seen.append(len(args[2])) or original(*args))
    torch.testing.assert_close(ekfac.ekfac_inverse(study, theta, study.recipe.damping)(vectors), expected)
    assert seen and max(seen) == 3
