"""Predicted weight change: where in the model a dataset change lands, to first order.

Removing a set S moves the optimum by Δθ̂_S = (1/N) A⁻¹ Σ_{j∈S} ∇L(z_j, θ*) (A the method's curvature; removing z_j is
up-weighting it by −1/N), and relabelling z_j to y'_j is its removal then the addition of (x_j, y'_j), so
∇L(z_j) − ∇L((x_j, y'_j)) enters the sum. Sign convention as everywhere: Δθ = θ(modified data) − θ(full data).
Each set's Δθ̂ is registered per seed model (the retraining of that seed is what it predicts) and per parameter
block (`retrain.blocks`): its norm and its vector, or the vector's count sketch for a block above
`retrain.blocks.SKETCH_SIZE` parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from predictions.influence import example_gradients, train_gradients
from predictions.methods import Method
from retrain.blocks import block_changes
from retrain.study import Study
from store.records import RemovalSetRecord, WeightChangeRecord


def set_gradients(study: Study, theta: Tensor, sets: Sequence[RemovalSetRecord]) -> Tensor:
    """g_S = Σ_{j∈S} ∇L(z_j, θ) − Σ_{j∈S relabelled} ∇L((x_j, y'_j), θ) for each set, [P, S]."""
    members = torch.zeros(study.n_train, len(sets), dtype=theta.dtype)
    for k, s in enumerate(sets):
        members[list(s.indices), k] = 1.0
    sums = train_gradients(study, theta).T @ members
    x, y = study.tensors("train")
    for k, s in enumerate(sets):
        if s.new_labels is not None:
            labels = torch.tensor(s.new_labels, dtype=torch.float64).to(y.dtype)
            sums[:, k] -= example_gradients(study, theta, x[list(s.indices)], labels).sum(0)
    return sums


def predicted_weight_changes(study: Study, method: Method, thetas: Tensor, seeds: Sequence[int],
                             sets: Sequence[RemovalSetRecord]) -> list[WeightChangeRecord]:
    """Δθ̂_S = (1/N) A⁻¹ g_S of every set at each of the method's seed models (the first `models` of `thetas`
    [S, P], whose seeds are `seeds`), one record per (set, seed, block)."""
    records = []
    for theta, seed in list(zip(thetas, seeds))[: method.options.models]:
        deltas = method.inverse_product(study, theta, set_gradients(study, theta, sets)).T / study.n_train
        for s, blocks in zip(sets, block_changes(study, deltas)):
            records += [WeightChangeRecord(study.study_hash, method.label, method.config, s.set_id, seed, block, norm,
                                           direction) for block, (norm, direction) in blocks.items()]
    return records
