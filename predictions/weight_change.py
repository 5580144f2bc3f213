"""Predicted weight change: where in the model a dataset change lands, to first order.

Removing a set S moves the optimum by Δθ̂_S = (1/N) A⁻¹ Σ_{j∈S} ∇L(z_j, θ*) (A the method's curvature; removing z_j is
up-weighting it by −1/N), and relabelling z_j to y'_j is its removal then the addition of (x_j, y'_j), so
∇L(z_j) − ∇L((x_j, y'_j)) enters the sum; a scoped method solves on its scope and predicts no change elsewhere
(`CurvatureMethod.weight_changes`, whose ∇mᵀΔθ̂_S are the method's set-side predictions). Sign convention as
everywhere: Δθ = θ(modified data) − θ(full data). Each set's Δθ̂ is registered per seed model (the retraining of
that seed is what it predicts) and per parameter block (`retrain.blocks`): its norm and its vector, or the vector's
count sketch for a block above `retrain.blocks.SKETCH_SIZE` parameters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from predictions.methods import CurvatureMethod, Method
from retrain.blocks import block_changes
from retrain.study import Study
from store.records import InputError, RemovalSetRecord, WeightChangeRecord


def predicted_weight_changes(study: Study, method: Method, thetas: Tensor, seeds: Sequence[int],
                             sets: Sequence[RemovalSetRecord]) -> list[WeightChangeRecord]:
    """Δθ̂_S of every set at each of the method's seed models (the first `models` of `thetas` [S, P], whose seeds
    are `seeds`), one record per (set, seed, block). Only a curvature method has a Δθ̂."""
    if not isinstance(method, CurvatureMethod):
        raise InputError(f"{method.label} predicts no weight change (only a curvature method solves A⁻¹ Σ ∇L_j)")
    records = []
    for theta, seed in list(zip(thetas, seeds))[: method.options.models]:
        deltas = method.weight_changes(study, theta, sets).T  # [S, P]
        for s, blocks in zip(sets, block_changes(study, deltas)):
            records += [WeightChangeRecord(study.study_hash, method.label, method.config, s.set_id, seed, block, norm,
                                           direction) for block, (norm, direction) in blocks.items()]
    return records
