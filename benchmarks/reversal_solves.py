"""Set-side solves on `reversal`: plain CG, spectrally preconditioned CG and arnoldi's ranks, side by side.

The reduced configuration of the every-method table in reports/RESULTS.md (8 entities per group; the first 6
NameToDescription and the first 2 Both entities removed, one group set each; seed-0 full-data model, 216 training
sentences, 112,896 parameters). For each solve of the 8 sets' summed gradients b_S = Σ_{j∈S} ∇L_j:
    - the true relative residual max_S ‖b_S − A x_S‖ / ‖b_S‖, A = G + (wd + λ)I (CG only: arnoldi solves another A);
    - Pearson and max relative error of the set predictions ∇mᵀ x_S / N (every differentiable measurement × set)
      against a reference: CG preconditioned by 100 Lanczos pairs, solved to tol 1e-8;
    - seconds (the preconditioner's and arnoldi's Lanczos steps included).
A benchmark, not a test (about 8 minutes on an idle 2-core machine).

    PYTHONPATH=. .venv/bin/python benchmarks/reversal_solves.py
"""

from __future__ import annotations

import dataclasses
import time

import torch

from predictions.influence import damped_product, weighted_gradients
from predictions.methods import membership, parse_method
from predictions.removal_sets import build, parse
from retrain.regimes import train_full
from retrain.studies.reversal import Reversal

SOLVES = ("cg:side=sets", "cg:side=sets,iterations=20", "cg:side=sets,iterations=300",
          "cg:side=sets,precondition=40,iterations=20", "cg:side=sets,precondition=40",
          "cg:side=sets,precondition=100",
          *(f"arnoldi:rank={rank},iterations={3 * rank // 2},side=sets{complement}"
            for rank in (40, 200, 400) for complement in (",complement=drop", "")))
REFERENCE = "cg:side=sets,precondition=100,tol=1e-8,iterations=400"


class EveryMethod(Reversal):
    name, entities_per_group = "reversal-small", 8
    removed = {"NameToDescription": 6, "Both": 2}
    recipe = dataclasses.replace(Reversal.recipe, seeds=3)


def main() -> None:
    study = EveryMethod(EveryMethod.Options())
    study.flat  # noqa: B018 (built outside the transforms)
    theta = train_full(study, [0], "full")[0][0]
    sets = [s for spec in study.default_sets for s in build(parse(spec), study)]
    x, y = study.tensors("train")
    rhs = weighted_gradients(study, theta, x, y, membership(study, sets).to(theta))
    curvature = damped_product(study, theta, study.recipe.damping)
    differentiable = torch.tensor(study.differentiable)

    def run(spec: str) -> tuple[torch.Tensor, float, float | None]:
        method = parse_method(spec, study)
        start = time.perf_counter()
        predicted = method.set_predictions(study, theta[None], sets)[differentiable]
        seconds = time.perf_counter() - start
        residual = None
        if spec.startswith("cg"):
            solved = method.solver(study, theta)(rhs)
            residual = ((rhs - curvature(solved)).norm(dim=0) / rhs.norm(dim=0)).max().item()
        return predicted, seconds, residual

    reference, seconds, residual = run(REFERENCE)
    print(f"reference {REFERENCE}: {seconds:.1f} s, residual {residual:.1e}", flush=True)
    for spec in SOLVES:
        predicted, seconds, residual = run(spec)
        pearson = torch.corrcoef(torch.stack([predicted.flatten(), reference.flatten()]))[0, 1].item()
        error = ((predicted - reference).abs().max() / reference.abs().max()).item()
        print(f"{spec}: {seconds:.1f} s, " + (f"residual {residual:.1e}, " if residual is not None else "")
              + f"Pearson {pearson:.4f}, max relative error {error:.1e}", flush=True)


if __name__ == "__main__":
    main()
