"""The training engine: many models of one study at once (`torch.func.vmap` over stacked flat
parameters), each with its own seed, its own example mask and its own targets. Removal is a mask and relabelling
is a model's own targets, so for a seed the initialisation and the example order are the same with or without a
modification (paired runs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, hessian, vmap

from retrain.study import Study

Progress = Callable[[int], None]  # called with the number of epochs (or steps) just finished
Checkpoint = Callable[[int, Tensor], None]  # called with an epoch just finished (counted from 1) and θ [K, P]


@dataclass
class Trained:
    params: Tensor  # [K, P]
    train_loss: Tensor | None  # [K]: the final objective (training loss, or PBRF objective for pbrf); None: unknown
    failures: list[str | None]  # per model: None, or why it failed
    converged: list[bool]
    checkpoints: list[str | None] | None = None  # per model: the sha256 of a study trainer's checkpoint file


def objective(study: Study, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """J(θ) = Σ_i w_i L(z_i, θ) / Σ_i w_i + (wd/2)‖θ‖² (w = inclusion mask of a batch)."""
    return kept_mean(study.loss(study.flat(theta, x), y), w) + 0.5 * study.recipe.weight_decay * theta.dot(theta)


def kept_mean(losses: Tensor, w: Tensor) -> Tensor:
    """Σ_i w_i L_i / max(Σ_i w_i, 1) over the last dimension: the mean loss over a batch's kept examples (0 when
    none is kept)."""
    return (w * losses).sum(-1) / w.sum(-1).clamp(min=1)


def example_losses(study: Study, outputs: Tensor, targets: Tensor) -> Tensor:
    """[K, B]: the per-example loss of K models' outputs [K, B, ...] against targets [K, B, ...], computed once on
    all K·B examples (the same values as under vmap, without vmap's per-operation cost)."""
    return study.loss(outputs.flatten(0, 1), targets.flatten(0, 1)).view(targets.shape[:2])


def batch_losses(study: Study, thetas: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """[K]: each model's `kept_mean` loss on its own minibatch (x, y [K, B, ...], w [K, B]); the models run under
    vmap, their losses through `example_losses`."""
    return kept_mean(example_losses(study, vmap(study.flat)(thetas, x), y), w)


def _failures(theta: Tensor, failures: list[str | None], when: str) -> None:
    bad = ~torch.isfinite(theta).all(dim=1)
    for k in bad.nonzero().flatten().tolist():
        if failures[k] is None:
            failures[k] = f"diverged: non-finite parameters {when}"


def clip_grad_norm(g: Tensor, max_norm: float) -> Tensor:
    """Each model's gradient [K, P] scaled by min(1, max_norm / (‖g‖ + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    return g * (max_norm / (g.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)


def batch_gradients(study: Study, theta: Tensor, *batch: Tensor) -> Tensor:
    """Each model's gradient [K, P] of its own `batch_losses`, as ∂(Σ_k loss_k)/∂θ: model k's loss depends on row
    k alone, so the sum's gradient is the per-model gradients, computed by one backward pass (the same values as
    `vmap(grad(loss))`, with less per-call overhead)."""
    theta = theta.detach().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(batch_losses(study, theta, *batch).sum(), theta)[0]


def epoch_orders(study: Study, seeds: Sequence[int], epoch: int) -> Tensor:
    """[K, N] the example order of each model's (seed, epoch), from the study's hook (the same seed is asked once)."""
    orders = {s: study.checked_order(s, epoch) for s in dict.fromkeys(seeds)}
    return torch.stack([orders[s] for s in seeds])


def train(
    study: Study,
    masks: Tensor,
    seeds: Sequence[int],
    init: Tensor | None = None,
    epochs: int | None = None,
    first_epoch: int = 0,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
    targets: Tensor | None = None,
    trainable: Tensor | None = None,
) -> Trained:
    """Train K = len(seeds) models; masks [K, N] marks the kept training examples, `targets` [K, N, ...] each
    model's training targets (default: the study's `y` for all).
    From `init` (e.g. full-data models, for `warm`) or from each seed's initialisation. A minibatch run has a fresh
    optimizer state and schedule over its own `epochs` (epochs first_epoch, first_epoch + 1, ... of the order).
    `checkpoint(epoch, θ)` sees the parameters after each minibatch epoch (e.g. TracIn's checkpoints).
    `trainable` [P] (bool): only these coordinates move; the others are put back to their starting values after
    every step (weight decay, AdamW's decoupled decay included), so they stay bit for bit, and their gradient is
    zeroed before clipping (a frozen parameter is no part of the clipped norm, as with requires_grad=False)."""
    r = study.recipe
    x, y = study.tensors("train")
    n = len(y)
    y = y.expand(len(seeds), *y.shape) if targets is None else targets  # [K, N, ...]
    epochs = r.epochs if epochs is None else epochs
    theta = torch.stack([study.init_params(s) for s in seeds]) if init is None else init.clone()
    w = masks.to(theta)  # the models' dtype and device
    failures: list[str | None] = [None] * len(seeds)
    frozen = None if trainable is None else ~trainable.to(theta.device)
    start = None if frozen is None else theta[:, frozen].clone()
    obj = lambda th, xb, yb, wb: objective(study, th, xb, yb, wb)  # noqa: E731
    if r.optimizer == "newton":
        step_grad, step_hess = vmap(grad(obj), (0, None, 0, 0)), vmap(hessian(obj), (0, None, 0, 0))
        for step in range(epochs):
            hess, g = step_hess(theta, x, y, w), step_grad(theta, x, y, w)
            if frozen is not None:  # the Newton step of the trainable block: a frozen row reads δ_i = 0
                hess[:, frozen], hess[:, :, frozen], g[:, frozen] = 0.0, 0.0, 0.0
                fixed = frozen.nonzero().flatten()
                hess[:, fixed, fixed] = 1.0
            theta = theta - torch.linalg.solve(hess, g.unsqueeze(-1)).squeeze(-1)
            if frozen is not None:
                theta[:, frozen] = start
            _failures(theta, failures, f"after Newton step {step + 1}")
            if progress:
                progress(1)
    else:
        optimizer, schedule = r.make_optimizer(), r.make_schedule()
        batches = n // r.batch_size if r.drop_last else -(-n // r.batch_size)
        total, rows = epochs * batches, torch.arange(len(seeds), device=theta.device)[:, None]
        for epoch in range(first_epoch, first_epoch + epochs):
            order = epoch_orders(study, seeds, epoch).to(theta.device)
            for b in range(batches):
                idx = order[:, b * r.batch_size : (b + 1) * r.batch_size]
                xb = x.index_select(0, idx.flatten()).view(*idx.shape, *x.shape[1:])  # x[idx], copied row by row
                g = batch_gradients(study, theta, xb, y[rows, idx], w.gather(1, idx))
                if frozen is not None:
                    g[:, frozen] = 0.0
                if r.max_grad_norm:
                    g = clip_grad_norm(g, r.max_grad_norm)
                t = (epoch - first_epoch) * batches + b
                optimizer.step(theta, g, r.lr * schedule.factor(t, total))
                if frozen is not None:
                    theta[:, frozen] = start
            _failures(theta, failures, f"in epoch {epoch + 1}")
            if checkpoint:
                checkpoint(epoch - first_epoch + 1, theta)
            if progress:
                progress(1)
    loss = vmap(obj, (0, None, 0, 0))(theta, x, y, w)
    return Trained(theta, loss, failures, [f is None for f in failures])


def measure(study: Study, thetas: Tensor) -> Tensor:
    """All measurements of K models, [K, M]."""
    study.flat  # noqa: B018 (build the module outside vmap: its initialisation draws random numbers)
    return vmap(lambda th: study.measurement_vector(study.forward(th)))(thetas)
