"""The `frozen` regime: only a scope's parameters move; the others stay bit for bit at their start under every
optimizer (weight decay and AdamW's decoupled decay included), and on ridge regression the retraining is the exact
refit of the scope, which scoped influence predicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.configs import RegisterConfig
from flows.pipeline import plan
from predictions import parse_method
from retrain import Recipe, load_study, train
from retrain.regimes import Job, parse_regime
from retrain.studies.linreg import LinReg
from store import InputError


def ridge_recipe(optimizer: str, **fields) -> LinReg:
    """linreg trained by minibatches under `optimizer` with weight decay (and clipping), instead of Newton."""
    recipe = Recipe(optimizer=optimizer, epochs=4, lr=0.05, momentum=0.9, batch_size=32, weight_decay=0.1,
                    seeds=2, warm_epochs=3, max_grad_norm=0.5, **fields)
    return type("MinibatchLinReg", (LinReg,), {"recipe": recipe})()


@pytest.mark.parametrize("optimizer", ["sgd", "sgd:nesterov=true", "adamw"])
@pytest.mark.parametrize("start", ["init", "full"])
@pytest.mark.parametrize("scope", ["weight", "bias"])
def test_frozen_parameters_stay_bit_for_bit_at_their_start(optimizer, start, scope):
    study = ridge_recipe(optimizer)
    regime = parse_regime(f"frozen:scope={scope},from={start}")
    full = {s: study.init_params(s) + 0.3 for s in range(2)}  # any full-data model, distinct from the init
    begin = torch.stack([full[s] if start == "full" else study.init_params(s) for s in range(2)])
    masks = torch.ones(2, study.n_train, dtype=torch.bool)
    masks[1, :5] = False
    theta = regime.train(study, masks, [0, 1], full).params
    moving = torch.zeros(study.flat.n_params, dtype=torch.bool)
    moving[:10] = scope == "weight"
    moving[10:] = scope == "bias"
    assert torch.equal(theta[:, ~moving], begin[:, ~moving])  # bit for bit, decay included
    assert (theta[:, moving] != begin[:, moving]).all()  # the scope did train
    unfrozen = parse_regime("scratch" if start == "init" else "warm").train(study, masks, [0, 1], full).params
    assert not torch.equal(unfrozen[:, ~moving], begin[:, ~moving])  # without the scope they would have moved


def test_the_regime_is_named_by_its_options_and_refuses_a_missing_or_empty_scope():
    assert parse_regime("frozen:from=full,scope=weight").label == "frozen:scope=weight,from=full"
    assert parse_regime("frozen:scope=weight").label == "frozen:scope=weight"  # from=init is the default
    with pytest.raises(InputError, match="name the trainable parameters"):
        parse_regime("frozen")
    with pytest.raises(InputError, match="from=later is not one of init, full"):
        parse_regime("frozen:scope=weight,from=later")
    with pytest.raises(InputError, match="matches none of linreg's parameters"):
        parse_regime("frozen:scope=attn").check(load_study("linreg"))
    with pytest.raises(InputError, match=r"scope=\(: not a regular expression"):
        plan(RegisterConfig("unused.duckdb", "linreg"), ["scratch", "frozen:scope=(,from=full"])  # before any write


def refit_weights(x: np.ndarray, y: np.ndarray, bias: float, wd: float) -> np.ndarray:
    """argmin_w mean ½(xᵀw + b − y)² + (wd/2)‖w‖² with the bias b held fixed (closed form)."""
    return np.linalg.solve(x.T @ x / len(y) + wd * np.eye(x.shape[1]), x.T @ (y - bias) / len(y))


def test_scoped_influence_predicts_the_frozen_refit_of_ridge_regression():
    study = load_study("linreg")
    x, y = (t.numpy() for t in study.tensors("train"))
    xq, yq = (t.numpy() for t in study.tensors("query"))
    wd = study.recipe.weight_decay
    full = train(study, torch.ones(1, study.n_train, dtype=torch.bool), [0]).params[0]
    singles = list(range(0, study.n_train, 7))
    jobs = [Job("full", 0, ()), *(Job(f"s{j}", 0, (j,)) for j in singles)]
    runs = parse_regime("frozen:scope=weight,from=full").run(study, jobs, {0: full})
    values = np.array([[r.outcomes[m] for m in study.measurement_ids] for r in runs])
    effects = values[1:] - values[0]  # [sets, M]
    bias = float(full[-1])
    refits = np.stack([refit_weights(np.delete(x, j, 0), np.delete(y, j), bias, wd) for j in singles])
    base = 0.5 * (xq @ refit_weights(x, y, bias, wd) + bias - yq) ** 2
    closed = 0.5 * (refits @ xq.T + bias - yq) ** 2 - base
    np.testing.assert_allclose(effects, closed, atol=1e-10)  # the frozen regime is the exact refit of the scope
    method = parse_method("exact:scope=weight", study)
    predicted = method.scores(study, full[None]).numpy().T[singles]  # [sets, M]
    unscoped = parse_method("exact", study).scores(study, full[None]).numpy().T[singles]
    pearson = np.corrcoef(predicted.ravel(), effects.ravel())[0, 1]
    assert pearson >= 0.99
    assert np.abs(predicted - effects).max() < np.abs(unscoped - effects).max()  # the scope is what predicts it


def test_the_reversal_figure_leaves_blank_the_regimes_a_scoped_method_is_not_scored_against(tmp_path):
    from reports.reversal import reversal_figure

    row = {"entity_group": "Both", "template": "heldout", "statistic": "margin", "pooled": False,
           "predicted_ratio": 0.7, "actual_ratio": 0.8, "ratio_lo": 0.6, "ratio_hi": 1.0}
    rows = [{**row, "method": "arnoldi", "regime": "warm"},
            {**row, "method": "arnoldi:scope=h\\.0\\.", "regime": "frozen:scope=h\\.0\\.,from=full"}]
    reversal_figure(rows, tmp_path / "reversal.png")  # two of the four panels have no rows
    assert (tmp_path / "reversal.png").stat().st_size > 0
