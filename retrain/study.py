"""The `Study`: one training setup. A user subclasses it in a few lines, the way a kronfluence user
writes a `Task`: data, model, per-example loss, recipe, and (optionally) measurements.

Longer than ~300 lines on purpose: `Recipe` and `Study` are the whole user-facing API of a training setup, and
the checks that refuse an unrunnable study in one line before anything is written (`check_runnable`,
`load_study`) belong beside the hooks they check."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import DatasetDict
from torch import Tensor, nn

from retrain.flat_model import FlatModel, code_hash
from retrain.optimizers import OPTIMIZERS, SCHEDULES, Optimizer, Schedule, resolve
from retrain.options import NoOptions, Registry, label, split_spec
from retrain.trainer import PAIRINGS, TrainingJob, command_scripts
from store.records import InputError, StudyRecord, content_hash

Forward = Callable[[Tensor], Tensor]
DTYPES = ("float64", "float32", "bfloat16")
DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """The device `spec` names: `auto` is cuda when torch sees a GPU, else cpu; `cpu`; `cuda` or `cuda:N` (refused
    in one line when torch sees no such GPU)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"--device {spec}: not a device; give {DEVICES}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--device {spec}: torch sees {torch.cuda.device_count()} GPU(s); give auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {spec}: not a device; give {DEVICES}")
    return device


def tensor_bytes(t: Tensor) -> bytes:
    """The bytes of a tensor's values, from a CPU copy (any device, any dtype: bfloat16 has no numpy type)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


@dataclass(frozen=True)
class Recipe:
    """How a model of the study is trained, and how its ground truths are produced.

    optimizer: "newton" (full-batch Newton steps on J, for small convex models; `epochs` = steps), or a
      minibatch optimizer spec of `retrain.optimizers`: "sgd" (torch.optim.SGD; momentum = `momentum`; options
      dampening, nesterov) or "adamw" (torch.optim.AdamW; options beta1, beta2, eps), e.g. "adamw:beta2=0.95",
      or "path/file.py:Class". `epochs` passes over the data, minibatches of `batch_size` in the study's
      `example_order`; `drop_last` skips each epoch's last partial batch.
    lr, schedule: the learning rate of optimizer step t of T is lr·factor(t, T), schedule "constant", "linear"
      or "cosine" with options warmup (steps) and floor (final factor), e.g. "cosine:warmup=100,floor=0.1".
    max_grad_norm: clip each model's minibatch gradient to this global norm (torch.nn.utils.clip_grad_norm_;
      0 = no clipping). The gradient clipped is that of the mean loss, before any weight decay.
    Objective: J(θ) = mean_i∈kept L(z_i, θ) + (weight_decay / 2)‖θ‖². A minibatch step uses the mean loss over
      the batch's kept examples; a batch with none kept still takes a step (zero loss gradient: the optimizer's
      state, decay, step count and schedule advance as in a torch.optim loop on that masked loss).
    weight_decay: under sgd and newton, J's L2 term (sgd adds wd·θ to the gradient, as torch.optim.SGD does);
      under adamw, the decoupled decay θ ← θ(1 − lr·wd) of torch.optim.AdamW. The influence formulas and the
      `pbrf` regime are defined on J either way: H = G + wd·I, proximity (λ + wd). AdamW does not minimise J,
      so under adamw wd·I in H is a model of its decay, and `damping` is what keeps H + λI well conditioned.
    damping: λ, added on top of weight_decay: estimators invert G + (wd + λ)I and the PBRF proximity term is
      ((wd + λ)/2)‖θ − θ*‖², so the total curvature shift is wd + λ (the defaults, wd 1e-3 and λ 2e-3, shift it by
      3e-3; to shift it by s in all, set damping = s − wd). `ifledger studies` and the report print both.
    warm_epochs: the `warm` regime's budget (its schedule runs afresh over these epochs, with fresh optimizer
      state); pbrf_steps: the `pbrf` regime's optimiser budget.
    dtype: the parameters' and the float data's dtype, "float64", "float32" or "bfloat16". Under bfloat16 the
      explicit solves are refused (`exact`, the `newton` optimizer; torch has no bfloat16 inverse) and the small
      eigendecompositions of `arnoldi` and `ekfac` are taken in float32.
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
    schedule: str = "constant"
    max_grad_norm: float = 0.0
    drop_last: bool = False

    # fields added after ledgers existed: left out of the hash at their defaults, so old studies keep their hash
    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ("schedule", "max_grad_norm", "drop_last")

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
            raise InputError("recipe seeds, epochs and batch_size must be at least 1")
        if self.dtype not in DTYPES:
            raise InputError(f"recipe dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.optimizer == "newton" and self.dtype == "bfloat16":
            raise InputError("recipe optimizer newton solves with the Hessian, which torch cannot in bfloat16; "
                             "use dtype float32 or a minibatch optimizer")
        if self.max_grad_norm < 0:
            raise InputError("recipe max_grad_norm must be >= 0 (0: no clipping)")
        if self.optimizer != "newton":
            object.__setattr__(self, "optimizer", resolve(self.optimizer, OPTIMIZERS)[2])
            self.make_optimizer()  # refuses bad combinations now, not inside a training task
        object.__setattr__(self, "schedule", resolve(self.schedule, SCHEDULES)[2])

    def make_optimizer(self) -> Optimizer:
        """A fresh optimizer (fresh state) for a minibatch run."""
        cls, options, _ = resolve(self.optimizer, OPTIMIZERS)
        return cls(options, self)

    def make_schedule(self) -> Schedule:
        cls, options, _ = resolve(self.schedule, SCHEDULES)
        return cls(options)

    def config(self) -> dict:
        """The hashed form: every field, less later fields at their defaults (they keep the old meaning)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self._LATER_FIELDS or v != defaults[k]}


class Study(ABC):
    """Subclass and fill in `name`, `recipe`, `dataset`, `model` and `loss` (a study without one of the three
    methods is refused when it is loaded).

    `dataset()` returns a `datasets.DatasetDict` with a `train` split and a `query` split, each with
    columns `x` (features or token ids) and `y` (targets). Measurements default to the training loss
    on each query example (ids `query_loss/<i>`); override `measurements` (ids and descriptions) and `measure`
    (the values keyed by those ids) for margins, log-probabilities or any other scalar function of the model.
    The study hash covers the code of the study's own classes (below `Study`), so editing `loss` makes a new
    study. A study with settings (a checkpoint folder, a data size) declares an `Options` dataclass, read as
    `self.options`: they are given in the spec, stored in the ledger with the study and part of its hash, so
    nothing it depends on hides in the environment.
    """

    name: ClassVar[str] = ""
    recipe: ClassVar[Recipe] = Recipe()
    query_split: ClassVar[str] = "query"
    # what `ifledger run` does when not told otherwise
    default_methods: ClassVar[tuple[str, ...]] = ("exact",)
    default_sets: ClassVar[tuple[str, ...]] = ("single:n=100",)
    default_regimes: ClassVar[tuple[str, ...]] = ("scratch",)
    # typed options, given as `path/to/file.py:ClassName:key=value,...` (fields declared with retrain.options.option)
    Options: ClassVar[type] = NoOptions
    # weight changes are reported per block: block name -> regex over named_parameters names (retrain.blocks);
    # empty: one block per named parameter
    parameter_blocks: ClassVar[dict[str, str]] = {}
    # who trains `scratch` and `warm` models (and the full-data ones): the engine, unless the study overrides
    # `train_model` or sets `train_command` (retrain.trainer). `pairing` says how its runs pair with the full-data
    # run of their seed: "masked" (the engine's: the same minibatches in the same order, removed examples masked
    # out of each batch's mean loss) or "dropped" (a data loader without the removed examples: batches differ)
    pairing: ClassVar[str] = "masked"
    # a command that trains one model, for training code that is not importable, e.g.
    # "python train.py --keep {kept_file} --seed {seed} --out {out}": run without a shell in the job's folder, the
    # fields of `retrain.trainer.TrainingJob` filled in; it writes the model's state_dict to `{out}/model.pt`.
    # Arguments naming files relative to the study file's folder are passed as absolute paths, and hashed
    train_command: ClassVar[str] = ""
    source: str = ""  # set by `load_study`: how the ledger finds this study again, options included
    device: torch.device = torch.device("cpu")  # where its tensors and models live (`use_device`); not hashed

    def __init__(self, options: Any = None) -> None:
        self.options = self.Options() if options is None else options

    @abstractmethod
    def dataset(self) -> DatasetDict:
        """The data: a `DatasetDict` with `train` and the splits the measurements read, columns `x` and `y`."""

    @abstractmethod
    def model(self) -> nn.Module:
        """A fresh module (its initialisation is drawn under each seed)."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss, shape [batch], each from its own example alone (the engine evaluates it
        once on the examples of many models)."""

    def measurements(self) -> dict[str, str]:
        """measurement_id -> description; this order is the order of the measurements everywhere."""
        n = len(self.tensors(self.query_split)[1])
        return {f"query_loss/{i}": f"training loss on {self.query_split} example {i}" for i in range(n)}

    def measure(self, forward: Forward) -> Mapping[str, Tensor]:
        """Every measurement of one model, a scalar keyed by its id; `forward` maps inputs to outputs."""
        x, y = self.tensors(self.query_split)
        return indexed("query_loss", self.loss(forward(x), y))

    def measurements_without_gradient(self) -> set[str]:
        """Ids of measurements with no useful gradient (a rank, an accuracy, a count: piecewise constant in θ). No
        method registers a prediction for them (a first-order prediction would be 0 by construction); their
        outcomes are still measured. Default none."""
        return set()

    def measurement_tags(self) -> Mapping[str, Mapping[str, str]]:
        """measurement_id -> named facets of it that views can group and join on, e.g. {"direction": "forward",
        "entity": "bakito"}; stored in the ledger's `measurements.tags` (JSON). Default none."""
        return {}

    def example_order(self, seed: int, epoch: int) -> Tensor | Sequence[int]:
        """The order in which epoch `epoch` of seed `seed` visits the training examples: N indices into the
        train split, cut into consecutive minibatches. The same with or without a removal set (removed examples
        are masked within their batch), so `scratch` runs are paired. Override to reproduce a data loader, e.g.
        `numpy.random.default_rng(1000 + seed).permutation(self.n_train)`."""
        return torch.randperm(self.n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

    def true_labels(self) -> dict[int, int]:
        """Known label errors, training index -> true label (default none): ground truth for mislabel detection,
        written to the ledger's `flipped_labels` table. Estimators read only `tensors()`, never this."""
        return {}

    def supplied_model(self, seed: int) -> Mapping[str, Tensor] | str | os.PathLike | None:
        """The full-data model of `seed` trained elsewhere: a `state_dict`, or the path of a file written by
        `torch.save(model.state_dict(), path)`; None (the default) trains it from the recipe. A supplied model is
        what predictions are computed on and what `warm` and `pbrf` start from; `scratch` still retrains the
        full-data baseline from the recipe, and the ledger's `models` table records how far apart the two are."""
        return None

    def train_model(self, job: TrainingJob) -> Mapping[str, Tensor] | str | os.PathLike | None:
        """Train the model of `job` (`retrain.trainer.TrainingJob`: seed, regime, kept indices, new labels, warm's
        starting checkpoint, a fresh folder, a device, epochs) with the study's own code, one model per call, and
        return its `state_dict`, the path of a file written by `torch.save(model.state_dict(), path)`, or None
        when it wrote `{job.out}/model.pt`. Not overridden (and no `train_command`): the engine trains the study.
        Declare `pairing` = "dropped" when the examples are dropped from the data loader rather than masked."""
        return None

    # ---- derived, not meant to be overridden -------------------------------------------------

    def use_device(self, device: torch.device) -> Study:
        """Put the study's tensors, module and supplied models on `device` from now on (they are rebuilt there on
        next use); the study hash does not change. Returns the study."""
        if device != self.device:
            self.device = device
            for cached in ("_tensors", "flat", "supplied_params"):
                self.__dict__.pop(cached, None)
        return self

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
            out[split] = ((x.to(dtype) if x.is_floating_point() else x).to(self.device),
                          (y.to(dtype) if y.is_floating_point() else y).to(self.device))
        return out

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        return self._tensors[split]

    @property
    def n_train(self) -> int:
        return len(self.tensors("train")[1])

    @cached_property
    def flat(self) -> FlatModel:
        return FlatModel(self.model().to(getattr(torch, self.recipe.dtype)).to(self.device))

    def init_params(self, seed: int) -> Tensor:
        """Initial flat parameters for `seed` (the same with or without any removal set, on any device: drawn on the
        CPU)."""
        self.flat  # noqa: B018 (built first: building it inside the seeded fork would draw from the seed's stream)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.flat.flatten(self.model().to(getattr(torch, self.recipe.dtype))).to(self.device)

    def checked_order(self, seed: int, epoch: int) -> Tensor:
        """`example_order(seed, epoch)` as an int64 tensor, refused unless it holds N indices in [0, N)."""
        n = self.n_train
        order = torch.as_tensor(self.example_order(seed, epoch)).long()
        if order.shape != (n,) or (n and (order.min() < 0 or order.max() >= n)):
            raise InputError(f"{self.name}: example_order({seed}, {epoch}) must return {n} indices in [0, {n}), "
                             f"not shape {tuple(order.shape)}")
        return order

    @cached_property
    def supplied_params(self) -> dict[int, Tensor]:
        """Flat parameters of the supplied models by seed; a state_dict whose names or shapes do not match the
        model is refused, naming the first mismatch."""
        supplied = {}
        for seed in range(self.recipe.seeds):
            state = self.supplied_model(seed)
            if state is None:
                continue
            where = f"{self.name}: supplied model of seed {seed}"
            if isinstance(state, (str, os.PathLike)):
                where += f" ({state})"
                try:
                    state = torch.load(state, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise InputError(f"{where} does not load: {type(e).__name__}: {e}") from e
            supplied[seed] = self.flat_params(state, where).to(self.device)
        return supplied

    def flat_params(self, state: Any, where: str) -> Tensor:
        """A state_dict as flat parameters [P] in `FlatModel` order and the recipe's dtype, on the device its tensors
        are on; refused (InputError naming `where` and the first mismatch) unless its names and shapes are the
        model's."""
        if not isinstance(state, Mapping):
            raise InputError(f"{where} is a {type(state).__name__}, not a state_dict")
        expected = dict(zip(self.flat.names, self.flat.shapes))
        for name, shape in expected.items():
            if name not in state:
                raise InputError(f"{where} has no parameter {name!r}")
            if tuple(state[name].shape) != tuple(shape):
                raise InputError(f"{where}: {name!r} has shape {tuple(state[name].shape)}, the model's is "
                                 f"{tuple(shape)}")
        buffers = {name for name, _ in self.flat.module.named_buffers()}
        tied = self.tied_names()
        for name in state:
            if name in tied and name not in expected:  # a tied parameter's second name (GPT-2's lm_head.weight)
                if not torch.equal(state[name], state[tied[name]]):
                    raise InputError(f"{where}: {name!r} differs from {tied[name]!r}, the parameter it is tied to "
                                     "in the model")
            elif name not in expected and name not in buffers:
                raise InputError(f"{where} has {name!r}, which the model does not")
        dtype = getattr(torch, self.recipe.dtype)
        return torch.cat([state[n].detach().reshape(-1).to(dtype) for n in expected])

    def tied_names(self) -> dict[str, str]:
        """Every name the model's `state_dict` holds a parameter under, to the name `named_parameters` gives it (a
        tied weight is one parameter under two names; its state_dict carries both)."""
        module = self.flat.module
        first = {id(p): n for n, p in module.named_parameters()}
        return {n: first[id(t)] for n, t in module.state_dict(keep_vars=True).items() if id(t) in first}

    @property
    def external_trainer(self) -> bool:
        """Whether the study's own code trains its `scratch`, `warm` and full-data models (`train_model` or
        `train_command`), one model per job."""
        return bool(self.train_command) or type(self).train_model is not Study.train_model

    @property
    def source_dir(self) -> Path:
        """The folder of the study's file: `train_command` arguments are relative to it."""
        return Path(inspect.getsourcefile(type(self)) or ".").resolve().parent

    @cached_property
    def trainer_config(self) -> dict:
        """The hashed description of an external trainer, taken when the study is loaded (as `code`): its pairing,
        and its command with the sha256 of each script file the command names (a `train_model` hook is hashed with
        the study's class code)."""
        if self.pairing not in PAIRINGS:
            raise InputError(f"{self.name}: pairing must be one of {', '.join(PAIRINGS)}, not {self.pairing!r}")
        return {"pairing": self.pairing} | ({"command": self.train_command, "scripts": command_scripts(
            self.train_command, self.source_dir)} if self.train_command else {})

    def forward(self, theta: Tensor) -> Forward:
        return lambda x: self.flat(theta, x)

    @cached_property
    def measurement_ids(self) -> list[str]:
        return list(self.measurements())

    @cached_property
    def differentiable(self) -> list[bool]:
        """Per measurement, in the order of `measurements()`: whether methods predict it (it is not in
        `measurements_without_gradient()`); refused (one line) when that or `measurement_tags()` names an
        undeclared id."""
        declared = set(self.measurement_ids)
        for hook, ids in (("measurements_without_gradient", self.measurements_without_gradient()),
                          ("measurement_tags", self.measurement_tags())):
            unknown = sorted(set(ids) - declared)[:3]
            if unknown:
                raise InputError(f"{self.name}: {hook}() names measurements that measurements() does not declare: "
                                 f"{unknown}")
        without = self.measurements_without_gradient()
        return [i not in without for i in self.measurement_ids]

    def measurement_vector(self, forward: Forward) -> Tensor:
        """`measure(forward)` as a tensor [M] in the order of `measurements()`; refused (one line) when its ids
        are not exactly the declared ones."""
        try:
            values = self.measure(forward)
        except InputError:
            raise
        except Exception as e:  # the study's own code: one line, not a traceback from inside a flow
            raise InputError(f"{self.name}.measure() failed: {type(e).__name__}: {e}") from None
        if values.keys() != set(self.measurement_ids):
            extra = sorted(set(values) - set(self.measurement_ids))[:3]
            missing = [i for i in self.measurement_ids if i not in values][:3]
            raise InputError(f"{self.name}: measure() must return exactly the ids of measurements(); "
                             f"undeclared {extra}, missing {missing}")
        return torch.stack([values[i].reshape(()) for i in self.measurement_ids])

    @cached_property
    def code(self) -> str:
        """`code_hash` of the study's class, taken when the study is loaded (before its file can change)."""
        return code_hash(type(self), Study)

    @cached_property
    def study_hash(self) -> str:
        return content_hash(self.config())

    def record(self) -> StudyRecord:
        given = self.tensors("train")[1]
        return StudyRecord(self.name, self.study_hash, self.source, self.config(), self.n_train,
                           self.flat.n_params, self.measurements(),
                           {j: (int(given[j]), int(t)) for j, t in self.true_labels().items()},
                           tuple(self.default_regimes),
                           {i for i, d in zip(self.measurement_ids, self.differentiable) if not d},
                           {i: dict(t) for i, t in self.measurement_tags().items()},
                           self.pairing if self.external_trainer else "masked")

    def config(self) -> dict:
        digest = hashlib.sha256()
        for split in sorted(self._tensors):
            for t in self._tensors[split]:
                digest.update(split.encode())
                digest.update(tensor_bytes(t))
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "recipe": self.recipe.config(),
            "model": repr(self.flat.module),
            "data_sha256": digest.hexdigest(),
            "measurements": list(self.measurements()),
            "code": self.code,
        } | ({"options": dataclasses.asdict(self.options)} if dataclasses.fields(self.Options) else {}) | (
            {"supplied_models": {str(s): params_sha256(t) for s, t in self.supplied_params.items()}}
            if self.supplied_params else {}) | ({"trainer": self.trainer_config} if self.external_trainer else {})


def indexed(prefix: str, values: Tensor) -> dict[str, Tensor]:
    """{f"{prefix}/{i}": values[i]}: measurements numbered by position (`query_loss/0`, ...)."""
    return {f"{prefix}/{i}": v for i, v in enumerate(values.unbind())}


def params_sha256(theta: Tensor) -> str:
    """sha256 of flat parameters' bytes: the identity of a supplied model."""
    return hashlib.sha256(tensor_bytes(theta)).hexdigest()


def builtin_studies() -> dict[str, type[Study]]:
    """Every built-in study class by name (imports them all)."""
    from retrain.studies import BUILTIN, builtin_class

    return {name: builtin_class(name) for name in BUILTIN}


def check_runnable(study: Study, where: str) -> None:
    """Refuse a study that cannot run before anything is written: its data must load with a `train` and a query
    split, its loss give one value per example from that example alone, and its measurements one finite value
    per id at the initial model of seed 0."""
    try:
        data = study.data
    except Exception as e:
        raise InputError(f"{where}.dataset() failed: {type(e).__name__}: {e}") from None
    for split in ("train", study.query_split):
        if split not in data:
            raise InputError(f"{where}.dataset() has no {split!r} split (it has {', '.join(data) or 'none'})")
    try:
        x, y = study.tensors("train")
        forward = study.forward(study.init_params(0))
        outputs = forward(x[:4])
        losses = study.loss(outputs, y[:4])
        alone = [study.loss(outputs[i : i + 1], y[i : i + 1]) for i in range(len(y[:4]))]
    except Exception as e:
        raise InputError(f"{where}: running it failed: {type(e).__name__}: {e}") from None
    r = study.recipe
    if r.optimizer != "newton" and r.drop_last and len(y) < r.batch_size:
        raise InputError(f"{where}: recipe drop_last with {len(y)} training examples and batch_size {r.batch_size} "
                         "trains no step; lower batch_size or set drop_last=False")
    if tuple(losses.shape) != (len(y[:4]),):
        raise InputError(f"{where}.loss() must return one loss per example (shape [batch]), not shape "
                         f"{list(losses.shape)}")
    if not losses.is_floating_point():
        raise InputError(f"{where}.loss() must return floating-point losses (they are differentiated), not "
                         f"{losses.dtype}")
    if not torch.allclose(losses, torch.cat(alone), rtol=1e-6, atol=1e-12, equal_nan=True):
        raise InputError(f"{where}.loss() must compute each example's loss from that example alone (the engine "
                         "computes it for many models' examples at once); its losses of 4 examples together differ "
                         "from each one's alone")
    try:
        values = study.measurement_vector(forward)  # refuses ids other than those of measurements()
        study.differentiable  # noqa: B018 (refuses hooks that name undeclared ids)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{where}.measure() failed: {type(e).__name__}: {e}") from None
    if not torch.isfinite(values).all():
        raise InputError(f"{where}.measure() gives non-finite values at the initial model of seed 0")


def load_study(spec: str) -> Study:
    """A built-in name (`linreg`) or `path/to/file.py:ClassName`, either with `:key=value,...` options (refused in
    one line unless it can run)."""
    studies = builtin_studies()
    name = split_spec(spec)[0]
    cls, options = Registry("study", Study, studies.values()).parse(spec)
    study = cls(options)
    study.code  # noqa: B018 (the code as loaded)
    if study.external_trainer:
        study.trainer_config  # noqa: B018 (the training scripts as loaded)
    elif study.pairing != "masked":
        raise InputError(f"{study.name}: pairing {study.pairing!r} is for a study trained by its own code "
                         "(train_model or train_command); the engine masks removed examples (pairing 'masked')")
    if name in studies:
        study.source = label(name, options, cls.Options())
        study.flat  # noqa: B018 (build the module now, outside any torch.func transform)
        return study
    path = name.rpartition(":")[0]
    study.source = label(f"{Path(path).resolve()}:{cls.__name__}", options, cls.Options())
    try:
        study.flat  # noqa: B018 (build the module now, outside any torch.func transform)
    except Exception as e:
        raise InputError(f"{path}:{cls.__name__}.model() failed: {type(e).__name__}: {e}") from e
    check_runnable(study, f"{path}:{cls.__name__}")
    study.supplied_params  # noqa: B018 (a checkpoint that does not fit is refused before anything is written)
    return study
