"""Self-influence scores for mislabel detection: one score per training point and full-data model, larger = more
suspect. Inspecting the top-scored points first should find the mislabelled ones (Koh & Liang 2017).

exact:    (1/N) ∇L_jᵀ (G + (wd + λ)I)⁻¹ ∇L_j at θ*, the predicted rise of z_j's own loss when z_j is removed.
grad_dot: (1/N) ‖∇L_j(θ*)‖², the same with the curvature replaced by I (TracIn at the final checkpoint).
tracin:   TracIn self-influence Σ_c η ‖∇L_j(θ_c)‖² over `checkpoints` checkpoints evenly spaced in training (the
          recipe's models are retrained to keep them; η is the recipe's lr, schedules are not weighted in).
loss:     the training loss L(z_j, θ*) (baseline).
random:   uniform random scores, seeded by the model's seed (baseline: recall at p% is p on average)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from predictions.influence import self_influence, train_gradients
from retrain.engine import train
from retrain.study import Study
from store.records import InputError

CHECKPOINTS = 20


def _exact(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    return torch.stack([self_influence(study, th, study.recipe.damping) for th in thetas])


def _squared_gradient_norms(study: Study, theta: Tensor) -> Tensor:
    """‖∇L_j(θ)‖² for every training point, [N]."""
    return train_gradients(study, theta).pow(2).sum(1)


def _grad_dot(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    return torch.stack([_squared_gradient_norms(study, th) for th in thetas]) / study.n_train


def _tracin(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    if study.recipe.optimizer == "newton":
        raise InputError(f"{study.name}: tracin needs minibatch training checkpoints; the study trains by Newton steps")
    every = max(1, study.recipe.epochs // CHECKPOINTS)
    total = torch.zeros(len(seeds), study.n_train, dtype=thetas.dtype)

    def keep(epoch: int, theta: Tensor) -> None:
        if epoch % every == 0:
            total.add_(study.recipe.lr * torch.stack([_squared_gradient_norms(study, th) for th in theta]))

    train(study, torch.ones(len(seeds), study.n_train, dtype=torch.bool), seeds, checkpoint=keep)
    return total


def _loss(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    x, y = study.tensors("train")
    return torch.stack([study.loss(study.flat(th, x), y) for th in thetas]).detach()


def _random(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    return torch.stack([torch.rand(study.n_train, generator=torch.Generator().manual_seed(s), dtype=thetas.dtype)
                        for s in seeds])


@dataclass(frozen=True)
class Detector:
    scorer: Callable[[Study, Tensor, list[int]], Tensor]  # (study, θ* [S, P], seeds) -> scores [S, N]

    def config(self, study: Study, name: str) -> dict:
        """What the scores depend on besides the study: registered with them."""
        return {"method": name} | ({"damping": study.recipe.damping} if name == "exact" else {}) | (
            {"checkpoints": CHECKPOINTS} if name == "tracin" else {})


DETECTORS: dict[str, Detector] = {
    "exact": Detector(_exact),
    "grad_dot": Detector(_grad_dot),
    "tracin": Detector(_tracin),
    "loss": Detector(_loss),
    "random": Detector(_random),
}


def detector(name: str) -> Detector:
    if name not in DETECTORS:
        raise InputError(f"unknown detection method {name!r}; available: {', '.join(DETECTORS)}")
    return DETECTORS[name]
