"""Curvature of the training objective at a trained model, shared by estimators and the PBRF solver."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from retrain.study import Study

EXPLICIT_MAX_PARAMS = 20_000  # above this, P×P matrices are not formed


def gauss_newton(study: Study, theta: Tensor, chunk: int = 256) -> Tensor:
    """G = (1/N) Σ_i J_iᵀ ∇²_f L(f_i, y_i) J_i, J_i = ∂f(x_i)/∂θ, [P, P] (PSD for losses convex in f)."""
    if theta.numel() > EXPLICIT_MAX_PARAMS:
        raise ValueError(f"{theta.numel()} parameters is too many for an explicit P×P curvature")
    x, y = study.tensors("train")
    out = lambda th, xi: study.flat(th, xi[None])[0].reshape(-1)  # noqa: E731
    g = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for s in range(0, len(y), chunk):
        xc, yc = x[s : s + chunk], y[s : s + chunk]
        jac = vmap(jacrev(out), (None, 0))(theta, xc)  # [b, C, P]
        h_out = output_hessians(study, study.flat(theta, xc), yc)  # [b, C, C]
        g += torch.einsum("bcp,bcd,bdq->pq", jac, h_out, jac)
    return g / len(y)


def output_hessians(study: Study, outputs: Tensor, targets: Tensor) -> Tensor:
    """∇²_f L(f_i, y_i) per example, [b, C, C], C = the number of outputs of one example (flattened)."""
    shape = outputs.shape[1:]
    loss_of_output = lambda f, yi: study.loss(f.reshape(shape)[None], yi[None])[0]  # noqa: E731
    return vmap(hessian(loss_of_output))(outputs.reshape(len(outputs), -1), targets)


def damped_gauss_newton(study: Study, theta: Tensor, damping: float) -> Tensor:
    """G + (wd + λ)·I: the curvature of the training objective, damped by λ."""
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    return gauss_newton(study, theta) + (study.recipe.weight_decay + damping) * eye


_INVERSES: OrderedDict[tuple[str, str, float], Tensor] = OrderedDict()


def inverse_curvature(study: Study, theta: Tensor, damping: float, keep: int = 8) -> Tensor:
    """(G + (wd + λ)I)⁻¹ at θ, kept for the last `keep` (study, θ, λ): estimators and the PBRF solver of
    the same seed model share one inversion."""
    key = (study.study_hash, hashlib.sha1(theta.detach().numpy().tobytes()).hexdigest(), float(damping))
    if key not in _INVERSES:
        _INVERSES[key] = torch.linalg.inv(damped_gauss_newton(study, theta, damping))
        while len(_INVERSES) > keep:
            _INVERSES.popitem(last=False)
    _INVERSES.move_to_end(key)
    return _INVERSES[key]
