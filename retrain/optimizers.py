"""Optimizers and learning-rate schedules of the batched engine: K models at once, θ of shape [K, P], with
per-model state. Each follows PyTorch's conventions exactly (tested against `torch.optim` and
`torch.optim.lr_scheduler` on an `nn.Module`), so a recipe written for a PyTorch training loop means the same here.

Both are extension points of `retrain.options`: a recipe names them by spec, `name:key=value,...`
(`adamw:beta2=0.95`, `cosine:warmup=100,floor=0.1`), or `path/to/file.py:Class` for a user's own subclass of
`Optimizer` or `Schedule`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from retrain.options import Extension, Registry, help_text, label, option, split_spec
from store.records import InputError

if TYPE_CHECKING:
    from retrain.study import Recipe


# ---- optimizers --------------------------------------------------------------------------------------------


class Optimizer(Extension, ABC):
    """One optimizer for K models: `step` updates θ [K, P] in place from the gradient of each model's mean
    minibatch loss [K, P] (which it may overwrite) and the learning rate. `weight_decay` is the recipe's: SGD adds
    wd·θ to the gradient (J's L2 term), AdamW decays θ decoupled."""

    def __init__(self, options: Any, recipe: Recipe):
        self.options = options
        self.weight_decay = recipe.weight_decay

    @abstractmethod
    def step(self, theta: Tensor, grad: Tensor, lr: float) -> None: ...


@dataclass(frozen=True)
class SGDOptions:
    dampening: float = option("momentum dampening τ: buf ← μ·buf + (1 − τ)·g", 0.0, minimum=0.0, maximum=1.0)
    nesterov: str = option("Nesterov momentum: step along g + μ·buf", "false", choices=("false", "true"))


class SGD(Optimizer):
    """torch.optim.SGD, momentum from the recipe's `momentum`.

    g ← ∇ + wd·θ; buf ← g (first step), then μ·buf + (1 − τ)·g; θ ← θ − lr·(g + μ·buf if
    Nesterov else buf). The momentum μ is the recipe's `momentum`. Each update is an add with alpha, as in
    torch.optim, so that the rounding is torch.optim's too (digits-mlp's models come out bit for bit)."""

    name = "sgd"
    Options = SGDOptions

    def __init__(self, options: SGDOptions, recipe: Recipe):
        super().__init__(options, recipe)
        if options.nesterov == "true" and (recipe.momentum <= 0 or options.dampening != 0):
            raise InputError("sgd: Nesterov momentum needs momentum > 0 and dampening 0 (as torch.optim.SGD)")
        self.momentum = recipe.momentum
        self.buf: Tensor | None = None

    def step(self, theta: Tensor, grad: Tensor, lr: float) -> None:
        o, mu = self.options, self.momentum
        g = grad.add_(theta, alpha=self.weight_decay) if self.weight_decay else grad
        if mu:
            if self.buf is None:
                self.buf = g  # the engine's gradient is fresh each step: the buffer may own it
            else:
                self.buf.mul_(mu).add_(g, alpha=1 - o.dampening)
            g = g.add(self.buf, alpha=mu) if o.nesterov == "true" else self.buf
        theta.add_(g, alpha=-lr)


@dataclass(frozen=True)
class AdamWOptions:
    beta1: float = option("first-moment decay β₁", 0.9, minimum=0.0, maximum=1.0)
    beta2: float = option("second-moment decay β₂", 0.999, minimum=0.0, maximum=1.0)
    eps: float = option("ε added to √v̂", 1e-8, minimum=0.0)


class AdamW(Optimizer):
    """torch.optim.AdamW, with bias correction and decoupled weight decay.

    θ ← θ(1 − lr·wd); m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
    θ ← θ − (lr / (1 − β₁ᵗ))·m / (√v / √(1 − β₂ᵗ) + ε), t the step count (from 1)."""

    name = "adamw"
    Options = AdamWOptions

    def __init__(self, options: AdamWOptions, recipe: Recipe):
        super().__init__(options, recipe)
        self.t = 0
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def step(self, theta: Tensor, grad: Tensor, lr: float) -> None:
        o = self.options
        self.t += 1
        if self.m is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        if self.weight_decay:
            theta.mul_(1 - lr * self.weight_decay)
        self.m.lerp_(grad, 1 - o.beta1)
        self.v.mul_(o.beta2).addcmul_(grad, grad, value=1 - o.beta2)
        denom = self.v.sqrt().div_((1 - o.beta2**self.t) ** 0.5).add_(o.eps)
        theta.addcdiv_(self.m, denom, value=-lr / (1 - o.beta1**self.t))


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", Optimizer, (SGD, AdamW))


# ---- learning-rate schedules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupOptions:
    warmup: int = option("linear warmup steps W: factor (t + 1)/W for t < W", 0, minimum=0)


@dataclass(frozen=True)
class DecayOptions(WarmupOptions):
    floor: float = option("the factor at the last step, as a fraction of lr", 0.0, minimum=0.0, maximum=1.0)


class Schedule(Extension):
    """The learning rate of optimizer step t (0-based) of T as lr·factor(t, T): a linear warmup over the first W
    steps, (t + 1)/W (torch's LinearLR(start_factor=1/W, total_iters=W − 1)), then `decay` of the progress
    p = (t − W)/(T − W) ∈ [0, 1)."""

    Options = WarmupOptions

    def __init__(self, options: WarmupOptions):
        self.options = options

    def factor(self, t: int, total: int) -> float:
        w = self.options.warmup
        if t < w:
            return (t + 1) / w
        return self.decay((t - w) / max(total - w, 1))

    def decay(self, p: float) -> float:
        return 1.0


class Constant(Schedule):
    """The same lr throughout, after the warmup."""

    name = "constant"


class Linear(Schedule):
    """Linear decay to floor·lr: torch's LinearLR(start_factor=1, end_factor=floor, total_iters=T − W).

    factor floor + (1 − floor)(1 − p)."""

    name = "linear"
    Options = DecayOptions

    def decay(self, p: float) -> float:
        return self.options.floor + (1 - self.options.floor) * (1 - p)


class Cosine(Schedule):
    """Cosine decay to floor·lr: torch's CosineAnnealingLR(T_max=T − W, eta_min=floor·lr).

    factor floor + (1 − floor)(1 + cos πp)/2."""

    name = "cosine"
    Options = DecayOptions

    def decay(self, p: float) -> float:
        return self.options.floor + (1 - self.options.floor) * (1 + math.cos(math.pi * p)) / 2


SCHEDULES: Registry[Schedule] = Registry("schedule", Schedule, (Constant, Linear, Cosine))


# ---- specs -------------------------------------------------------------------------------------------------


def resolve(spec: str, registry: Registry) -> tuple[type, Any, str]:
    """(class, options, canonical spec) of `name:key=value,...` or `path/file.py:Class[:key=value,...]`. The
    canonical spec names only the options that differ from their defaults (and a user's file by its absolute
    path), so equal meanings hash equally."""
    cls, options = registry.parse(spec)
    name, _ = split_spec(spec)
    if name not in registry:
        path, _, cls_name = name.rpartition(":")
        name = f"{Path(path).resolve()}:{cls_name}"
    return cls, options, label(name, options, cls.Options())


def recipe_options() -> str:
    """The optimizers and schedules with every option's meaning and default, from their options classes (the
    README's list is this text; a test keeps them equal)."""
    return help_text([
        ("optimizers (Recipe(optimizer=\"NAME:key=value,...\"); also newton: full-batch Newton steps):", OPTIMIZERS),
        ("schedules (Recipe(schedule=\"NAME:key=value,...\")):", SCHEDULES),
    ], "your own: path/to/file.py:ClassName[:key=value,...], a subclass of retrain.optimizers.Optimizer or Schedule")
