"""Curvature of the training objective at a trained model, shared by estimators and the PBRF solver."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vmap

from retrain.study import Study, tensor_bytes
from store.records import InputError

EXPLICIT_MAX_PARAMS = 20_000  # above this, P×P matrices are not formed


def scope_mask(study: Study, pattern: str) -> Tensor:
    """The parameters a scope lets move, as a mask over the flat θ [P]: the pieces of every parameter whose
    `named_parameters` name `pattern` matches (`re.search`; the empty pattern matches every name). A parameter
    shared by several modules (tied weights) is named once, by its first name. Refuses (InputError) a pattern that
    is not a regular expression or matches no name, in one line that lists the names."""
    flat = study.flat
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise InputError(f"scope={pattern}: not a regular expression ({error})") from None
    chosen = [regex.search(name) is not None for name in flat.names]
    if not any(chosen):
        raise InputError(f"scope={pattern} matches none of {study.name}'s parameters; give a regular expression "
                         f"searched in their names: {', '.join(flat.names)}")
    return torch.cat([torch.full((size,), keep) for keep, size in zip(chosen, flat.sizes)])


def embed(vectors: Tensor, scope: Tensor | None, size: int) -> Tensor:
    """V [|S|, K] on the scope's coordinates (indices into θ; None: all) as [size, K], zero outside the scope."""
    if scope is None:
        return vectors
    return vectors.new_zeros(size, *vectors.shape[1:]).index_copy_(0, scope.to(vectors.device), vectors)


def gauss_newton(study: Study, theta: Tensor, chunk: int = 256) -> Tensor:
    """G = (1/N) Σ_i J_iᵀ ∇²_f L(f_i, y_i) J_i, J_i = ∂f(x_i)/∂θ, [P, P] (PSD for losses convex in f)."""
    if theta.numel() > EXPLICIT_MAX_PARAMS:
        raise ValueError(f"{theta.numel()} parameters is too many for an explicit P×P curvature")
    x, y = study.tensors("train")
    out = lambda th, xi: study.flat(th, xi[None])[0].reshape(-1)  # noqa: E731
    g = theta.new_zeros(theta.numel(), theta.numel())
    for s in range(0, len(y), chunk):
        xc, yc = x[s : s + chunk], y[s : s + chunk]
        jac = vmap(jacrev(out), (None, 0))(theta, xc)  # [b, C, P]
        h_out = output_hessians(study, study.flat(theta, xc), yc)  # [b, C, C]
        g += torch.einsum("bcp,bcd,bdq->pq", jac, h_out, jac)
    return g / len(y)


def output_hessians(study: Study, outputs: Tensor, targets: Tensor) -> Tensor:
    """∇²_f L(f_i, y_i) per example, [b, C, C], C = the number of outputs of one example (flattened). An example's
    loss depends on its own outputs only, so ∇²_f Σ_i L(f_i, y_i) is block diagonal and its product with e_c in
    every example's block gives column c of every H_i at once: C forward-over-reverse products of the batch's
    summed loss (one per output, not one Hessian per example)."""
    flat = outputs.reshape(len(outputs), -1)
    summed = lambda f: study.loss(f.reshape(outputs.shape), targets).sum()  # noqa: E731
    column = lambda e: jvp(grad(summed), (flat,), (e,))[1]  # noqa: E731
    basis = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)[:, None, :].expand(-1, len(flat), -1)
    return vmap(column)(basis).permute(1, 2, 0)  # [c, i] is H_i e_c: [C, b, C] -> [b, C, C]


def damped_gauss_newton(study: Study, theta: Tensor, damping: float) -> Tensor:
    """G + (wd + λ)·I: the curvature of the training objective, damped by λ."""
    eye = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    return gauss_newton(study, theta) + (study.recipe.weight_decay + damping) * eye


_INVERSES: OrderedDict[tuple[str, str, float, str], Tensor] = OrderedDict()
INVERSES_KEPT = 8


@contextlib.contextmanager
def cold_inverses() -> Iterator[None]:
    """Within it, no inverse kept from before is reused (a method's measured cost is then its own: `exact:models=1`
    after `exact` inverts again); afterwards the ones from before are kept again beside the new ones."""
    before = _INVERSES.copy()
    _INVERSES.clear()
    try:
        yield
    finally:
        made = _INVERSES.copy()
        _INVERSES.clear()
        _INVERSES.update(before)
        _INVERSES.update(made)  # the newest last
        while len(_INVERSES) > INVERSES_KEPT:
            _INVERSES.popitem(last=False)


def inverse_curvature(study: Study, theta: Tensor, damping: float, scope: Tensor | None = None,
                      keep: int = INVERSES_KEPT) -> Tensor:
    """(G + (wd + λ)I)⁻¹ at θ, or with `scope` (indices into θ) the inverse of its block (G_SS + (wd + λ)I)⁻¹
    [|S|, |S|]; kept for the last `keep` (study, θ, λ, scope): estimators and the PBRF solver of the same seed
    model share one inversion. Refused (InputError) in bfloat16, which torch cannot invert."""
    if theta.dtype == torch.bfloat16:
        raise InputError(f"{study.name}: the explicit curvature inverse needs float32 or float64, the study is "
                         "bfloat16; use a matrix-free method (cg, lissa, arnoldi, ekfac, grad_dot)")
    digest = lambda t: hashlib.sha1(tensor_bytes(t)).hexdigest()  # noqa: E731
    key = (study.study_hash, digest(theta), float(damping), "" if scope is None else digest(scope))
    if key not in _INVERSES:
        curvature = damped_gauss_newton(study, theta, damping)
        _INVERSES[key] = torch.linalg.inv(curvature if scope is None else curvature[scope][:, scope])
        while len(_INVERSES) > keep:
            _INVERSES.popitem(last=False)
    _INVERSES.move_to_end(key)
    return _INVERSES[key]
