"""Retraining throughput on digits-mlp, side by side in one run: the batched engine (K models in one `vmap`
call) against the same engine one model per call and against a plain PyTorch loop (nn.Module + torch.optim +
torch.optim.lr_scheduler + clip_grad_norm_), for the study's SGD recipe and for an AdamW + warmup + cosine +
clipping recipe; then the time to score every train × query pair with `exact`. A benchmark, not a test.

    .venv/bin/python benchmarks/batched_training.py [--models 64] [--sequential 8] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
from torch import nn

from predictions import parse_method
from retrain import Study, measure, train
from retrain.studies.digits import DigitsMLP


class DigitsAdamW(DigitsMLP):
    """digits-mlp trained the way transformers are: AdamW, linear warmup, cosine decay, gradient clipping."""

    recipe = dataclasses.replace(DigitsMLP.recipe, optimizer="adamw", lr=3e-3, weight_decay=1e-2,
                                 schedule="cosine:warmup=100", max_grad_norm=1.0)


def plain_pytorch(study: Study, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """What a user writes without ifledger: one nn.Module, torch.optim, a scheduler, clipping; the same data order
    and the same loss (the mean over the batch's kept examples)."""
    r = study.recipe
    x, y = study.tensors("train")
    model = study.model().to(x.dtype)
    nn.utils.vector_to_parameters(study.init_params(seed), model.parameters())
    if r.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    batches = -(-len(y) // r.batch_size)
    schedule = r.make_schedule()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule.factor(t, r.epochs * batches))
    w = mask.to(x.dtype)
    for epoch in range(r.epochs):
        order = study.checked_order(seed, epoch)
        for start in range(0, len(y), r.batch_size):
            idx = order[start : start + r.batch_size]
            opt.zero_grad()
            loss = (w[idx] * study.loss(model(x[idx]), y[idx])).sum() / w[idx].sum().clamp(min=1)
            loss.backward()
            if r.max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), r.max_grad_norm)
            opt.step()
            scheduler.step()
    return nn.utils.parameters_to_vector(model.parameters()).detach()


def timed(run):
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def compare(study: Study, k: int, sequential: int, rounds: int) -> None:
    """Train k models batched, and the first `sequential` of them one at a time (engine and plain loop), `rounds`
    times in alternation. Rates are per model (the best round of each way); each round's ratio compares runs made
    minutes apart, so a shared machine's load weighs on both sides, and the median over rounds is reported."""
    masks = torch.ones(k, study.n_train, dtype=torch.bool)
    for i in range(k):
        masks[i, i * 7] = False  # K single-point removals ...
    seeds = [i % study.recipe.seeds for i in range(k)]  # ... over the study's seeds
    train(study, masks[:2], seeds[:2], epochs=1)  # warm-up
    ways = {
        "batched engine (vmap, one call)": (k, lambda: train(study, masks, seeds).params),
        "engine, one model per call": (sequential, lambda: torch.cat(
            [train(study, masks[i : i + 1], [seeds[i]]).params for i in range(sequential)])),
        "plain PyTorch loop (torch.optim)": (sequential, lambda: torch.stack(
            [plain_pytorch(study, masks[i], seeds[i]) for i in range(sequential)])),
    }
    per_model: dict[str, list[float]] = {label: [] for label in ways}
    params = {}
    for _ in range(rounds):
        for label, (models, run) in ways.items():
            params[label], seconds = timed(run)
            per_model[label].append(seconds / models)

    r = study.recipe
    print(f"\n{study.name}, {r.optimizer} + {r.schedule}" + (f" + clip {r.max_grad_norm}" if r.max_grad_norm else "")
          + f": {r.epochs} epochs, {study.flat.n_params} parameters, {rounds} round(s)")
    batched_times = per_model["batched engine (vmap, one call)"]
    for label, (models, _) in ways.items():
        ratios = sorted(t / b for t, b in zip(per_model[label], batched_times))
        print(f"  {label:<34}{models:4d} models  {1 / min(per_model[label]):7.2f} models/s  batched is "
              f"{ratios[len(ratios) // 2]:5.1f}x faster (rounds: {', '.join(f'{x:.1f}' for x in ratios)})")
    batched, one_by_one, plain = (params[label] for label in ways)
    head = batched[:sequential]
    print(f"  max |param| difference: batched vs one-by-one {(head - one_by_one).abs().max():.1e}, "
          f"batched vs plain PyTorch {(head - plain).abs().max():.1e}; max |measurement| difference vs plain "
          f"{(measure(study, head) - measure(study, plain)).abs().max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=None,
                        help="train only the first N models one at a time (default: all; per-model rates compared)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the three ways this many times")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; load average before "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    sgd, adamw = DigitsMLP(), DigitsAdamW()
    for study in (sgd, adamw):
        compare(study, args.models, min(args.sequential or args.models, args.models), args.rounds)

    class AllQueries(DigitsMLP):
        n_measurements = 360

    everything = AllQueries()
    theta = train(sgd, torch.ones(1, sgd.n_train, dtype=torch.bool), [0]).params[0]
    t0 = time.perf_counter()
    scores = parse_method("exact", everything).scores(everything, theta[None])
    t_exact = time.perf_counter() - t0
    print(f"\nexact: all {scores.shape[1]} train x {scores.shape[0]} query scores from one model in {t_exact:.2f} s "
          "(cold: Gauss-Newton, solve, per-example gradients)")
    load = os.getloadavg()
    print(f"load average after {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
