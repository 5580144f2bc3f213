"""Influence estimators. Every method returns scores [M, N]: the predicted effect on measurement m
of removing training point j, Δ̂_mj = (1/N) ∇m(θ*)ᵀ (H + λI)⁻¹ ∇L(z_j, θ*), H = G + wd·I with G the
Gauss-Newton matrix of the mean training loss (sign: effect = m(without) − m(full))."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from retrain.curvature import damped_gauss_newton
from retrain.study import Study


def train_gradients(study: Study, theta: Tensor) -> Tensor:
    """Per-example training-loss gradients ∇L(z_j, θ), [N, P]."""
    x, y = study.tensors("train")
    one = lambda th, xi, yi: study.loss(study.flat(th, xi[None]), yi[None])[0]  # noqa: E731
    return vmap(jacrev(one), (None, 0, 0))(theta, x, y)


def measurement_gradients(study: Study, theta: Tensor) -> Tensor:
    """∇m(θ) for every measurement, [M, P]."""
    return jacrev(lambda th: study.measure(study.forward(th)))(theta)


def exact_scores(study: Study, theta: Tensor, damping: float) -> Tensor:
    """Explicit damped Gauss-Newton solve: [M, N] scores (see module docstring)."""
    curvature = damped_gauss_newton(study, theta, damping)
    solved = torch.linalg.solve(curvature, measurement_gradients(study, theta).T)  # [P, M]
    return (train_gradients(study, theta) @ solved).T / study.n_train
