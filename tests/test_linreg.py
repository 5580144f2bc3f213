"""Ridge regression: the engine reaches the closed-form optimum and `exact` matches closed-form LOO."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from predictions import parse_method
from retrain import load_study, measure, train


@pytest.fixture(scope="module")
def linreg():
    study = load_study("linreg")
    x, y = (t.numpy() for t in study.tensors("train"))
    xq, yq = (t.numpy() for t in study.tensors("query"))
    return study, np.c_[x, np.ones(len(x))], y, np.c_[xq, np.ones(len(xq))], yq


def ridge(xa: np.ndarray, y: np.ndarray, wd: float) -> np.ndarray:
    """argmin mean ½(xᵀθ − y)² + (wd/2)‖θ‖² in closed form (bias regularised too, as in the study)."""
    n = len(y)
    return np.linalg.solve(xa.T @ xa / n + wd * np.eye(xa.shape[1]), xa.T @ y / n)


def test_newton_training_reaches_the_closed_form_optimum(linreg):
    study, xa, y, _, _ = linreg
    trained = train(study, torch.ones(2, study.n_train, dtype=torch.bool), [0, 1])
    theta = ridge(xa, y, study.recipe.weight_decay)
    params = trained.params.numpy()
    # FlatModel order is (weight, bias); the closed form puts the bias last too.
    np.testing.assert_allclose(params[0], theta, atol=1e-10)
    np.testing.assert_allclose(params[1], theta, atol=1e-10)  # the seed changes the init, not the optimum


def test_exact_influence_matches_closed_form_leave_one_out(linreg):
    study, xa, y, xq, yq = linreg
    wd = study.recipe.weight_decay
    theta = ridge(xa, y, wd)
    base = 0.5 * (xq @ theta - yq) ** 2
    loo = np.stack([0.5 * (xq @ ridge(np.delete(xa, j, 0), np.delete(y, j), wd) - yq) ** 2 - base
                    for j in range(len(y))])  # [N, M]
    full = train(study, torch.ones(1, study.n_train, dtype=torch.bool), [0]).params[0]
    scores = parse_method("exact:damping=0", study).scores(study, full[None]).numpy().T  # [N, M]
    pearson = np.corrcoef(scores.ravel(), loo.ravel())[0, 1]
    slope = np.polyfit(scores.ravel(), loo.ravel(), 1)[0]
    assert pearson >= 0.99
    assert 0.9 <= slope <= 1.1


def test_removal_is_a_mask_and_training_is_deterministic(linreg):
    study = linreg[0]
    masks = torch.ones(3, study.n_train, dtype=torch.bool)
    masks[1, 7] = False
    a = measure(study, train(study, masks, [3, 3, 3]).params)
    b = measure(study, train(study, masks[:2], [3, 3]).params)
    assert torch.equal(a[0], a[2])  # same seed, same mask, same batch: identical
    torch.testing.assert_close(a[:2], b, rtol=0, atol=1e-12)  # batch composition does not matter
    assert not torch.allclose(a[0], a[1])  # removing point 7 changes the measurements
