"""Regimes: how ground truth is produced for a removal (or relabel) set, as outcome records.

scratch: train from the seed's initialisation and example order, minus the set (or with its new labels).
warm:    continue the full-data model of the seed for `warm_epochs`, minus the set (or with its new labels).
pbrf:    minimise the proximal Bregman response objective from the full-data model θ*:
         (1/N) Σ_i D_L(f_θ(x_i), f_θ*(x_i)) − (1/N) Σ_{j∈S} L(z_j, θ) + ((λ + wd)/2)‖θ − θ*‖²,
         with + (1/N) Σ_{j∈S} L((x_j, y'_j), θ) added for a relabel set (z_j's label y_j replaced by y'_j).
frozen:  `frozen:scope=REGEX[,from=init|full]`: only the parameters whose `named_parameters` name matches the
         scope move; from the seed's initialisation for `epochs` (init, as scratch) or from the full-data model for
         `warm_epochs` (full, as warm). A method with the same scope predicts the `from=full` retraining.
The baseline of every regime is the same regime run on the `full` (empty) set. Each regime is a `Regime`
subclass (its budget and its `train`); a user's is `path/to/file.py:ClassName`."""

from __future__ import annotations

import io
import math
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import grad, vmap

from retrain.blocks import block_changes
from retrain.curvature import EXPLICIT_MAX_PARAMS, curvature_solver, scope_mask
from retrain.engine import Progress, Trained, example_losses, measure, train
from retrain.options import Extension, Registry, label, option
from retrain.study import Study, params_sha256
from retrain.trainer import TrainerFailure, TrainingJob, run_job
from store.records import InputError, ModelRecord, RunRecord


@dataclass(frozen=True)
class Job:
    set_id: str
    seed: int
    indices: tuple[int, ...]
    new_labels: tuple[float, ...] | None = None  # a relabel set: the points' new labels (they are kept)
    weight_change: bool = False  # measure θ_run − θ* per parameter block (the set has predicted weight changes)


def params_to_bytes(theta: Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(theta.detach().cpu().clone(), buffer)
    return buffer.getvalue()


def load_params(stored: bytes | Path | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """A full-data model's flat parameters on `device`, from what holds them: the ledger's BLOB (the bytes of
    `params_to_bytes`), the path of its model file beside the ledger, or a tensor already loaded."""
    if isinstance(stored, Tensor):
        return stored.to(device)
    return torch.load(io.BytesIO(stored) if isinstance(stored, bytes) else stored, map_location=device,
                      weights_only=True)


def stacked_params(stored: Sequence[bytes | Path | Tensor], device: torch.device | str = "cpu") -> Tensor:
    """[S, P]: the models' parameters (as `load_params` takes them), loaded one at a time into one tensor, so that
    at most one model is held twice."""
    first = load_params(stored[0], device)
    thetas = torch.empty(len(stored), *first.shape, dtype=first.dtype, device=first.device)
    thetas[0] = first
    del first
    for k, one in enumerate(stored[1:], start=1):
        thetas[k] = load_params(one, device)
    return thetas


def masks_for(study: Study, jobs: Sequence[Job]) -> Tensor:
    """[K, N]: the training examples each job keeps (a relabel set keeps its points)."""
    masks = torch.ones(len(jobs), study.n_train, dtype=torch.bool)
    for k, job in enumerate(jobs):
        if job.new_labels is None:
            masks[k, list(job.indices)] = False
    return masks


def targets_for(study: Study, jobs: Sequence[Job]) -> Tensor | None:
    """[K, N]: each job's training targets, the study's `y` with a relabel set's new labels in place; None when no
    job relabels."""
    if all(job.new_labels is None for job in jobs):
        return None
    y = study.tensors("train")[1]
    targets = y.expand(len(jobs), *y.shape).clone()
    for k, job in enumerate(jobs):
        if job.new_labels is not None:
            targets[k, list(job.indices)] = torch.tensor(job.new_labels, dtype=torch.float64).to(y)
    return targets


def pbrf(study: Study, theta_star: Tensor, masks: Tensor, progress: Progress | None = None,
         targets: Tensor | None = None) -> Trained:
    """Solve the PBRF for K models from their θ* [K, P] (all of one seed when preconditioned); `targets` [K, N]:
    each model's labels (a point whose label differs from the study's `y` is relabelled).

    Iterates θ ← θ − s·M∇P(θ) with backtracking on s (halved after a rejected step, doubled after an accepted
    one): M = (G* + (λ + wd)I)⁻¹ from the first model's θ* when the model is small enough, with s ≤ 1 (a Newton
    step at most); else M = I·lr with s unbounded, so that a small lr (AdamW's) costs a few doublings, not the
    budget. The fixed point is the PBRF optimum whatever M is. `converged`: over the last 5 iterations no accepted
    step moved θ by more than 1e-8·‖θ − θ*‖ (a stationarity test that also holds at the kinks of ReLU networks,
    where ∇P need not vanish)."""
    r = study.recipe
    x, y = study.tensors("train")
    n = len(y)
    prox = r.damping + r.weight_decay
    study.flat  # noqa: B018 (build the module outside vmap: its initialisation draws random numbers)
    targets = y.expand(len(masks), *y.shape) if targets is None else targets
    relabelled = (targets != y).reshape(len(masks), n, -1).any(-1).to(theta_star.dtype)
    removed = (~masks).to(theta_star)

    def anchors(th: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f = study.flat(th, x)
        return f, study.loss(f, y), grad(lambda out: study.loss(out, y).sum())(f)

    f_star, loss_star, dloss_star = vmap(anchors)(theta_star)

    k, relabels = len(masks), bool(relabelled.any())
    forward = vmap(study.flat, (0, None))

    def objectives(th: Tensor) -> Tensor:
        """[K]: each model's PBRF objective P(θ) = (1/N)Σ_i D(f_i(θ), f_i(θ*)) − (1/N)Σ_i (r_i + c_i)L(z_i, θ)
        + (1/N)Σ_i c_i L((x_i, y′_i), θ) + ((λ + wd)/2)‖θ − θ*‖², D the loss's Bregman divergence in the outputs,
        r_i = 1 for a removed and c_i = 1 for a relabelled point. The models run under vmap, their losses through
        the engine's `example_losses`."""
        f = forward(th, x)
        loss = example_losses(study, f, y.expand(k, *y.shape))
        bregman = loss - loss_star - ((f - f_star) * dloss_star).reshape(k, n, -1).sum(-1)
        diff = th - theta_star
        value = bregman.mean(1) - ((removed + relabelled) * loss).sum(1) / n + 0.5 * prox * (diff * diff).sum(1)
        return value + (relabelled * example_losses(study, f, targets)).sum(1) / n if relabels else value

    def value_and_gradient(th: Tensor) -> tuple[Tensor, Tensor]:
        th = th.detach().requires_grad_()
        with torch.enable_grad():
            value = objectives(th)
            return torch.autograd.grad(value.sum(), th)[0], value.detach()

    if theta_star.shape[1] <= EXPLICIT_MAX_PARAMS:
        solve = curvature_solver(study, theta_star[0], r.damping)
        direction, longest = (lambda g: solve(g.T).T), 1.0  # g A⁻¹ = (A⁻¹ gᵀ)ᵀ, A symmetric
    else:  # no P × P matrix: gradient steps
        direction, longest = (lambda g: r.lr * g), math.inf
    theta = theta_star.clone()
    g, val = value_and_gradient(theta)
    step = theta.new_ones(len(theta))
    moves: list[Tensor] = []
    converged = torch.zeros(len(theta), dtype=torch.bool, device=theta.device)
    for done in range(1, r.pbrf_steps + 1):
        candidate = theta - step[:, None] * direction(g)
        cg, cval = value_and_gradient(candidate)
        ok = cval <= val
        moves.append(torch.where(ok, (candidate - theta).norm(dim=1), torch.zeros_like(val)))
        theta = torch.where(ok[:, None], candidate, theta)
        val, g = torch.where(ok, cval, val), torch.where(ok[:, None], cg, g)
        step = torch.where(ok, (step * 2).clamp(max=longest), step / 2)
        if progress:
            progress(1)
        if len(moves) >= 5:
            converged = torch.stack(moves[-5:]).amax(0) <= 1e-8 * (theta - theta_star).norm(dim=1) + 1e-15
            if converged.all():
                if progress:
                    progress(r.pbrf_steps - done)
                break
    failures: list[str | None] = [None if torch.isfinite(t).all() else "diverged: non-finite PBRF solution"
                                  for t in theta]
    return Trained(theta, val, failures, converged.tolist())


class Regime(Extension, ABC):
    """How ground truth is produced: `train` the K models of a chunk (masks [K, N] mark the kept examples),
    within a budget of `steps(study)` progress steps per model. `run` (shared) measures them into records.
    An instance pickles as its spec, so a user's regime (`path/to/file.py:ClassName`) reaches process and
    Dask workers by name."""

    def __init__(self, options: Any = None, spec: str = ""):
        self.options = self.Options() if options is None else options
        self.spec = spec or self.name
        self.label = label(self.name, self.options, self.Options())

    def __reduce__(self) -> tuple:
        return parse_regime, (self.spec,)

    @abstractmethod
    def steps(self, study: Study) -> int:
        """Progress steps per model (epochs, or optimiser steps)."""

    relabels: ClassVar[bool] = False  # whether `train` takes `targets` (can retrain relabel sets)
    # the study trainer's regime name ("scratch", "warm") when a study with its own trainer trains this regime's
    # models; None: the engine or the solver produces them for every study (pbrf solves from θ*, frozen trains
    # with the engine's masks)
    trainer_regime: ClassVar[str | None] = None

    def check(self, study: Study) -> None:
        """Refuse (InputError) options that do not fit the study; nothing to check by default."""

    def trained_by_study(self, study: Study) -> bool:
        """Whether the study's own trainer trains this regime's models (one model per job), not the engine."""
        return study.external_trainer and self.trainer_regime is not None

    def chunk_size(self, study: Study, asked: int) -> int:
        """Models per retraining task: 1 when the study's trainer trains them, else `asked` (trained together)."""
        return 1 if self.trained_by_study(study) else asked

    @abstractmethod
    def train(self, study: Study, masks: Tensor, seeds: list[int], full_params: dict[int, Tensor],
              progress: Progress | None = None) -> Trained:
        """The K = len(seeds) models of `masks` [K, N]; `full_params`: the full-data model of each seed. A regime
        with `relabels` also takes `targets` [K, N] (each model's labels; None: the study's)."""

    def groups(self, seeds: list[int]) -> list[list[int]]:
        """The models `train` takes together (default: all of a chunk)."""
        return [list(range(len(seeds)))]

    def run(self, study: Study, jobs: Sequence[Job], full_params: dict[int, Tensor],
            progress: Progress | None = None) -> list[RunRecord]:
        """Train (or solve) the models of `jobs` and measure them: one record each, in the order of `jobs`.
        `progress` is called with model-steps (steps × the models that took them), so a chunk reports
        `steps(study) × len(jobs)` in all, however `groups` splits it."""
        if self.trained_by_study(study):
            return [study_trainer_run(study, self.trainer_regime, self.label, job, full_params, progress,
                                      self.steps(study)) for job in jobs]
        start = time.perf_counter()
        seeds = [j.seed for j in jobs]
        masks, targets = masks_for(study, jobs), targets_for(study, jobs)
        if targets is not None and not self.relabels:
            raise InputError(f"regime {self.label} cannot retrain relabel sets")
        results = [(ks, self.train(study, masks[ks], [seeds[k] for k in ks], full_params,
                                   _model_steps(progress, len(ks)),
                                   **({} if targets is None else {"targets": targets[ks]})))
                   for ks in self.groups(seeds)]
        seconds = (time.perf_counter() - start) / len(jobs)
        records: list[RunRecord | None] = [None] * len(jobs)
        for ks, trained in results:
            for k, record in zip(ks, run_records(study, self.label, [jobs[k] for k in ks], trained, seconds,
                                                 full_params)):
                records[k] = record
        return records  # type: ignore[return-value]


def _model_steps(progress: Progress | None, models: int) -> Progress | None:
    """A `train` call's progress (steps that each of its `models` models took) as model-steps."""
    return None if progress is None else (lambda steps: progress(steps * models))


class Scratch(Regime):
    """Retrain from the seed's initialisation and example order, minus the set or with its new labels (`epochs`
    epochs)."""

    name = "scratch"
    relabels = True
    trainer_regime = "scratch"

    def steps(self, study: Study) -> int:
        return study.recipe.epochs

    def train(self, study: Study, masks: Tensor, seeds: list[int], full_params: dict[int, Tensor],
              progress: Progress | None = None, targets: Tensor | None = None) -> Trained:
        return train(study, masks, seeds, progress=progress, targets=targets)


class Warm(Regime):
    """Continue the seed's full-data model without the set (or with its new labels) for the recipe's
    `warm_epochs`."""

    name = "warm"
    relabels = True
    trainer_regime = "warm"

    def steps(self, study: Study) -> int:
        return study.recipe.warm_epochs

    def train(self, study: Study, masks: Tensor, seeds: list[int], full_params: dict[int, Tensor],
              progress: Progress | None = None, targets: Tensor | None = None) -> Trained:
        init = torch.stack([full_params[s] for s in seeds])
        return train(study, masks, seeds, init=init, epochs=study.recipe.warm_epochs,
                     first_epoch=study.recipe.epochs, progress=progress, targets=targets)


class Pbrf(Regime):
    """Minimise the proximal Bregman response objective from the full-data model (same λ as the estimators),
    at most the recipe's `pbrf_steps` steps; one preconditioner per seed."""

    name = "pbrf"
    relabels = True

    def steps(self, study: Study) -> int:
        return study.recipe.pbrf_steps

    def groups(self, seeds: list[int]) -> list[list[int]]:
        return [[k for k, s in enumerate(seeds) if s == seed] for seed in sorted(set(seeds))]

    def train(self, study: Study, masks: Tensor, seeds: list[int], full_params: dict[int, Tensor],
              progress: Progress | None = None, targets: Tensor | None = None) -> Trained:
        return pbrf(study, torch.stack([full_params[s] for s in seeds]), masks, progress=progress, targets=targets)


@dataclass(frozen=True)
class FrozenOptions:
    scope: str = option("regex over named_parameters names: the parameters that may move (the others stay at "
                        "their starting values); no commas", "")
    from_: str = option("init: from the seed's initialisation for `epochs` (as scratch); full: continue the "
                        "full-data model for `warm_epochs` (as warm)", "init", choices=("init", "full"))


class Frozen(Regime):
    """Retrain with only the parameters of a scope trainable (the others bit for bit at their start), from the
    seed's initialisation or continuing the full-data model."""

    name = "frozen"
    Options = FrozenOptions
    relabels = True

    def __init__(self, options: Any = None, spec: str = ""):
        super().__init__(options, spec)
        if not self.options.scope:
            raise InputError(f"regime {spec or self.name!r}: name the trainable parameters, e.g. "
                             "frozen:scope=^0\\.,from=full (a regex over named_parameters names)")

    def check(self, study: Study) -> None:
        scope_mask(study, self.options.scope)

    def steps(self, study: Study) -> int:
        return study.recipe.warm_epochs if self.options.from_ == "full" else study.recipe.epochs

    def train(self, study: Study, masks: Tensor, seeds: list[int], full_params: dict[int, Tensor],
              progress: Progress | None = None, targets: Tensor | None = None) -> Trained:
        trainable = scope_mask(study, self.options.scope)
        if self.options.from_ == "init":
            return train(study, masks, seeds, progress=progress, targets=targets, trainable=trainable)
        init = torch.stack([full_params[s] for s in seeds])
        return train(study, masks, seeds, init=init, epochs=study.recipe.warm_epochs,
                     first_epoch=study.recipe.epochs, progress=progress, targets=targets, trainable=trainable)


REGIMES: Registry[Regime] = Registry("regime", Regime, [Scratch, Warm, Pbrf, Frozen])


def parse_regime(spec: str) -> Regime:
    """`scratch`, `warm`, `pbrf` or `path/to/file.py:ClassName[:option=value,...]`."""
    cls, options = REGIMES.parse(spec)
    return cls(options, spec)


def study_trained(study: Study, regime: str, job: Job, full_params: dict[int, Tensor]) -> Trained:
    """The model of `job` trained by the study's own trainer (`retrain.trainer`) under `regime` ("scratch": from
    the seed's initialisation for `epochs`; "warm": from the seed's full-data model, written as a state_dict file,
    for `warm_epochs`), in a fresh folder removed afterwards: one model, with its checkpoint's sha256 and no training
    loss (the trainer's objective is its own); a trainer that fails gives a failed model with its reason."""
    r = study.recipe
    removed = set(job.indices) if job.new_labels is None else set()
    with tempfile.TemporaryDirectory(prefix="ifledger-job-") as folder:
        init = None
        if regime == "warm":
            init = Path(folder) / "init.pt"
            torch.save({k: v.cpu() for k, v in study.flat.state_dict(full_params[job.seed]).items()}, init)
        training = TrainingJob(job.seed, regime, tuple(i for i in range(study.n_train) if i not in removed),
                               None if job.new_labels is None else dict(zip(job.indices, job.new_labels)), init,
                               Path(folder) / "job", str(study.device), r.warm_epochs if regime == "warm" else r.epochs,
                               r.epochs if regime == "warm" else 0)
        try:
            theta, checkpoint, failure = *run_job(study, training), None
        except TrainerFailure as e:
            theta, checkpoint, failure = torch.zeros(study.flat.n_params, dtype=getattr(torch, r.dtype)), None, str(e)
    theta = theta.to(study.device)
    if failure is None and not torch.isfinite(theta).all():
        failure = "diverged: non-finite parameters in the trainer's checkpoint"
    return Trained(theta[None], None, [failure], [failure is None], [checkpoint])


def study_trainer_run(study: Study, regime: str, label: str, job: Job, full_params: dict[int, Tensor],
                      progress: Progress | None = None, steps: int = 0) -> RunRecord:
    """`study_trained`, measured into the run record of regime `label`; `progress` is told the model's `steps`."""
    start = time.perf_counter()
    trained = study_trained(study, regime, job, full_params)
    if progress:
        progress(steps)
    return run_records(study, label, [job], trained, time.perf_counter() - start, full_params)[0]


def run_records(study: Study, regime: str, jobs: Sequence[Job], trained: Trained, seconds: float,
                full_params: dict[int, Tensor] | None = None) -> list[RunRecord]:
    """The run records of trained models (one per job, in order), with their measurements and, for a job that asks,
    the weight change θ_run − θ* from the seed's full-data model in `full_params`, per parameter block. Models that
    all failed are not measured."""
    if all(trained.failures):
        values = torch.full((len(jobs), len(study.measurement_ids)), math.nan)
    else:
        values = measure(study, torch.nan_to_num(trained.params))
    ids = study.measurement_ids
    asked = [row for row, job in enumerate(jobs) if job.weight_change]
    changes = dict(zip(asked, block_changes(study, torch.stack(
        [trained.params[row] - full_params[jobs[row].seed] for row in asked])))) if asked and full_params else {}
    records = []
    for row, job in enumerate(jobs):
        failure = trained.failures[row]
        if failure is None and not torch.isfinite(values[row]).all():
            failure = "diverged: non-finite measurement"
        records.append(RunRecord(study.study_hash, job.set_id, job.seed, regime,
                                 status="failed" if failure else "done", reason=failure, seconds=seconds,
                                 train_loss=None if trained.train_loss is None else float(trained.train_loss[row]),
                                 converged=trained.converged[row],
                                 outcomes={} if failure else dict(zip(ids, values[row].tolist())),
                                 weight_changes={} if failure else changes.get(row, {}),
                                 checkpoint_sha256=trained.checkpoints[row] if trained.checkpoints else None))
    return records


def run_regime(study: Study, regime: Regime | str, jobs: Sequence[Job], full_params: dict[int, Tensor],
               progress: Progress | None = None) -> list[RunRecord]:
    """Train (or solve) the models of `jobs` under `regime` (an instance or a spec) and measure them."""
    return (parse_regime(regime) if isinstance(regime, str) else regime).run(study, jobs, full_params, progress)


def train_full(study: Study, seeds: Sequence[int], full_set_id: str,
               progress: Progress | None = None) -> tuple[dict[int, Tensor], list[RunRecord]]:
    """The full-data models of `seeds` and their `scratch` baseline records, with their weight change from θ* (zero
    unless the study supplies θ*): the baseline that scratch's weight changes are paired with. `progress` is called
    with model-epochs. A study with its own trainer trains them one per job."""
    jobs = [Job(full_set_id, s, (), weight_change=True) for s in seeds]
    if study.external_trainer:  # one model per job, each timed and measured on its own
        params, records = {}, []
        for job in jobs:
            start = time.perf_counter()
            trained = study_trained(study, "scratch", job, {})
            if progress:
                progress(study.recipe.epochs)
            params[job.seed] = trained.params[0]
            full = {job.seed: study.supplied_params.get(job.seed, params[job.seed])}
            records += run_records(study, "scratch", [job], trained, time.perf_counter() - start, full)
        return params, records
    start = time.perf_counter()
    trained = train(study, masks_for(study, jobs), list(seeds), progress=_model_steps(progress, len(jobs)))
    seconds = (time.perf_counter() - start) / len(jobs)
    params = {s: trained.params[k] for k, s in enumerate(seeds)}
    full = {s: study.supplied_params.get(s, theta) for s, theta in params.items()}  # θ*: what the ledger keeps
    return params, run_records(study, "scratch", jobs, trained, seconds, full)


def full_model_records(study: Study, retrained: dict[int, Tensor]) -> list[ModelRecord]:
    """θ* of each seed for the ledger: the study's supplied model where it has one (with its hash and its distance
    to the model the recipe retrained, absolute and relative; None when that retraining diverged), else the
    retrained model."""
    records = []
    for seed, theta in retrained.items():
        supplied = study.supplied_params.get(seed)
        if supplied is None:
            records.append(ModelRecord(study.study_hash, seed, params_to_bytes(theta)))
        else:
            gap = (supplied - theta).norm() if torch.isfinite(theta).all() else None
            records.append(ModelRecord(study.study_hash, seed, params_to_bytes(supplied), params_sha256(supplied),
                                       None if gap is None else float(gap),
                                       None if gap is None else float(gap / theta.norm())))
    return records
