"""kronfluence (Grosse et al. 2023) as a scoring method: `kronfluence:ekfac`, `:kfac`, `:diagonal`, `:identity`.

Its pairwise score of a query measurement m and a training example j is s_mj = ∇mᵀ (Ĝ + δI)⁻¹ ∇L_j, with Ĝ the
strategy's approximation of the mean Gauss-Newton (Fisher) matrix and δ its damping; `identity` is ∇mᵀ ∇L_j.
Removing z_j is up-weighting it by −1/N, so our prediction is Δ̂_mj = s_mj / N; δ = wd + λ makes Ĝ + δI the
approximation of our A = G + (wd + λ)I. Every measurement goes through kronfluence's custom-measurement hook
(`Task.compute_measurement`), so margins and log-odds are scored as losses are. The Fisher is sampled as the
Gauss-Newton in expectation for any loss: each example's pseudo-loss is ⟨f, H_f^{1/2} ε⟩ with ε ~ N(0, I) and
H_f the Hessian of its loss in its outputs, taken per row of the last output dimension (exact for one row per
example; for sequence outputs the loss must be a sum over positions, as per-token cross-entropy is).
kronfluence tracks nn.Linear and nn.Conv2d modules only, so it runs on a copy of the model in which every
transformers `Conv1D` (GPT-2's attention and MLP: y = x W + b, W stored [in, out]) is an nn.Linear holding Wᵀ, the
same function (checked on the training inputs before scoring); the scores are per (measurement, example), so
nothing needs mapping back. Parameters outside a tracked module (embeddings, layer norms) are held fixed, and the
method's config lists the tracked and the converted modules. With `scope`, only the layers whose parameters all lie in
it are tracked (our methods' scope restricts curvature and gradients the same way)."""

from __future__ import annotations

import contextlib
import copy
import gc
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import hessian, vjp, vmap
from torch.utils.data import Dataset, Subset
from transformers.pytorch_utils import Conv1D

from predictions.peers import PeerFailure, PeerMethod, PeerOptions
from retrain.curvature import scope_mask
from retrain.options import option
from retrain.study import Study
from store.records import InputError


@dataclass(frozen=True)
class KronfluenceOptions(PeerOptions):
    fisher: str = option("sampled: outputs drawn from the model (Gauss-Newton in expectation); empirical: the "
                         "training labels (kronfluence's use_empirical_fisher)", "sampled",
                         choices=("sampled", "empirical"))
    seed: int = option("seed of the sampled outputs", 0)
    batch_size: int = option("examples per batch for factors and scores", 256, minimum=1)
    scope: str = option("track only the layers whose parameters' names (named_parameters) this regex (no commas) all "
                        "match, as our methods' scope; empty: every layer kronfluence tracks", "")


@contextlib.contextmanager
def frozen_garbage_collector() -> Iterator[None]:
    """kronfluence calls gc.collect() before and after every step (~1 s each in a process holding a study's data
    and Prefect); objects that existed before it started are not its garbage, so they are moved out of the
    collector's sight (gc.freeze) while it runs."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Indices(Dataset):
    """0..n-1: the adapter's batches are indices into tensors it holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def linear_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of `model` in which every transformers `Conv1D` (y = x W + b, W [in, out]) is an nn.Linear with weight
    Wᵀ [out, in] and the same bias: the same function in a layer kronfluence tracks; and the converted modules'
    names."""
    converted = copy.deepcopy(model)
    names = [name for name, module in converted.named_modules() if isinstance(module, Conv1D)]
    for name in names:
        conv = converted.get_submodule(name)
        linear = nn.Linear(conv.nx, conv.nf, dtype=conv.weight.dtype)
        linear.weight = nn.Parameter(conv.weight.detach().T.contiguous())
        linear.bias = nn.Parameter(conv.bias.detach().clone())
        parent, _, child = name.rpartition(".")
        setattr(converted.get_submodule(parent), child, linear)
    return converted, names


def checked_linear_copy(model: nn.Module, x: Tensor) -> tuple[nn.Module, list[str]]:
    """`linear_copy(model)`, refused (PeerFailure) unless its outputs on the inputs `x` equal the model's to rounding
    (max |difference| ≤ 1e-5 × max |output|)."""
    converted, names = linear_copy(model)
    if names:
        with torch.no_grad():
            outputs, copied = model(x), converted(x)
        gap, size = (outputs - copied).abs().max().item(), outputs.abs().max().item()
        if not gap <= 1e-5 * size:
            raise PeerFailure(f"the copy with Conv1D as nn.Linear differs from the model by {gap:.3g} (outputs up to "
                              f"{size:.3g}); kronfluence cannot track this model's Conv1D layers")
    return converted, names


def scoped_layers(model: nn.Module, scope: str) -> list[str] | None:
    """The names of `model`'s nn.Linear and nn.Conv2d layers whose parameters' names all match the regex `scope`
    (None for the empty scope: every such layer); refused (InputError) when the scope holds none of them."""
    if not scope:
        return None
    regex = re.compile(scope)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)
             and all(regex.search(f"{name}.{p}") for p, _ in module.named_parameters())]
    if not names:
        raise InputError(f"scope={scope} holds no layer kronfluence tracks (nn.Linear, nn.Conv2d, Conv1D); widen it")
    return names


def output_hessian_roots(study: Study, outputs: Tensor, targets: Tensor) -> Tensor:
    """H_f^{1/2} per example and output row: [B, R, C, C] for outputs [B, ..., C] (R rows of C values each; R = 1
    for a vector output), from the Hessian of the example's loss in one row with the other rows held."""
    f = outputs.detach().reshape(len(outputs), -1, outputs.shape[-1]) if outputs.dim() > 1 else \
        outputs.detach().reshape(len(outputs), 1, 1)
    shape = outputs.shape[1:]

    def row_hessian(fb: Tensor, yb: Tensor, r: Tensor) -> Tensor:
        def loss_of_row(v: Tensor) -> Tensor:
            mask = (torch.arange(fb.shape[0]) == r)[:, None]
            return study.loss(torch.where(mask, v, fb).reshape(1, *shape), yb[None])[0]
        return hessian(loss_of_row)(fb[r])

    rows = torch.arange(f.shape[1])
    h = vmap(vmap(row_hessian, (None, None, 0)), (0, 0, None))(f, targets, rows)  # [B, R, C, C]
    values, vectors = torch.linalg.eigh((h + h.transpose(-1, -2)) / 2)
    return vectors * values.clamp(min=0).sqrt()[..., None, :]


def measurement_rows(study: Study, model: nn.Module, gradient_ids: Tensor) -> tuple[Tensor, Tensor] | None:
    """(inputs, rows) when `measure` calls the model once, on `inputs`, and each measurement depends on one row of
    its outputs, a different row each (per-example losses; checked by each measurement's gradient in the outputs at
    this model): `rows[k]` the row that measurement `gradient_ids[k]` reads. None otherwise. kronfluence takes
    per-row query gradients, so only then can a batch of measurements share one forward pass."""
    calls = []
    with torch.no_grad():
        study.measurement_vector(lambda inputs: calls.append(inputs) or model(inputs))
    if len(calls) != 1:
        return None
    with torch.no_grad():
        outputs = model(calls[0])
    _, pull_back = vjp(lambda o: study.measurement_vector(lambda _: o), outputs)
    rows = []
    for i in gradient_ids.tolist():
        basis = torch.zeros(len(study.measurement_ids), dtype=outputs.dtype)
        basis[i] = 1.0
        read = pull_back(basis)[0].reshape(len(outputs), -1).abs().amax(1).nonzero().flatten()
        if len(read) != 1:
            return None
        rows.append(int(read))
    return (calls[0], torch.tensor(rows)) if len(set(rows)) == len(rows) else None


class Kronfluence(PeerMethod):
    """kronfluence's Kronecker-factored influence on the study's full-data models (s/N, damping wd + λ)."""

    library, distribution, module = "kronfluence", "kronfluence", "kronfluence"
    strategies = ("ekfac", "kfac", "diagonal", "identity")
    Options = KronfluenceOptions

    def __init__(self, strategy: str, options: Any, study: Study):
        super().__init__(strategy, options, study)
        scope_mask(study, self.options.scope)  # refuses a pattern that is no regex or matches no parameter

    def library_scores(self, study: Study, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.module.tracked_module import TrackedModule
        from kronfluence.task import Task

        o, dtype = self.options, getattr(torch, study.recipe.dtype)
        model, converted = checked_linear_copy(model, x)
        in_scope = scoped_layers(model, o.scope)
        gradient_ids = torch.tensor([i for i, d in enumerate(study.differentiable) if d])
        batched = measurement_rows(study, model, gradient_ids)
        query_x, rows = batched or (None, None)
        if batched is not None:
            with torch.no_grad():
                held = model(query_x)
        generator = torch.Generator().manual_seed(o.seed)

        class StudyTask(Task):
            def get_influence_tracked_modules(self) -> list[str] | None:
                return None if in_scope is None else [f"0.{name}" for name in in_scope]  # wrapped below

            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
                outputs = model(x[batch])
                if not sample:
                    return study.loss(outputs, y[batch]).sum()
                roots = output_hessian_roots(study, outputs, y[batch])
                noise = torch.randn(*roots.shape[:-1], 1, dtype=roots.dtype, generator=generator)
                direction = (roots @ noise).reshape(outputs.shape)
                return (outputs * direction.detach()).sum()

            def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
                if rows is None:  # one measurement per query batch, its gradient aggregated over the rows it reads
                    return study.measurement_vector(model)[gradient_ids[batch]].sum()
                outputs = held.index_put((rows[batch],), model(query_x[rows[batch]]))  # only the batch's rows move
                return study.measurement_vector(lambda _: outputs)[gradient_ids[batch]].sum()

        task = StudyTask()
        model = prepare_model(nn.Sequential(model), task)  # wrapped: kronfluence replaces children, never the root
        tracked = [n.removeprefix("0.") for n, m in model.named_modules() if isinstance(m, TrackedModule)]
        self.config["tracked_modules"] = tracked
        self.config["conv1d_as_linear"] = converted
        factor_args = FactorArguments(strategy=self.strategy, use_empirical_fisher=o.fisher == "empirical",
                                      activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                      per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
        score_args = ScoreArguments(damping_factor=study.recipe.weight_decay + o.damping,
                                    per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
        with tempfile.TemporaryDirectory(prefix="ifledger-kronfluence-") as folder, warnings.catch_warnings(), \
                frozen_garbage_collector():
            warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp.GradScaler, unused on CPU
            analyzer = Analyzer("ifledger", model, task, cpu=True, disable_tqdm=True, output_dir=folder,
                                log_level=40)
            analyzer.fit_all_factors("factors", Indices(study.n_train), per_device_batch_size=o.batch_size,
                                     factor_args=factor_args, overwrite_output_dir=True)
            pairwise = []
            queries = [Indices(len(gradient_ids))] if rows is not None else \
                [Subset(Indices(len(gradient_ids)), [k]) for k in range(len(gradient_ids))]
            for query in queries:
                analyzer.compute_pairwise_scores("scores", "factors", query, Indices(len(y)),
                                                 per_device_query_batch_size=len(query),
                                                 per_device_train_batch_size=o.batch_size,
                                                 score_args=replace(score_args, aggregate_query_gradients=rows is None),
                                                 overwrite_output_dir=True)
                pairwise.append(analyzer.load_pairwise_scores("scores")["all_modules"].to(torch.float64))
        self.config["query_batches"] = "per row" if rows is not None else "one measurement at a time"
        scores = torch.zeros(len(study.measurement_ids), len(y), dtype=torch.float64)
        scores[gradient_ids] = torch.cat(pairwise) / study.n_train
        return scores


ADAPTER = Kronfluence
