"""Self-influence scores for mislabel detection: one score per training point and full-data model, larger = more
suspect. Inspecting the top-scored points first should find the mislabelled ones (Koh & Liang 2017).

exact:    (1/N) ∇L_jᵀ (G + (wd + λ)I)⁻¹ ∇L_j at θ*, the predicted rise of z_j's own loss when z_j is removed.
grad_dot: (1/N) ‖∇L_j(θ*)‖², the same with the curvature replaced by I (TracIn at the final checkpoint).
tracin:   TracIn self-influence Σ_c η ‖∇L_j(θ_c)‖² over the checkpoints θ_c after every max(1, epochs // 20)-th
          epoch (20 when epochs is a multiple of 20; recorded as `checkpoint_epochs`). The recipe's models are
          retrained to keep them, so a study that supplies its models is refused; η is the recipe's lr, schedules
          are not weighted in.
loss:     the training loss L(z_j, θ*) (baseline).
random:   uniform random scores, seeded by the model's seed (baseline: recall at p% is p on average)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from predictions.influence import self_influence, squared_gradient_norms
from retrain.engine import train
from retrain.study import Study
from store.records import InputError

CHECKPOINTS = 20


def _exact(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    return torch.stack([self_influence(study, th, study.recipe.damping) for th in thetas])


def _grad_dot(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    return torch.stack([squared_gradient_norms(study, th) for th in thetas]) / study.n_train


def checkpoint_epochs(study: Study) -> list[int]:
    """The epochs after which tracin takes a checkpoint: every max(1, epochs // 20)-th."""
    every = max(1, study.recipe.epochs // CHECKPOINTS)
    return list(range(every, study.recipe.epochs + 1, every))


def _check_tracin(study: Study) -> None:
    if study.recipe.optimizer == "newton":
        raise InputError(f"{study.name}: tracin needs minibatch training checkpoints; the study trains by Newton steps")
    if study.supplied_params:
        raise InputError(f"{study.name}: tracin retrains the recipe's models to keep their checkpoints, and the study "
                         f"supplies its own (seeds {', '.join(map(str, study.supplied_params))}), whose training it "
                         "does not have; leave tracin out of --methods")


def _tracin(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    kept = set(checkpoint_epochs(study))
    total = thetas.new_zeros(len(seeds), study.n_train)

    def keep(epoch: int, theta: Tensor) -> None:
        if epoch in kept:
            total.add_(study.recipe.lr * torch.stack([squared_gradient_norms(study, th) for th in theta]))

    train(study, torch.ones(len(seeds), study.n_train, dtype=torch.bool), seeds, checkpoint=keep)
    return total


def _loss(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    x, y = study.tensors("train")
    return torch.stack([study.loss(study.flat(th, x), y) for th in thetas]).detach()


def _random(study: Study, thetas: Tensor, seeds: list[int]) -> Tensor:
    return torch.stack([torch.rand(study.n_train, generator=torch.Generator().manual_seed(s), dtype=thetas.dtype)
                        for s in seeds]).to(thetas.device)


@dataclass(frozen=True)
class Detector:
    scorer: Callable[[Study, Tensor, list[int]], Tensor]  # (study, θ* [S, P], seeds) -> scores [S, N]
    check: Callable[[Study], None] = lambda study: None  # refuses (InputError) a study it cannot score

    def config(self, study: Study, name: str) -> dict:
        """What the scores depend on besides the study: registered with them."""
        return {"method": name} | ({"damping": study.recipe.damping} if name == "exact" else {}) | (
            {"checkpoint_epochs": checkpoint_epochs(study)} if name == "tracin" else {})


DETECTORS: dict[str, Detector] = {
    "exact": Detector(_exact),
    "grad_dot": Detector(_grad_dot),
    "tracin": Detector(_tracin, _check_tracin),
    "loss": Detector(_loss),
    "random": Detector(_random),
}


def detector(name: str) -> Detector:
    if name not in DETECTORS:
        raise InputError(f"unknown detection method {name!r}; available: {', '.join(DETECTORS)}")
    return DETECTORS[name]
