"""Why `arnoldi` predicted the wrong sign on `reversal`: its curvature complement and the measurement, side by side.

The tests' reduced configuration (8 entities per group, seed 0, 60 epochs): the full-data model and, trained with it
(paired), the models without each of the first 4 NameToDescription entities and the first Both entity. One 60-step
Lanczos run at the full model gives the top-40 Gauss-Newton eigenpairs U, g; the first-order prediction of removing
entity S is (1/N) ∇mᵀ A⁻¹ Σ_{j∈S} ∇L_j with
    damping: A⁻¹ = U diag(1/(g + s)) Uᵀ + (I − UUᵀ)/s   (arnoldi's default complement)
    drop:    A⁻¹ = U diag(1/(g + s)) Uᵀ                  (arnoldi:complement=drop)
for s = wd + λ, λ in {0.01 (the recipe's), 0.1, 1, 10}, and grad_dot (A = I), on the held-out template's
    log_odds: s_ii − mean_{n≠i} s_ni   (the study's measurement: the target against its prior under other prompts)
    margin:   s_ii − max_{j≠i} s_ij    (the target against the best rival target under the same prompt)
with s_ij = log p(target j | prompt of entity i). Prints each prediction beside the retrained effect, and how many of
the 5 forward predictions have the retrained effect's sign. A benchmark, not a test (minutes on a loaded machine).

    PYTHONPATH=. .venv/bin/python benchmarks/reversal_complement.py
"""

from __future__ import annotations

import torch

from predictions.arnoldi import lanczos
from predictions.influence import gauss_newton_vector_product, measurement_gradients, train_gradients
from retrain import train
from retrain.engine import measure
from retrain.studies.reversal import MEASURED, Reversal


class Statistic(Reversal):
    """The reduced configuration, measuring one statistic (`statistic`) of every entity, direction and template."""

    entities_per_group = 8
    statistic = "log_odds"

    def measurements(self) -> dict[str, str]:
        return {f"{d}/{c}/{g}/{n}": "" for g in MEASURED for d in ("forward", "reverse") for c in ("trained", "heldout")
                for n, _ in self.facts[g]}

    def measurements_without_gradient(self) -> set[str]:
        return set()

    def measurement_tags(self) -> dict[str, dict[str, str]]:
        return {}

    def measure(self, forward):
        x, y = self.tensors(self.query_split)
        e = self.entities_per_group
        scores = -self.loss(forward(x), y).reshape(len(MEASURED), 2, 2, e, e)
        own = torch.diagonal(scores, dim1=-2, dim2=-1)
        if self.statistic == "log_odds":
            value = own - (scores.sum(-2) - own) / (e - 1)
        else:
            value = own - scores.masked_fill(torch.eye(e, dtype=torch.bool), float("-inf")).amax(-1)
        return dict(zip(self.measurements(), value.reshape(-1)))


def main() -> None:
    torch.set_num_threads(1)
    study = Statistic()
    study.flat  # noqa: B018
    entities = study.data["train"]["entity"]
    removed = [(n, "NameToDescription") for n, _ in study.facts["NameToDescription"][:4]] + [
        (study.facts["Both"][0][0], "Both")]
    members = [[i for i, e in enumerate(entities) if e == name] for name, _ in removed]
    masks = torch.ones(1 + len(removed), study.n_train)
    for k, rows in enumerate(members, start=1):
        masks[k, rows] = 0
    params = train(study, masks, [0] * len(masks)).params
    theta = params[0]
    values, vectors = lanczos(lambda v: gauss_newton_vector_product(study, theta, v), theta.numel(), theta.dtype, 60, 0)
    values, vectors = values[:40].clamp(min=0), vectors[:, :40]
    print(f"top Ritz value {values[0].item():.3g}, 40th {values[-1].item():.3g}")
    gradients = train_gradients(study, theta)
    removal_gradients = torch.stack([gradients[rows].sum(0) for rows in members])  # [5, P]
    ids = list(study.measurements())
    wd = study.recipe.weight_decay
    for statistic in ("log_odds", "margin"):
        study.statistic = statistic
        outcomes = measure(study, params)
        actual = outcomes[1:] - outcomes[0]
        m_gradients = measurement_gradients(study, theta)
        for label, lam, complement in [("grad_dot", None, ""), *[(f"s={wd + lam:g} {c}", lam, c)
                                                                for lam in (0.01, 0.1, 1.0, 10.0)
                                                                for c in ("damping", "drop")]]:
            cells, right = [], 0
            for k, (name, group) in enumerate(removed):
                for direction in ("forward", "reverse"):
                    m = ids.index(f"{direction}/heldout/{group}/{name}")
                    v = m_gradients[m]
                    if lam is not None:
                        s = wd + lam
                        coefficients = vectors.T @ v
                        kept = vectors @ (coefficients / (values + s))
                        v = kept if complement == "drop" else kept + (v - vectors @ coefficients) / s
                    predicted = (removal_gradients[k] @ v).item() / study.n_train
                    right += direction == "forward" and (predicted > 0) == (actual[k, m].item() > 0)
                    cells.append(f"{group[:4]} {direction[:3]} {predicted:+.3g} ({actual[k, m].item():+.2f})")
            print(f"{statistic:8s} {label:16s} forward signs right {right}/5 | " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
