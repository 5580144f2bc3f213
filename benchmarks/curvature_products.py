"""The curvature pieces every curvature method is built from, timed side by side in one run (a benchmark, not a
test; run it on an otherwise idle machine):

- output Hessians ∇²_f L(f_i, y_i) of every training example: `output_hessians` (C forward-over-reverse products of
  the batch's summed loss) against one `vmap(hessian)` per example, the way they were formed before;
- Gauss-Newton products G V for K = 100 columns: the default chunk (`gauss_newton_vector_product`) against the
  former rule, `EXAMPLE_COLUMNS` // K examples a pass;
- the explicit G of digits-mlp and its damped inverse (what `exact` forms once per model).

    PYTHONPATH=. .venv/bin/python benchmarks/curvature_products.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from torch.func import hessian, vmap

from predictions.influence import EXAMPLE_COLUMNS, gauss_newton_vector_product
from retrain import load_study
from retrain.curvature import damped_gauss_newton, output_hessians


def seconds(work: Callable[[], object], repeats: int = 3) -> float:
    """The best of `repeats` wall times of `work` (after one warm-up call)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def per_example_hessians(study, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    shape = outputs.shape[1:]
    loss = lambda f, yi: study.loss(f.reshape(shape)[None], yi[None])[0]  # noqa: E731
    return vmap(hessian(loss))(outputs.reshape(len(outputs), -1), targets)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    digits = load_study("digits-mlp")
    theta = digits.init_params(0)
    x, y = digits.tensors("train")
    outputs = digits.flat(theta, x).detach()
    new = seconds(lambda: output_hessians(digits, outputs, y))
    old = seconds(lambda: per_example_hessians(digits, outputs, y))
    gap = (output_hessians(digits, outputs, y) - per_example_hessians(digits, outputs, y)).abs().max().item()
    print(f"output Hessians, digits-mlp ({len(y)} examples): {new:.3f} s against {old:.3f} s per example "
          f"({old / new:.1f}x faster; max difference {gap:.1e})")
    for name in ("linreg", "digits-mlp"):
        study = load_study(name)
        th = study.init_params(0)
        v = torch.randn(th.numel(), 100, dtype=th.dtype, generator=torch.Generator().manual_seed(0))
        product = lambda chunk=None, s=study, t=th, v=v: gauss_newton_vector_product(s, t, v, chunk=chunk)  # noqa: E731
        new = seconds(product)
        old = seconds(lambda: product(EXAMPLE_COLUMNS // 100))  # noqa: B023 (called at once)
        a, b = product(), product(EXAMPLE_COLUMNS // 100)
        rel = ((a - b).abs().max() / b.abs().max()).item()
        print(f"Gauss-Newton product, {name}, K = 100: {new:.4f} s against {old:.4f} s in chunks of "
              f"{EXAMPLE_COLUMNS // 100} ({old / new:.1f}x faster; max relative difference {rel:.1e})")
    formed = seconds(lambda: damped_gauss_newton(digits, theta, 1e-3), repeats=1)
    curvature = damped_gauss_newton(digits, theta, 1e-3)
    inverted = seconds(lambda: torch.linalg.inv(curvature), repeats=1)
    print(f"explicit damped G of digits-mlp (P = {theta.numel()}): formed in {formed:.2f} s, inverted in "
          f"{inverted:.2f} s")


if __name__ == "__main__":
    main()
