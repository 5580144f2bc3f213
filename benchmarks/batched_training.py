"""Batched vs one-at-a-time training of the same K digits-mlp models, and the time to score every
train × query pair with `exact`. Prints the measured ratios side by side (a benchmark, not a test).

    .venv/bin/python benchmarks/batched_training.py [--models 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from predictions.influence import exact_scores
from retrain import load_study, measure, train
from retrain.studies.digits import DigitsMLP


def plain_pytorch(study, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """What a user writes without ifledger: one nn.Module, torch.optim.SGD, the same data order and objective."""
    r = study.recipe
    x, y = study.tensors("train")
    model = study.model().to(x.dtype)
    nn.utils.vector_to_parameters(study.init_params(seed), model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    w = mask.to(x.dtype)
    for epoch in range(r.epochs):
        order = study.checked_order(seed, epoch)
        for start in range(0, len(y), r.batch_size):
            idx = order[start : start + r.batch_size]
            opt.zero_grad()
            loss = (w[idx] * study.loss(model(x[idx]), y[idx])).sum() / w[idx].sum().clamp(min=1)
            loss.backward()
            opt.step()
    return nn.utils.parameters_to_vector(model.parameters()).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=64)
    k = parser.parse_args().models
    study = load_study("digits-mlp")
    masks = torch.ones(k, study.n_train, dtype=torch.bool)
    for i in range(k):
        masks[i, i * 7] = False  # K single-point removals ...
    seeds = [i % study.recipe.seeds for i in range(k)]  # ... over the study's seeds
    train(study, masks[:2], seeds[:2], epochs=1)  # warm-up

    t0 = time.perf_counter()
    batched = train(study, masks, seeds).params
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    one_by_one = torch.cat([train(study, masks[i : i + 1], [seeds[i]]).params for i in range(k)])
    t_engine = time.perf_counter() - t0

    t0 = time.perf_counter()
    plain = torch.stack([plain_pytorch(study, masks[i], seeds[i]) for i in range(k)])
    t_plain = time.perf_counter() - t0

    m_batched, m_plain = measure(study, batched), measure(study, plain)
    print(f"digits-mlp: {k} models x {study.recipe.epochs} epochs, {study.flat.n_params} parameters, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batched (vmap, one call)':<40}{t_batched:8.2f} s  {k / t_batched:7.1f} models/s  1.0x")
    print(f"{'engine, one model per call':<40}{t_engine:8.2f} s  {k / t_engine:7.1f} models/s  "
          f"{t_engine / t_batched:.1f}x slower")
    print(f"{'plain PyTorch loop (nn.Module + SGD)':<40}{t_plain:8.2f} s  {k / t_plain:7.1f} models/s  "
          f"{t_plain / t_batched:.1f}x slower")
    print(f"max |param| difference batched vs one-by-one: {(batched - one_by_one).abs().max():.2e}; "
          f"max |measurement| difference batched vs plain PyTorch: {(m_batched - m_plain).abs().max():.2e}")

    class AllQueries(DigitsMLP):
        n_measurements = 360

    everything = AllQueries()
    theta = batched[0]
    t0 = time.perf_counter()
    scores = exact_scores(everything, theta, everything.recipe.damping)
    t_exact = time.perf_counter() - t0
    print(f"exact: all {scores.shape[1]} train x {scores.shape[0]} query scores from one model in {t_exact:.2f} s "
          "(cold: Gauss-Newton, solve, per-example gradients)")


if __name__ == "__main__":
    main()
