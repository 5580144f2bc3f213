"""Methods: how a prediction is made. A method is a `Method` subclass with an `Options` dataclass and one
solve hook, `inverse_product(study, theta, V) -> A⁻¹V` (A = G + (wd + λ)I for the curvature methods, I for
`grad_dot`); the scoring (1/N) ∇L_jᵀ A⁻¹ ∇m, the averaging over seed models and the set sums are shared, and so
is relabelling: z_j = (x_j, y_j) given the label y'_j is predicted as (1/N) (∇L(x_j, y_j) − ∇L(x_j, y'_j))ᵀ A⁻¹ ∇m
(removing z_j, then adding (x_j, y'_j)). A user's method is named `path/to/file.py:ClassName` and works like a
built-in."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from predictions.arnoldi import arnoldi_inverse
from predictions.ekfac import ekfac_inverse
from predictions.influence import (
    cg_inverse_product,
    exact_inverse_product,
    influence_scores,
    lissa_inverse_product,
)
from retrain.options import Extension, Registry, label, option
from retrain.study import Study
from store.records import InputError, PredictionRecord, RemovalSetRecord


@dataclass(frozen=True)
class SeedOptions:
    models: int | None = option("how many seed models the scores are averaged over", minimum=1,
                                default_text="all the study's seeds")


@dataclass(frozen=True)
class CurvatureOptions(SeedOptions):
    damping: float | None = option("λ added to the curvature G + wd·I", minimum=0,
                                   default_text="the study's recipe damping")


class Method(Extension, ABC):
    """Base of the methods. An instance is one configuration for one study: `options` with the study's
    defaults filled in, `config` (every option, as registered with its predictions) and `label` (the name and
    the options that differ from the study's defaults, e.g. `exact:models=1`)."""

    Options: ClassVar[type] = SeedOptions

    def __init__(self, options: Any, study: Study):
        defaults = self._for_study(self.Options(), study)
        self.options = self._for_study(options, study)
        if not 1 <= self.options.models <= study.recipe.seeds:
            raise InputError(f"models={self.options.models} must be between 1 and the study's "
                             f"{study.recipe.seeds} seeds")
        self.config: dict[str, Any] = dataclasses.asdict(self.options)
        self.label = label(self.name, self.options, defaults)

    @staticmethod
    def _for_study(options: Any, study: Study) -> Any:
        """`options` with the defaults that come from the study (`models`, `damping`) filled in."""
        fill = {"models": study.recipe.seeds, "damping": study.recipe.damping}
        return dataclasses.replace(options, **{k: v for k, v in fill.items()
                                               if getattr(options, k, False) is None})

    @abstractmethod
    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        """A⁻¹ V for V [P, K] at the full-data parameters θ [P]."""

    def scores(self, study: Study, thetas: Tensor, sets: Sequence[RemovalSetRecord] = ()) -> Tensor:
        """Scores [M, N], Δ̂_mj = (1/N) ∇L_jᵀ A⁻¹ ∇m, averaged over the first `models` full-data models of
        `thetas` [S, P]; then one column per relabelled point of `sets` (`relabelled_points`), the same score
        of the point under its new label."""
        used, relabelled = thetas[: self.options.models], relabelled_points(sets)
        labels = torch.tensor([v for _, v in relabelled], dtype=torch.float64).to(study.tensors("train")[1].dtype)
        pairs = (torch.tensor([j for j, _ in relabelled], dtype=torch.long), labels) if relabelled else None
        return torch.stack([influence_scores(study, th, lambda v, th=th: self.inverse_product(study, th, v), pairs)
                            for th in used]).mean(0)


class Exact(Method):
    """Explicit damped Gauss-Newton inverse (models up to ~20k parameters)."""

    name = "exact"
    Options = CurvatureOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        return exact_inverse_product(study, theta, vectors, self.options.damping)


@dataclass(frozen=True)
class CGOptions(CurvatureOptions):
    iterations: int = option("conjugate-gradient steps at most", 100, minimum=1)
    tol: float = option("a column stops once its residual is below tol × its right-hand side", 1e-6, minimum=0)


class ConjugateGradient(Method):
    """Conjugate gradient on matrix-free damped Gauss-Newton products."""

    name = "cg"
    Options = CGOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        o = self.options
        return cg_inverse_product(study, theta, vectors, o.damping, o.iterations, o.tol)


@dataclass(frozen=True)
class LissaOptions(CurvatureOptions):
    iterations: int = option("Neumann-series terms", 1000, minimum=1)
    scale: float = option("the curvature is divided by it; 0 = 1.1 × its top eigenvalue", 0.0, minimum=0)
    batch_size: int = option("training examples per minibatch curvature", 512, minimum=1)
    seed: int = option("seed of the minibatch draws", 0)


class Lissa(Method):
    """LiSSA: stochastic Neumann series of minibatch damped Gauss-Newton products."""

    name = "lissa"
    Options = LissaOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        o = self.options
        return lissa_inverse_product(study, theta, vectors, o.damping, o.iterations, o.scale, o.batch_size, o.seed)


@dataclass(frozen=True)
class ArnoldiOptions(CurvatureOptions):
    rank: int = option("eigenpairs of G kept (the largest)", 200, minimum=1)
    iterations: int = option("Lanczos iterations", 300, minimum=1)
    seed: int = option("seed of the Lanczos start vector", 0)
    complement: str = option("outside the top eigenpairs: damping: 1/s; drop: 0 (when rank ≪ the effective rank)",
                             "damping", choices=("damping", "drop"))


class Arnoldi(Method):
    """Top-rank Lanczos eigenpairs of Gauss-Newton, damping-only complement."""

    name = "arnoldi"
    Options = ArnoldiOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        o = self.options
        return arnoldi_inverse(study, theta, o.damping, o.rank, o.iterations, o.seed, o.complement)(vectors)


@dataclass(frozen=True)
class EkfacOptions(CurvatureOptions):
    samples: int = option("sampled output directions per example for the Kronecker factors; 0 = exact", 0,
                          minimum=0)
    seed: int = option("seed of the sampled directions", 0)


class Ekfac(Method):
    """Eigenvalue-corrected Kronecker-factored Gauss-Newton (Linear, Conv1D)."""

    name = "ekfac"
    Options = EkfacOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        o = self.options
        return ekfac_inverse(study, theta, o.damping, o.samples, o.seed)(vectors)


class GradDot(Method):
    """Gradient dot product, TracIn at the final checkpoint (the curvature replaced by I)."""

    name = "grad_dot"

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        return vectors


METHODS: Registry[Method] = Registry("method", Method, [Exact, ConjugateGradient, Lissa, Arnoldi, Ekfac, GradDot])


def parse_method(spec: str, study: Study) -> Method:
    """`exact`, `exact:damping=1e-3,models=1`, `cg:iterations=50`, `lissa:batch_size=256,seed=1`, `grad_dot`,
    `path/to/file.py:ClassName:option=value`, a peer library's `kronfluence:ekfac` (`predictions.peers`); defaults
    come from the study's recipe and the `Options`."""
    from predictions.peers import is_peer, parse_peer  # lazily: a peer's module imports this one

    if is_peer(spec):
        return parse_peer(spec, study)
    cls, options = METHODS.parse(spec)
    return cls(options, study)


def relabelled_points(sets: Sequence[RemovalSetRecord]) -> list[tuple[int, float]]:
    """The distinct (training index, new label) pairs of the relabel sets among `sets`, sorted."""
    return sorted({pair for s in sets if s.new_labels is not None for pair in zip(s.indices, s.new_labels)})


def predict(study: Study, method: Method, scores: Tensor, sets: list[RemovalSetRecord]) -> list[PredictionRecord]:
    """First-order set predictions from a method's scores [M, N + R] (`Method.scores` of these `sets`), one record
    per (set, measurement): a removal set Δ̂(S, m) = Σ_{j∈S} score_mj; a relabel set Σ_{j∈S} (score_mj − score of
    (x_j, y'_j)); none for the measurements the study declares without gradient. A non-additive group estimator
    would replace this sum, not the scores."""
    n, column = study.n_train, {pair: study.n_train + r for r, pair in enumerate(relabelled_points(sets))}
    members = torch.zeros(n + len(column), len(sets), dtype=scores.dtype)
    for k, s in enumerate(sets):
        members[list(s.indices), k] = 1.0
        if s.new_labels is not None:
            members[[column[pair] for pair in zip(s.indices, s.new_labels)], k] = -1.0
    predicted = (scores @ members).tolist()  # [M, S]
    ids = study.measurement_ids
    return [PredictionRecord(study.study_hash, method.label, method.config, s.set_id, ids[m], predicted[m][k])
            for k, s in enumerate(sets) for m in range(len(ids)) if study.differentiable[m]]
