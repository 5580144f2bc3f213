"""The `Study`: one training setup. A user subclasses it in a few lines, the way a kronfluence user
writes a `Task`: data, model, per-example loss, recipe, and (optionally) measurements."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from datasets import DatasetDict
from torch import Tensor, nn
from torch.func import functional_call

from store.records import InputError, StudyRecord, content_hash

Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Recipe:
    """How a model of the study is trained, and how its ground truths are produced.

    optimizer: "sgd" (minibatch SGD with momentum; `epochs` passes over the data) or "newton"
      (full-batch Newton steps on the whole objective, for small convex models; `epochs` = steps).
    Objective: J(θ) = mean_i∈kept L(z_i, θ) + (weight_decay / 2)‖θ‖².
    damping: λ added to the curvature by estimators and to the PBRF proximity term alike.
    warm_epochs: the `warm` regime's budget; pbrf_steps: the `pbrf` regime's optimiser budget.
    """

    optimizer: str = "sgd"
    epochs: int = 40
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 1e-3
    seeds: int = 5
    damping: float = 2e-3
    warm_epochs: int = 10
    pbrf_steps: int = 100
    dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "newton"):
            raise InputError(f"recipe optimizer {self.optimizer!r} is unknown; use 'sgd' or 'newton'")
        if self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
            raise InputError("recipe seeds, epochs and batch_size must be at least 1")


class Study:
    """Subclass and fill in `name`, `recipe`, `dataset`, `model` and `loss`.

    `dataset()` returns a `datasets.DatasetDict` with a `train` split and a `query` split, each with
    columns `x` (features or token ids) and `y` (targets). Measurements default to the training loss
    on each query example (ids `query_loss/<i>`); override `measurements` and `measure` for margins,
    log-probabilities or any other scalar function of the model.
    """

    name: ClassVar[str] = ""
    recipe: ClassVar[Recipe] = Recipe()
    query_split: ClassVar[str] = "query"
    # what `ifledger run` does when not told otherwise
    default_methods: ClassVar[tuple[str, ...]] = ("exact",)
    default_sets: ClassVar[tuple[str, ...]] = ("single:n=100",)
    default_regimes: ClassVar[tuple[str, ...]] = ("scratch",)
    source: str = ""  # set by `load_study`: how the ledger finds this study again

    def dataset(self) -> DatasetDict:
        raise NotImplementedError

    def model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss, shape [batch]."""
        raise NotImplementedError

    def measurements(self) -> dict[str, str]:
        """measurement_id -> description, in the order `measure` returns them."""
        n = len(self.tensors(self.query_split)[1])
        return {f"query_loss/{i}": f"training loss on {self.query_split} example {i}" for i in range(n)}

    def measure(self, forward: Forward) -> Tensor:
        """All measurements of one model, shape [M]; `forward` maps inputs to outputs."""
        x, y = self.tensors(self.query_split)
        return self.loss(forward(x), y)

    # ---- derived, not meant to be overridden -------------------------------------------------

    @cached_property
    def data(self) -> DatasetDict:
        """`dataset()`, loaded once."""
        return self.dataset()

    @cached_property
    def _tensors(self) -> dict[str, tuple[Tensor, Tensor]]:
        dtype = getattr(torch, self.recipe.dtype)
        out = {}
        for split, ds in self.data.items():
            columns = ds.with_format("torch")[:]
            x, y = columns["x"], columns["y"]
            out[split] = (x.to(dtype) if x.is_floating_point() else x,
                          y.to(dtype) if y.is_floating_point() else y)
        return out

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        return self._tensors[split]

    @property
    def n_train(self) -> int:
        return len(self.tensors("train")[1])

    @cached_property
    def flat(self) -> FlatModel:
        return FlatModel(self.model().to(getattr(torch, self.recipe.dtype)))

    def init_params(self, seed: int) -> Tensor:
        """Initial flat parameters for `seed` (the same with or without any removal set)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.flat.flatten(self.model().to(getattr(torch, self.recipe.dtype)))

    def forward(self, theta: Tensor) -> Forward:
        return lambda x: self.flat(theta, x)

    @cached_property
    def study_hash(self) -> str:
        return content_hash(self.config())

    def record(self) -> StudyRecord:
        return StudyRecord(self.name, self.study_hash, self.source, self.config(), self.n_train,
                           self.flat.n_params, self.measurements())

    def config(self) -> dict:
        digest = hashlib.sha256()
        for split in sorted(self._tensors):
            for t in self._tensors[split]:
                digest.update(split.encode())
                digest.update(t.contiguous().numpy().tobytes())
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "recipe": dataclasses.asdict(self.recipe),
            "model": repr(self.flat.module),
            "data_sha256": digest.hexdigest(),
            "measurements": list(self.measurements()),
        }


class FlatModel:
    """A module seen as a function of one flat parameter vector θ ∈ R^P (for vmap, Hessians, CG)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]
        self.n_params = sum(self.sizes)

    def flatten(self, module: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.module, self.unflatten(theta), (x,))


def builtin_studies() -> dict[str, type[Study]]:
    from retrain.studies import BUILTIN

    return BUILTIN


def load_study(spec: str) -> Study:
    """A built-in name (`linreg`) or `path/to/file.py:ClassName`."""
    studies = builtin_studies()
    if spec in studies:
        study = studies[spec]()
        study.source = spec
        study.flat  # noqa: B018 (build the module now, outside any torch.func transform)
        return study
    path, _, cls_name = spec.rpartition(":")
    if not path or not cls_name or not path.endswith(".py"):
        raise InputError(f"unknown study {spec!r}; use one of {', '.join(sorted(studies))} "
                         "or path/to/file.py:ClassName")
    file = Path(path).resolve()
    if not file.is_file():
        raise InputError(f"study file {path} does not exist")
    module_name = f"ifledger_user_{content_hash(str(file), length=8)}"
    spec_obj = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except Exception as e:
        raise InputError(f"study file {path} failed to import: {type(e).__name__}: {e}") from e
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Study)):
        raise InputError(f"{path} has no Study subclass named {cls_name!r}")
    if not cls.name:
        raise InputError(f"{path}:{cls_name} must set a `name`")
    study = cls()
    study.source = f"{file}:{cls_name}"
    try:
        study.flat  # noqa: B018 (build the module now, outside any torch.func transform)
    except Exception as e:
        raise InputError(f"{path}:{cls_name}.model() failed: {type(e).__name__}: {e}") from e
    return study
