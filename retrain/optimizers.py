"""Optimizers and learning-rate schedules of the batched engine: K models at once, θ of shape [K, P], with
per-model state. Each follows PyTorch's conventions exactly (tested against `torch.optim` and
`torch.optim.lr_scheduler` on an `nn.Module`), so a recipe written for a PyTorch training loop means the same here.

A recipe names them by spec, `name:key=value,...` (`adamw:beta2=0.95`, `cosine:warmup=100,floor=0.1`), or
`path/to/file.py:Class` for a user's own class (a subclass of `Optimizer` or `Schedule` with default options).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from torch import Tensor

from store.records import InputError, content_hash

if TYPE_CHECKING:
    from retrain.study import Recipe


@dataclass(frozen=True)
class NoOptions:
    """A plug-in without options."""


# ---- optimizers --------------------------------------------------------------------------------------------


class Optimizer(ABC):
    """One optimizer for K models: `step` updates θ [K, P] in place from the gradient of each model's mean
    minibatch loss [K, P] (which it may overwrite) and the learning rate. `weight_decay` is the recipe's: SGD adds
    wd·θ to the gradient (J's L2 term), AdamW decays θ decoupled."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: object, recipe: Recipe):
        self.options = options
        self.weight_decay = recipe.weight_decay

    @abstractmethod
    def step(self, theta: Tensor, grad: Tensor, lr: float) -> None: ...


@dataclass(frozen=True)
class SGDOptions:
    dampening: float = field(default=0.0, metadata={"help": "momentum dampening τ: buf ← μ·buf + (1 − τ)·g",
                                                    "min": 0.0, "max": 1.0})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum: step along g + μ·buf"})


class SGD(Optimizer):
    """torch.optim.SGD: g ← ∇ + wd·θ; buf ← g (first step), then μ·buf + (1 − τ)·g; θ ← θ − lr·(g + μ·buf if
    Nesterov else buf). The momentum μ is the recipe's `momentum`."""

    name = "sgd"
    Options = SGDOptions

    def __init__(self, options: SGDOptions, recipe: Recipe):
        super().__init__(options, recipe)
        if options.nesterov and (recipe.momentum <= 0 or options.dampening != 0):
            raise InputError("sgd: Nesterov momentum needs momentum > 0 and dampening 0 (as torch.optim.SGD)")
        self.momentum = recipe.momentum
        self.buf: Tensor | None = None

    def step(self, theta: Tensor, grad: Tensor, lr: float) -> None:
        o, mu = self.options, self.momentum
        g = grad.add_(self.weight_decay * theta) if self.weight_decay else grad
        if mu:
            if self.buf is None:
                self.buf = g  # the engine's gradient is fresh each step: the buffer may own it
            else:
                self.buf.mul_(mu).add_((1 - o.dampening) * g if o.dampening else g)
            g = g + mu * self.buf if o.nesterov else self.buf
        theta.sub_(lr * g)


@dataclass(frozen=True)
class AdamWOptions:
    beta1: float = field(default=0.9, metadata={"help": "first-moment decay β₁", "min": 0.0, "max": 1.0})
    beta2: float = field(default=0.999, metadata={"help": "second-moment decay β₂", "min": 0.0, "max": 1.0})
    eps: float = field(default=1e-8, metadata={"help": "ε added to √v̂", "min": 0.0})


class AdamW(Optimizer):
    """torch.optim.AdamW: θ ← θ(1 − lr·wd); m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
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


OPTIMIZERS: dict[str, type[Optimizer]] = {c.name: c for c in (SGD, AdamW)}


# ---- learning-rate schedules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupOptions:
    warmup: int = field(default=0, metadata={"help": "linear warmup steps W: factor (t + 1)/W for t < W", "min": 0})


@dataclass(frozen=True)
class DecayOptions(WarmupOptions):
    floor: float = field(default=0.0, metadata={"help": "the factor at the last step, as a fraction of lr",
                                                "min": 0.0, "max": 1.0})


class Schedule(ABC):
    """The learning rate of optimizer step t (0-based) of T as lr·factor(t, T): a linear warmup over the first W
    steps, (t + 1)/W (torch's LinearLR(start_factor=1/W, total_iters=W − 1)), then `decay` of the progress
    p = (t − W)/(T − W) ∈ [0, 1)."""

    name: ClassVar[str]
    Options: ClassVar[type] = WarmupOptions

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
    """factor 1 after the warmup."""

    name = "constant"


class Linear(Schedule):
    """floor + (1 − floor)(1 − p): torch's LinearLR(start_factor=1, end_factor=floor, total_iters=T − W)."""

    name = "linear"
    Options = DecayOptions

    def decay(self, p: float) -> float:
        return self.options.floor + (1 - self.options.floor) * (1 - p)


class Cosine(Schedule):
    """floor + (1 − floor)(1 + cos πp)/2: torch's CosineAnnealingLR(T_max=T − W, eta_min=floor·lr)."""

    name = "cosine"
    Options = DecayOptions

    def decay(self, p: float) -> float:
        return self.options.floor + (1 - self.options.floor) * (1 + math.cos(math.pi * p)) / 2


SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (Constant, Linear, Cosine)}


# ---- specs -------------------------------------------------------------------------------------------------

Plugin = TypeVar("Plugin", Optimizer, Schedule)


def _load_class(path: str, name: str, base: type[Plugin], what: str) -> type[Plugin]:
    file = Path(path).resolve()
    if not file.is_file():
        raise InputError(f"{what} file {path} does not exist")
    module_name = f"ifledger_user_{content_hash(str(file), length=8)}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise InputError(f"{path} has no {base.__name__} subclass named {name!r}")
    return cls


def _value(field_: dataclasses.Field, text: str, where: str) -> object:
    kind = field_.type if isinstance(field_.type, type) else {"bool": bool, "int": int, "float": float}[field_.type]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value: object = text.lower() in ("true", "1")
        else:
            value = kind(text)
    except ValueError:
        raise InputError(f"{where}: {field_.name}={text!r} must be {kind.__name__}") from None
    low, high = field_.metadata.get("min"), field_.metadata.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{where}: {field_.name}={text} is out of range [{low}, {high}]")
    return value


def resolve(spec: str, registry: dict[str, type[Plugin]], base: type[Plugin], what: str
            ) -> tuple[type[Plugin], object, str]:
    """(class, options, canonical spec) of `name:key=value,...` or `path/file.py:Class`. The canonical spec names
    only the options that differ from their defaults, so equal meanings hash equally."""
    head, _, rest = spec.partition(":")
    if head.endswith(".py"):
        return (cls := _load_class(head, rest, base, what)), cls.Options(), f"{Path(head).resolve()}:{rest}"
    cls = registry.get(head)
    if cls is None:
        raise InputError(f"unknown {what} {head!r}; use one of {', '.join(registry)} or path/to/file.py:Class")
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    values = {}
    for item in filter(None, rest.split(",")):
        key, eq, text = item.partition("=")
        if not eq or key not in fields:
            raise InputError(f"{what} {spec!r}: unknown option {key!r}; {head} takes {', '.join(fields) or 'none'}")
        values[key] = _value(fields[key], text, f"{what} {spec!r}")
    options = cls.Options(**values)
    changed = [f"{k}={getattr(options, k)}" for k, f in fields.items() if getattr(options, k) != f.default]
    return cls, options, head + (":" + ",".join(changed) if changed else "")
