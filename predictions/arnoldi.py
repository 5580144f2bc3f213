"""`arnoldi`: influence through a low-rank eigendecomposition of the Gauss-Newton matrix (Schioppa et al. 2022).

Lanczos (the Arnoldi iteration of a symmetric operator) on the matrix-free products G V of
`gauss_newton_vector_product` gives the top-`rank` eigenpairs G ≈ U diag(g) Uᵀ. The damped inverse is applied in
that basis, and the complement is left to the damping alone:

    (G + sI)⁻¹ v ≈ U diag(1 / (g + s)) Uᵀ v + (v − U Uᵀ v) / s,      s = wd + λ.

Why damping-only on the complement rather than dropping it (Schioppa et al. project onto U): the complement's
eigenvalues lie in [0, g_rank], so 1/s is their exact inverse where they are ≪ s and an overestimate elsewhere,
while dropping sets every one of them to 0; damping-only keeps the estimate the exact inverse of the
positive-definite G_r + sI, G_r ⪯ G, and agreed better with `exact` on digits-mlp (seed-0 model, 400 Lanczos
steps; Pearson damping-only / dropped: rank 50 0.79 / 0.61, rank 100 0.93 / 0.80, rank 200 0.996 / 0.96). The
default, rank 200 from 300 steps, is the rank at which `tests/test_curvature_methods.py` requires Pearson ≥ 0.9
with `exact` on digits-mlp.

`complement="drop"` projects instead (Schioppa et al.): (G + sI)⁻¹ v ≈ U diag(1 / (g + s)) Uᵀ v. It is the choice
when the rank is far below G's effective rank: on the reversal GPT-2 (rank 40 of 112,896 parameters, the 40th Ritz
value 2.5 against s = 0.02) the damping-only complement multiplies every uncaptured direction by up to 125× the true
inverse and decides the prediction, and the predicted forward effect of removing a fact had the wrong sign (reports/
RESULTS.md, "reversal: the wrong sign")."""

from __future__ import annotations

import torch
from torch import Tensor

from predictions.influence import Operator, Progress, gauss_newton_vector_product
from retrain.curvature import embed
from retrain.study import Study


def lanczos(apply: Operator, size: int, dtype: torch.dtype, iterations: int, seed: int,
            device: torch.device | str = "cpu", progress: Progress | None = None) -> tuple[Tensor, Tensor]:
    """Ritz pairs of a symmetric operator on R^size after `iterations` Lanczos steps with full
    reorthogonalisation: eigenvalues [k] (descending) and orthonormal eigenvectors [size, k], k ≤ iterations
    (fewer when the Krylov space is exhausted), on `device` (the start vector drawn on the CPU; the tridiagonal's
    eigendecomposition in float32 at least: torch has none in bfloat16); each step is reported to `progress` as
    1/iterations."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(size, 1, dtype=dtype, generator=generator).to(device)
    basis = [q / q.norm()]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for _ in range(min(iterations, size)):
        if progress is not None:
            progress(1 / iterations)
        w = apply(basis[-1])
        alphas.append((basis[-1] * w).sum())
        stacked = torch.cat(basis, 1)
        for _ in range(2):  # twice is enough (Kahan): orthogonality to machine precision
            w = w - stacked @ (stacked.T @ w)
        beta = w.norm()
        if beta <= 1e-10 * alphas[0].abs().clamp(min=1e-30):
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    tridiagonal = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal.to(torch.promote_types(tridiagonal.dtype, torch.float32)))
    values, vectors = values.to(dtype), vectors.to(dtype)
    order = values.argsort(descending=True)
    return values[order], torch.cat(basis[:k], 1) @ vectors[:, order]


def arnoldi_inverse(study: Study, theta: Tensor, damping: float, rank: int = 200, iterations: int = 300,
                    seed: int = 0, complement: str = "damping", scope: Tensor | None = None,
                    progress: Progress | None = None) -> Operator:
    """V [P, K] ↦ (G_r + sI)⁻¹ V with G_r the top-`rank` Ritz pairs of G after `iterations` Lanczos steps from a
    `seed`ed random start (at most `iterations` pairs exist), s = wd + λ, the complement damping-only
    (`complement="damping"`) or dropped (`"drop"`: the projection U diag(1/(g + s)) Uᵀ V; module docstring). Ritz
    values below 0 (rounding) are clipped to 0. With `scope` (indices into θ) the same of the block G_SS, on
    V [|S|, K]. The Lanczos steps are reported to `progress`."""
    shift = study.recipe.weight_decay + damping

    def product(v: Tensor) -> Tensor:
        gv = gauss_newton_vector_product(study, theta, embed(v, scope, theta.numel()))
        return gv if scope is None else gv[scope]

    size = theta.numel() if scope is None else len(scope)
    values, vectors = lanczos(product, size, theta.dtype, iterations, seed, theta.device, progress)
    values, vectors = values[:rank].clamp(min=0), vectors[:, :rank]

    def solve(v: Tensor) -> Tensor:
        coefficients = vectors.T @ v
        kept = vectors @ (coefficients / (values + shift)[:, None])
        return kept if complement == "drop" else kept + (v - vectors @ coefficients) / shift

    return solve
