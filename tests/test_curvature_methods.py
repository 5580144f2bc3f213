"""`arnoldi` and `ekfac` against the explicit damped Gauss-Newton solve (`exact`): exact where their approximation
is exact by construction, and in agreement on digits-mlp; scores are a parsed method's, as production computes."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from predictions import parse_method
from predictions.arnoldi import arnoldi_inverse, lanczos
from predictions.ekfac import ekfac_inverse
from retrain import Recipe, Study, load_study, train
from retrain.curvature import gauss_newton
from store.records import InputError


def pearson(a: Tensor, b: Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def full_model(study: Study) -> Tensor:
    return train(study, torch.ones(1, study.n_train), [0]).params[0]


def method_scores(study: Study, theta: Tensor, spec: str) -> Tensor:
    """The scores [M, N] of the method `spec` from the one model θ."""
    return parse_method(spec, study).scores(study, theta[None])


class Toy(Study):
    """Softmax regression on 40 random points through `layer` (3 inputs -> 4 classes), or a layer the
    estimators do not know (`Scale`)."""

    name = "toy"
    recipe = Recipe(epochs=30, lr=0.1, batch_size=10, seeds=1, damping=1e-2)

    def __init__(self, layer: type[nn.Module]):
        self.layer = layer

    def dataset(self) -> DatasetDict:
        g = torch.Generator().manual_seed(0)
        split = lambda n: Dataset.from_dict({"x": torch.randn(n, 4, generator=g).tolist(),  # noqa: E731
                                             "y": torch.randint(0, 4, (n,), generator=g).tolist()})
        return DatasetDict(train=split(40), query=split(5))

    def model(self) -> nn.Module:
        return self.layer(4, 4)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")


class Scale(nn.Module):
    """f = x ⊙ w + b: parameters outside any Linear or Conv1D layer."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(outputs)), nn.Parameter(torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w + self.b


@pytest.fixture(scope="module")
def digits() -> tuple[Study, Tensor, Tensor]:
    study = load_study("digits-mlp")
    theta = full_model(study)
    return study, theta, method_scores(study, theta, "exact")


def test_lanczos_finds_the_top_eigenpairs():
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))[0]
    spectrum = torch.logspace(1, -6, 60, dtype=torch.float64)
    matrix = q @ torch.diag(spectrum) @ q.T
    values, vectors = lanczos(lambda v: matrix @ v, 60, torch.float64, 40, seed=1)
    torch.testing.assert_close(values[:5], spectrum[:5])
    torch.testing.assert_close((vectors[:, :5].T @ q[:, :5]).abs(), torch.eye(5, dtype=torch.float64))
    # a full Krylov space reproduces the matrix
    values, vectors = lanczos(lambda v: matrix @ v, 60, torch.float64, 60, seed=1)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, matrix)


def test_arnoldi_complement_is_damping_only_or_dropped():
    """With the top 3 eigenpairs, `damping` adds (I − UUᵀ)/s to the projection U diag(1/(g + s)) Uᵀ that `drop`
    keeps alone; with all Lanczos finds, `damping` is exact (G's null space, where Lanczos stops, gets 1/s)."""
    study = Toy(nn.Linear)
    theta = full_model(study)
    shift = study.recipe.weight_decay + study.recipe.damping
    curvature = gauss_newton(study, theta)
    values, vectors = torch.linalg.eigh(curvature)
    top = vectors[:, -3:]
    projection = top @ torch.diag(1 / (values[-3:] + shift)) @ top.T
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    v = torch.randn(theta.numel(), 2, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    solve = lambda rank, complement: arnoldi_inverse(study, theta, study.recipe.damping, rank,  # noqa: E731
                                                     theta.numel(), 0, complement)(v)
    torch.testing.assert_close(solve(theta.numel(), "damping"), torch.linalg.solve(curvature + shift * eye, v))
    torch.testing.assert_close(solve(3, "drop"), projection @ v)
    torch.testing.assert_close(solve(3, "damping"), (projection + (eye - top @ top.T) / shift) @ v)


def test_ekfac_is_exact_for_one_linear_layer_with_one_output():
    """One linear layer with a scalar output: G = (1/N) Σ a aᵀ · h is a Kronecker product, so EK-FAC is exact."""
    study = load_study("linreg")
    theta = full_model(study)
    exact = method_scores(study, theta, "exact")
    torch.testing.assert_close(method_scores(study, theta, "ekfac"), exact, rtol=1e-8, atol=1e-14)


def test_ekfac_reads_conv1d_weights_transposed():
    linear, conv = Toy(nn.Linear), Toy(Conv1D)
    theta = full_model(linear)
    weight, bias = theta[:16].reshape(4, 4), theta[16:]
    conv_theta = torch.cat([weight.T.reshape(-1), bias])  # Conv1D stores [in, out]
    torch.testing.assert_close(conv.flat(conv_theta, conv.tensors("train")[0]),
                               linear.flat(theta, linear.tensors("train")[0]))
    torch.testing.assert_close(method_scores(conv, conv_theta, "ekfac:damping=0.01"),
                               method_scores(linear, theta, "ekfac:damping=0.01"))


def test_ekfac_falls_back_to_the_gauss_newton_diagonal_outside_supported_layers():
    study = Toy(Scale)
    theta = full_model(study)
    vectors = torch.randn(theta.numel(), 3, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    shift = study.recipe.weight_decay + study.recipe.damping
    expected = vectors / (torch.diagonal(gauss_newton(study, theta)) + shift)[:, None]
    torch.testing.assert_close(ekfac_inverse(study, theta, study.recipe.damping)(vectors), expected)


def test_sampled_output_factor_approaches_the_exact_one():
    study = Toy(nn.Linear)
    theta = full_model(study)
    exact = method_scores(study, theta, "ekfac:damping=0.01")
    assert pearson(method_scores(study, theta, "ekfac:damping=0.01,samples=1"), exact) < pearson(
        method_scores(study, theta, "ekfac:damping=0.01,samples=200"), exact)
    assert pearson(method_scores(study, theta, "ekfac:damping=0.01,samples=200"), exact) > 0.99


def test_arnoldi_agrees_with_exact_on_digits_at_rank_200(digits):
    study, theta, exact = digits
    scores = method_scores(study, theta, "arnoldi")  # defaults: rank 200 from 300 Lanczos steps
    assert scores.shape == exact.shape
    assert pearson(scores, exact) >= 0.9
    assert pearson(method_scores(study, theta, "arnoldi:rank=20,iterations=40"), exact) < pearson(
        scores, exact)


def test_ekfac_agrees_with_exact_on_digits_better_than_grad_dot(digits):
    study, theta, exact = digits
    agreement = pearson(method_scores(study, theta, "ekfac"), exact)
    print(f"ekfac vs exact on digits-mlp (seed 0): Pearson {agreement:.3f}")
    assert agreement > pearson(method_scores(study, theta, "grad_dot"), exact) + 0.2


def test_parse_arnoldi_and_ekfac_options(digits):
    study = digits[0]
    arnoldi = parse_method("arnoldi:rank=50,iterations=80", study)
    assert arnoldi.config == {"models": study.recipe.seeds, "scope": "", "side": "measurements",
                              "damping": study.recipe.damping, "rank": 50, "iterations": 80, "seed": 0,
                              "complement": "damping"}
    assert arnoldi.label == "arnoldi:rank=50,iterations=80"
    assert parse_method("arnoldi:complement=drop", study).config["complement"] == "drop"
    assert parse_method("ekfac:samples=2", study).config["samples"] == 2
    for bad in ("arnoldi:rank=0", "arnoldi:rank=2.5", "ekfac:samples=-1", "ekfac:rank=3"):
        with pytest.raises(InputError):
            parse_method(bad, study)
