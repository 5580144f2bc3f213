"""Influence estimators against the explicit damped Gauss-Newton solve (`exact`), and against the closed form of
ridge regression; every estimate is what production computes, a parsed method's `scores` of one model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_digits
from torch import Tensor

from predictions import parse_method
from predictions.influence import cg_inverse_product, gauss_newton_vector_product, influence_scores, self_influence
from retrain import Study, load_study, train
from retrain.curvature import factorised, gauss_newton, jacobian_gauss_newton, linear_gauss_newton
from store.records import InputError


def pearson(a: Tensor, b: Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def max_relative_error(estimate: Tensor, exact: Tensor) -> float:
    return ((estimate - exact).abs().max() / exact.abs().max()).item()


def full_model(study: Study) -> Tensor:
    return train(study, torch.ones(1, study.n_train), [0]).params[0]


def scores(study: Study, theta: Tensor, spec: str) -> Tensor:
    """The scores [M, N] of the method `spec` from the one model θ."""
    return parse_method(spec, study).scores(study, theta[None])


@pytest.fixture(scope="module")
def linreg() -> tuple[Study, Tensor, Tensor]:
    study = load_study("linreg")
    theta = full_model(study)
    return study, theta, scores(study, theta, "exact")


@pytest.fixture(scope="module")
def digits() -> tuple[Study, Tensor, Tensor]:
    study = load_study("digits-mlp")
    theta = full_model(study)
    return study, theta, scores(study, theta, "exact")


@pytest.fixture(scope="module")
def digits_cg(digits) -> Tensor:
    study, theta, _ = digits
    return scores(study, theta, "cg")


@pytest.mark.full  # seconds of solves or training: the full tier (make test-fast stays quick)
def test_cg_and_lissa_match_exact_on_ridge(linreg):
    study, theta, exact = linreg
    cg = scores(study, theta, "cg")
    assert cg.shape == exact.shape == (100, study.n_train)
    assert max_relative_error(cg, exact) < 1e-6
    # N = 342 < batch_size: LiSSA is the deterministic Neumann series; 2000 terms reach (1 − λ_min/scale)^2000 ≈ 1e-4
    lissa = scores(study, theta, "lissa:iterations=2000")
    assert pearson(lissa, exact) > 0.9999
    assert max_relative_error(lissa, exact) < 1e-3


def test_grad_dot_is_not_influence_on_ridge(linreg):
    study, theta, exact = linreg
    grad_dot = scores(study, theta, "grad_dot")
    assert grad_dot.shape == exact.shape
    assert 0.3 < pearson(grad_dot, exact) < 0.9  # the same sign convention, a different estimate
    assert max_relative_error(grad_dot, exact) > 0.1


def test_self_influence_matches_ridge_closed_form(linreg):
    study, theta, _ = linreg
    x, y = (t.numpy() for t in study.tensors("train"))
    n, wd = len(y), study.recipe.weight_decay
    features = np.hstack([x, np.ones((n, 1))])  # nn.Linear's parameters: weight, then bias
    hessian = features.T @ features / n + wd * np.eye(features.shape[1])
    optimum = np.linalg.solve(hessian, features.T @ y / n)
    gradients = (features @ optimum - y)[:, None] * features  # ∇ ½(f − y)²
    expected = np.einsum("np,pq,nq->n", gradients, np.linalg.inv(hessian), gradients) / n
    np.testing.assert_allclose(self_influence(study, theta, 0.0).numpy(), expected, rtol=1e-8, atol=1e-14)


@pytest.mark.full  # seconds of solves or training: the full tier (make test-fast stays quick)
def test_lissa_is_deterministic_given_seed_and_refuses_divergence(linreg):
    study, theta, _ = linreg
    run = lambda seed: scores(study, theta, f"lissa:damping=0,iterations=20,batch_size=32,seed={seed}")  # noqa: E731
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    with pytest.raises(ValueError, match="diverged"):
        scores(study, theta, "lissa:damping=0,iterations=300,scale=0.1")


LINEAR_MODELS = {  # model() bodies: the Kronecker form applies to the first two, not to the last three
    "deep": "nn.Sequential(nn.Linear(64, 16, bias=False), nn.Tanh(), nn.Linear(16, 12), nn.Softplus(), "
            "nn.Linear(12, 10))",
    "digits": "nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))",
    "reused": "(lambda hidden: nn.Sequential(nn.Linear(64, 16), nn.Tanh(), hidden, nn.Tanh(), hidden, "
              "nn.Linear(16, 10)))(nn.Linear(16, 16))",
    "normed": "nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10))",
    "outside": "Outside()",  # a layer's weight also used outside the layer's call
}
OUTSIDE = """
        class Outside(nn.Module):
            def __init__(self):
                super().__init__()
                self.first, self.last = nn.Linear(64, 10), nn.Linear(10, 10)

            def forward(self, x):
                return self.last(self.first(x).tanh()) + nn.functional.linear(x[:, :10], self.last.weight)
"""


@pytest.mark.parametrize("model", LINEAR_MODELS)
def test_linear_gauss_newton_is_the_jacobian_form(model, tmp_path):
    """The Kronecker-structured G of Linear layers equals Σ_i J_iᵀ H_i J_i from the per-example Jacobians (float64),
    with and without biases; a layer called twice, a module with parameters of its own, or a weight used outside
    its layer take the Jacobian form."""
    body = f"\n    def model(self):\n        from torch import nn\n{OUTSIDE}\n        return {LINEAR_MODELS[model]}\n"
    (tmp_path / "study.py").write_text(small_digits("digits-linear", body))
    study = load_study(f"{tmp_path / 'study.py'}:SmallDigits")
    theta = study.init_params(0)
    structured, expected = linear_gauss_newton(study, theta), jacobian_gauss_newton(study, theta)
    if model not in ("deep", "digits"):
        assert structured is None
        torch.testing.assert_close(gauss_newton(study, theta), expected, rtol=0, atol=0)
        return
    assert theta.dtype == torch.float64 and structured is not None
    torch.testing.assert_close(structured, expected, rtol=1e-12, atol=1e-14 * expected.abs().max().item())
    assert torch.equal(gauss_newton(study, theta), structured)


def test_factorised_solves_definite_and_indefinite_matrices():
    """The explicit solve is a Cholesky solve of a positive definite curvature and an LU solve of an indefinite one
    (a loss not convex in f); both give A⁻¹V, and a singular matrix is refused as an inversion refuses it."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=generator))
    vectors = torch.randn(30, 4, dtype=torch.float64, generator=generator)
    for spectrum in (torch.linspace(0.1, 3, 30), torch.linspace(-1, 3, 30) + 0.05):
        matrix = basis @ torch.diag(spectrum.double()) @ basis.T
        torch.testing.assert_close(factorised(matrix)(vectors), torch.linalg.solve(matrix, vectors), rtol=1e-10,
                                   atol=1e-12)
    with pytest.raises(RuntimeError):
        factorised(torch.zeros(3, 3, dtype=torch.float64))


def test_preconditioned_cg_converges_in_fewer_steps(digits):
    """CG preconditioned by the top 20 Ritz pairs of G (30 one-column Lanczos steps) is within 1e-3 of `exact`
    after 20 steps, where plain CG is still over 1% off (2.8%); at the default steps it reaches the tolerance."""
    study, theta, exact = digits
    plain, preconditioned = (scores(study, theta, f"cg:iterations=20,precondition={rank}") for rank in (0, 20))
    assert max_relative_error(preconditioned, exact) < 1e-3
    assert max_relative_error(plain, exact) > 1e-2
    assert max_relative_error(scores(study, theta, "cg:precondition=20"), exact) < 1e-5


def test_gauss_newton_vector_product_is_matrix_free_gauss_newton(digits):
    study, theta, _ = digits
    vectors = torch.randn(theta.numel(), 3, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    expected = gauss_newton(study, theta) @ vectors
    torch.testing.assert_close(gauss_newton_vector_product(study, theta, vectors, chunk=300), expected)
    # the default chunk shrinks as the columns grow (EXAMPLE_COLUMNS // K examples per pass): the same product
    many = torch.randn(theta.numel(), 40, dtype=theta.dtype, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gauss_newton_vector_product(study, theta, many), gauss_newton(study, theta) @ many,
                               rtol=1e-10, atol=1e-12)
    # a mean over subsets: the two halves' products, weighted by their sizes, make the full one
    order = torch.randperm(study.n_train, generator=torch.Generator().manual_seed(1))
    first, second = order[:500], order[500:]
    halves = (500 * gauss_newton_vector_product(study, theta, vectors, first)
              + (study.n_train - 500) * gauss_newton_vector_product(study, theta, vectors, second)) / study.n_train
    torch.testing.assert_close(halves, expected)


def test_cg_agrees_with_exact_on_digits(digits, digits_cg):
    _, _, exact = digits
    assert digits_cg.shape == exact.shape == (20, 1437)
    assert pearson(digits_cg, exact) >= 0.95


def test_lissa_agrees_with_exact_on_digits(digits):
    study, theta, exact = digits
    assert pearson(scores(study, theta, "lissa"), exact) >= 0.95


def test_grad_dot_agrees_less_than_cg_on_digits(digits, digits_cg):
    study, theta, exact = digits
    assert pearson(scores(study, theta, "grad_dot"), exact) < pearson(digits_cg, exact)


def test_parse_method_options(linreg):
    study, theta, _ = linreg
    cg = parse_method("cg:iterations=5", study)
    assert cg.config["iterations"] == 5 and isinstance(cg.config["iterations"], int)
    assert isinstance(cg.config["tol"], float)
    lissa = parse_method("lissa:batch_size=64,seed=3,scale=2.5", study)
    assert lissa.config == {"models": study.recipe.seeds, "scope": "", "side": "measurements",
                            "damping": study.recipe.damping, "iterations": 1000, "scale": 2.5, "batch_size": 64,
                            "seed": 3}
    assert parse_method("grad_dot", study).config == {"models": study.recipe.seeds, "scope": "",
                                                      "side": "measurements"}
    assert (cg.label, lissa.label) == ("cg:iterations=5", "lissa:scale=2.5,batch_size=64,seed=3")
    assert parse_method(f"exact:models={study.recipe.seeds}", study).label == "exact"  # defaults are not named
    for bad in ("cg:bogus=1", "grad_dot:damping=1", "cg:iterations=2.5", "lissa:scale=big", "exact:damping=nan",
                "cg:iterations=0", "nope", "cg:side=both"):
        with pytest.raises(InputError):
            parse_method(bad, study)


def test_method_scores_use_the_parsed_options(linreg):
    study, theta, _ = linreg
    method = parse_method("cg:models=1,iterations=3,tol=0", study)
    three_steps = lambda v: cg_inverse_product(study, theta, v, study.recipe.damping, 3, 0.0)  # noqa: E731
    torch.testing.assert_close(method.scores(study, theta[None]), influence_scores(study, theta, three_steps))
