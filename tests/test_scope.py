"""Parameter scope (`scope=REGEX`): influence restricted to the matching parameters, whose curvature is the block
G_SS + (wd + λ)I. Checked against the explicit restricted solve on digits-mlp, for every curvature method."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from predictions import parse_method
from predictions.ekfac import ekfac_inverse
from predictions.influence import measurement_gradients, train_gradients
from retrain import Study, load_study, train
from retrain.curvature import gauss_newton, scope_mask
from store.records import InputError

LAST_LAYER = r"^2\."  # digits-mlp: 0.weight, 0.bias, 2.weight, 2.bias


def pearson(a: Tensor, b: Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def method_scores(study: Study, theta: Tensor, spec: str) -> Tensor:
    return parse_method(spec, study).scores(study, theta[None])


@pytest.fixture(scope="module")
def digits() -> tuple[Study, Tensor, Tensor, Tensor]:
    """digits-mlp, its seed-0 model, the last layer's indices, and the explicit restricted scores
    (1/N) ∇L_j,Sᵀ (G_SS + (wd + λ)I)⁻¹ ∇m_S."""
    study = load_study("digits-mlp")
    theta = train(study, torch.ones(1, study.n_train), [0]).params[0]
    scope = scope_mask(study, LAST_LAYER).nonzero().squeeze(1)
    block = gauss_newton(study, theta)[scope][:, scope]
    shift = study.recipe.weight_decay + study.recipe.damping
    solved = torch.linalg.solve(block + shift * torch.eye(len(scope), dtype=block.dtype),
                                measurement_gradients(study, theta)[:, scope].T)
    return study, theta, scope, (train_gradients(study, theta)[:, scope] @ solved).T / study.n_train


def test_scope_mask_selects_parameters_by_name_and_refuses_what_matches_nothing():
    study = load_study("linreg")
    sizes = dict(zip(study.flat.names, study.flat.sizes))
    assert scope_mask(study, "").all()
    mask = scope_mask(study, "bias$")
    assert mask.sum() == sizes["bias"] and mask[-sizes["bias"]:].all()  # θ holds weight, then bias
    with pytest.raises(InputError, match=r"matches none of linreg's parameters.*: weight, bias"):
        scope_mask(study, "transformer")
    with pytest.raises(InputError, match="not a regular expression"):
        parse_method("cg:scope=(", study)
    method = parse_method("cg:scope=bias", study)
    assert method.config["scope"] == "bias" and method.label == "cg:scope=bias"
    assert parse_method("cg", study).scope is None  # the default scope is every parameter, no restriction


def test_scoped_exact_equals_the_explicit_restricted_solve(digits):
    study, theta, scope, expected = digits
    scoped = method_scores(study, theta, f"exact:scope={LAST_LAYER}")
    torch.testing.assert_close(scoped, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())
    assert pearson(method_scores(study, theta, "exact"), expected) < 0.99  # the scope changes the prediction


def test_matrix_free_methods_solve_the_restricted_block(digits):
    study, theta, scope, expected = digits
    cg = method_scores(study, theta, f"cg:scope={LAST_LAYER},iterations=400,tol=1e-10")
    torch.testing.assert_close(cg, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    # Lanczos on the 330 scoped coordinates exhausts the space: every eigenpair, the exact inverse
    arnoldi = method_scores(study, theta, f"arnoldi:scope={LAST_LAYER},rank=330,iterations=330")
    torch.testing.assert_close(arnoldi, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    assert pearson(method_scores(study, theta, f"lissa:scope={LAST_LAYER}"), expected) >= 0.99


def test_scoped_ekfac_keeps_the_layers_inside_the_scope(digits):
    study, theta, scope, _ = digits
    damping = study.recipe.damping
    v = torch.randn(len(scope), 3, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    whole = torch.zeros(theta.numel(), 3, dtype=theta.dtype).index_copy_(0, scope, v)
    # the approximation is block-diagonal over layers: a whole layer's block is the full operator's block
    torch.testing.assert_close(ekfac_inverse(study, theta, damping, scope=scope)(v),
                               ekfac_inverse(study, theta, damping)(whole)[scope])
    # a scope that splits a layer leaves its parameters to the diagonal of G
    weight = scope_mask(study, r"^2\.weight").nonzero().squeeze(1)
    u = torch.randn(len(weight), 3, dtype=theta.dtype, generator=torch.Generator().manual_seed(1))
    diagonal = torch.diagonal(gauss_newton(study, theta))[weight] + study.recipe.weight_decay + damping
    torch.testing.assert_close(ekfac_inverse(study, theta, damping, scope=weight)(u), u / diagonal[:, None])
    ekfac = method_scores(study, theta, f"ekfac:scope={LAST_LAYER}")
    assert ekfac.shape == (len(study.measurement_ids), study.n_train)
