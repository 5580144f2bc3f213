"""Methods: how a prediction is made. Two kinds (design.md "method"):

- a scoring method (`Method`) produces per-point scores [M, N (+R)] and set predictions [M, S] whole, and declares
  whether it can predict relabelling (`relabels`); its set predictions default to the sums of its scores;
- a curvature method (`CurvatureMethod`) supplies one solve, `inverse_product(study, theta, V) -> A⁻¹V`
  (A = G + (wd + λ)I for the built-ins, I for `grad_dot`), and shares the rest: the averaging over seed models,
  the parameter scope (`scope=REGEX`: gradients and curvature restricted to the matching parameters,
  A = G_SS + (wd + λ)I) and the side it solves on (`side`, design.md "side").

On the measurements side the scores are Δ̂_mj = (1/N) ∇L_jᵀ A⁻¹ ∇m and a set's prediction is their sum; on the sets
side each set is predicted from one solve, (1/N) ∇mᵀ A⁻¹ Σ_{j∈S} w_j ∇L_j, and per-point scores are computed only
when a ranked set kind asks for them. Relabelling z_j = (x_j, y_j) to y'_j is removing z_j, then adding
(x_j, y'_j): w = +1 on ∇L(x_j, y_j), −1 on ∇L(x_j, y'_j). A user's method is named `path/to/file.py:ClassName`
and works like a built-in."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from predictions.arnoldi import arnoldi_inverse
from predictions.ekfac import ekfac_inverse
from predictions.influence import (
    Operator,
    Progress,
    cg_inverse_product,
    exact_inverse_product,
    influence_scores,
    lissa_inverse_product,
    measurement_products,
    part,
    solve_chunks,
    weighted_gradients,
)
from retrain.curvature import embed, scope_mask
from retrain.options import Extension, Registry, label, option
from retrain.study import Study
from store.records import InputError, PredictionRecord, RemovalSetRecord


@dataclass(frozen=True)
class SeedOptions:
    models: int | None = option("how many seed models the scores are averaged over", minimum=1,
                                default_text="all the study's seeds")


@dataclass(frozen=True)
class SolveOptions(SeedOptions):
    scope: str = option("only the parameters whose names (named_parameters) this regex (no commas) matches move: "
                        "gradients and curvature restricted to them; empty: all", "")
    side: str = option("measurements: one solve per measurement, sets predicted as sums of per-point scores; sets: "
                       "one solve per set of Σ_{j∈S} w_j ∇L_j, no per-example gradients held", "measurements",
                       choices=("measurements", "sets"))


@dataclass(frozen=True)
class CurvatureOptions(SolveOptions):
    damping: float | None = option("λ added to the curvature G + wd·I", minimum=0,
                                   default_text="the study's recipe damping")


class Method(Extension, ABC):
    """Base of the methods, a scoring method: per-point scores and set predictions, whole. An instance is one
    configuration for one study: `options` with the study's defaults filled in, `config` (every option, as
    registered with its predictions) and `label` (the name and the options that differ from the study's defaults,
    e.g. `exact:models=1`). `relabels`: whether it can predict relabel sets (those it cannot get no prediction)."""

    Options: ClassVar[type] = SeedOptions
    relabels: ClassVar[bool] = True

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

    @property
    def sums_scores(self) -> bool:
        """Whether `set_predictions` sums the per-point scores (then `scores` must run first)."""
        return True

    @abstractmethod
    def scores(self, study: Study, thetas: Tensor, sets: Sequence[RemovalSetRecord] = (),
               progress: Progress | None = None) -> Tensor:
        """Scores [M, N]: the predicted effect on measurement m of removing training point j, from the first
        `models` full-data models of `thetas` [S, P]; then one column per relabelled point of `sets`
        (`relabelled_points`), the same score of the point under its new label."""

    def set_predictions(self, study: Study, thetas: Tensor, sets: Sequence[RemovalSetRecord],
                        scores: Tensor | None = None, progress: Progress | None = None) -> Tensor:
        """Predictions [M, S] of `sets`: Δ̂(S, m) = Σ_{j∈S} score_mj, a relabel set's Σ_{j∈S} (score_mj − score of
        (x_j, y'_j)), from `scores` (this method's `scores` of these sets) or computed here."""
        if scores is None:
            scores = self.scores(study, thetas, sets, progress)
        return scores @ membership(study, sets).to(scores)  # the scores' dtype and device


class CurvatureMethod(Method):
    """A method that supplies one solve, A⁻¹V, and shares the scoring on either side. `scope` holds the indices
    into θ of the parameters its scope lets move (None: all); `inverse_product` works on their coordinates.

    The two sides give the same predictions up to the solve's error: exact solves agree to rounding, but truncated
    CG and LiSSA are not exactly symmetric operators, so the sides may differ in the last digits they resolve."""

    Options = CurvatureOptions
    set_chunk: ClassVar[int] = 32  # sets whose summed gradients are built by one vector-Jacobian product

    def __init__(self, options: Any, study: Study):
        super().__init__(options, study)
        mask = scope_mask(study, self.options.scope)
        self.scope: Tensor | None = None if mask.all() else mask.nonzero().squeeze(1)

    @abstractmethod
    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        """A⁻¹ V for V [|S|, K] on the scope's coordinates (all P without a scope) at the full-data θ [P]."""

    def solver(self, study: Study, theta: Tensor, progress: Progress | None = None, calls: int = 1) -> Operator:
        """V ↦ A⁻¹ V at θ, for every chunk of measurements or sets solved at θ: a method whose solve has a set-up
        (eigenpairs, Kronecker factors) overrides this to do it once; by default each call is `inverse_product`.
        An iterative method reports its steps to `progress` as fractions of the whole: its set-up and `calls`
        calls of the operator."""
        return lambda vectors: self.inverse_product(study, theta, vectors)

    @property
    def sums_scores(self) -> bool:
        return self.options.side == "measurements"

    def scores(self, study: Study, thetas: Tensor, sets: Sequence[RemovalSetRecord] = (),
               progress: Progress | None = None) -> Tensor:
        """Δ̂_mj = (1/N) ∇L_jᵀ A⁻¹ ∇m (gradients restricted to the scope), averaged over the seed models; a model's
        progress counts its solves as one half, its per-example gradient products as the other."""
        pairs = relabelled_examples(study, sets) if relabelled_points(sets) else None
        m = len(study.measurement_ids)
        return self._mean(thetas, progress, lambda th, steps: influence_scores(
            study, th, self.solver(study, th, part(steps, 0.5), len(solve_chunks(th.numel(), m))), pairs, self.scope,
            progress=part(steps, 0.5)))

    def set_predictions(self, study: Study, thetas: Tensor, sets: Sequence[RemovalSetRecord],
                        scores: Tensor | None = None, progress: Progress | None = None) -> Tensor:
        """On the sets side (1/N) ∇mᵀ A⁻¹ Σ_{j∈S} w_j ∇L_j per set, averaged over the seed models; on the measurements
        side the sums of the scores (`Method.set_predictions`)."""
        if self.options.side == "measurements":
            return super().set_predictions(study, thetas, sets, scores, progress)
        return self._mean(thetas, progress, lambda th, steps: self._solve_sets(study, th, sets, steps))

    def _mean(self, thetas: Tensor, progress: Progress | None,
              of_model: Callable[[Tensor, Progress | None], Tensor]) -> Tensor:
        """The mean of `of_model(θ, steps)` over the first `models` seed models of `thetas`, reporting each one
        done; within a model, the solver's steps (kept below the model's end, which several solves of one model
        could pass), so that one model's scoring shows a rate and an ETA too."""
        values = []
        for theta in thetas[: self.options.models]:
            reported = 0.0

            def steps(fraction: float) -> None:
                nonlocal reported
                fraction = min(fraction, 0.99 - reported)
                if fraction > 0 and progress is not None:
                    reported += fraction
                    progress(fraction)

            values.append(of_model(theta, steps))
            if progress is not None:
                progress(1.0 - reported)
        return torch.stack(values).mean(0)

    def _solve_sets(self, study: Study, theta: Tensor, sets: Sequence[RemovalSetRecord],
                    progress: Progress | None = None) -> Tensor:
        """[M, S]: ∇mᵀ Δθ̂_S of each set's `weight_changes`, by forward-mode products; the sets are solved as many at
        a time as `solve_chunks` lets [P, k] vectors be held (all at once below the budget)."""
        chunks = solve_chunks(theta.numel(), len(sets))
        solve = self.solver(study, theta, progress, len(chunks))
        return torch.cat([measurement_products(study, theta, self.weight_changes(study, theta, sets[c], solve))
                          for c in chunks], 1)

    def weight_changes(self, study: Study, theta: Tensor, sets: Sequence[RemovalSetRecord],
                       solve: Operator | None = None) -> Tensor:
        """[P, S]: each set's first-order weight change Δθ̂_S = (1/N) A⁻¹ Σ_j w_j ∇L_j at θ (zero outside the scope):
        Σ_j w_j ∇L_j by one vector-Jacobian product per chunk of sets, over the chunk's points only, then one solve
        of all of them by `solve` (default: `solver(study, theta)`)."""
        (x, y), (points, new_labels) = study.tensors("train"), relabelled_examples(study, sets)
        x, y, weights = torch.cat([x, x[points]]), torch.cat([y, new_labels]), membership(study, sets)
        gradients = []
        for c in range(0, len(sets), self.set_chunk):
            chunk = weights[:, c : c + self.set_chunk]
            rows = chunk.any(1).nonzero().squeeze(1)  # the chunk's points (and new labels)
            summed = weighted_gradients(study, theta, x[rows], y[rows], chunk[rows].to(theta))  # [P, k]
            gradients.append(summed if self.scope is None else summed[self.scope])
        solved = (solve or self.solver(study, theta))(torch.cat(gradients, 1))  # [|S|, S]
        return embed(solved, self.scope, theta.numel()) / study.n_train


class Exact(CurvatureMethod):
    """Explicit damped Gauss-Newton solve (its Cholesky factor; models up to ~20k parameters)."""

    name = "exact"

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        return exact_inverse_product(study, theta, vectors, self.options.damping, self.scope)


@dataclass(frozen=True)
class CGOptions(CurvatureOptions):
    iterations: int = option("conjugate-gradient steps at most", 100, minimum=1)
    tol: float = option("a column stops once its residual is below tol × its right-hand side", 1e-6, minimum=0)
    precondition: int = option("rank r of a spectral preconditioner: the top r Ritz pairs of G after 3r/2 Lanczos "
                               "steps of one column, M⁻¹ = U(Λ + s)⁻¹Uᵀ + (I − UUᵀ)/s (arnoldi's solve), built once "
                               "per model; 0: plain CG", 0, minimum=0)


class ConjugateGradient(CurvatureMethod):
    """Conjugate gradient on matrix-free damped Gauss-Newton products (optionally preconditioned).

    With `precondition=r` CG needs iterations for the spread of the spectrum below the top r eigenpairs,
    (g_r + s)/s, not the whole (g_1 + s)/s, and one Lanczos step costs one column's product where a CG step costs
    one per right-hand side."""

    name = "cg"
    Options = CGOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        return self.solver(study, theta)(vectors)

    def solver(self, study: Study, theta: Tensor, progress: Progress | None = None, calls: int = 1) -> Operator:
        """The preconditioner's Lanczos pairs computed once at θ (none by default); progress shared between its
        one-column Lanczos steps and the calls' CG steps by their counts."""
        o = self.options
        steps = (3 * o.precondition + 1) // 2
        share = steps / (steps + o.iterations)
        precondition = (arnoldi_inverse(study, theta, o.damping, o.precondition, steps, 0, "damping", self.scope,
                                        part(progress, share)) if o.precondition else None)
        return lambda vectors: cg_inverse_product(study, theta, vectors, o.damping, o.iterations, o.tol, self.scope,
                                                  precondition, part(progress, (1 - share) / calls))


@dataclass(frozen=True)
class LissaOptions(CurvatureOptions):
    iterations: int = option("Neumann-series terms", 1000, minimum=1)
    scale: float = option("the curvature is divided by it; 0 = 1.1 × its top eigenvalue", 0.0, minimum=0)
    batch_size: int = option("training examples per minibatch curvature", 512, minimum=1)
    seed: int = option("seed of the minibatch draws", 0)


class Lissa(CurvatureMethod):
    """LiSSA: stochastic Neumann series of minibatch damped Gauss-Newton products."""

    name = "lissa"
    Options = LissaOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        return self.solver(study, theta)(vectors)

    def solver(self, study: Study, theta: Tensor, progress: Progress | None = None, calls: int = 1) -> Operator:
        o = self.options
        return lambda vectors: lissa_inverse_product(study, theta, vectors, o.damping, o.iterations, o.scale,
                                                     o.batch_size, o.seed, self.scope, part(progress, 1 / calls))


@dataclass(frozen=True)
class ArnoldiOptions(CurvatureOptions):
    rank: int = option("eigenpairs of G kept (the largest)", 200, minimum=1)
    iterations: int = option("Lanczos iterations", 300, minimum=1)
    seed: int = option("seed of the Lanczos start vector", 0)
    complement: str = option("outside the top eigenpairs: damping: 1/s; drop: 0 (when rank ≪ the effective rank)",
                             "damping", choices=("damping", "drop"))


class Arnoldi(CurvatureMethod):
    """Top-rank Lanczos eigenpairs of Gauss-Newton, damping-only complement."""

    name = "arnoldi"
    Options = ArnoldiOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        return self.solver(study, theta)(vectors)

    def solver(self, study: Study, theta: Tensor, progress: Progress | None = None, calls: int = 1) -> Operator:
        """The Lanczos eigenpairs computed once at θ (the calls are products with them: not counted)."""
        o = self.options
        return arnoldi_inverse(study, theta, o.damping, o.rank, o.iterations, o.seed, o.complement, self.scope,
                               progress)


@dataclass(frozen=True)
class EkfacOptions(CurvatureOptions):
    samples: int = option("sampled output directions per example for the Kronecker factors (fewer backward passes; "
                          "the output Hessians are built whole regardless); 0 = exact", 0, minimum=0)
    seed: int = option("seed of the sampled directions", 0)


class Ekfac(CurvatureMethod):
    """Eigenvalue-corrected Kronecker-factored Gauss-Newton (Linear, Conv1D)."""

    name = "ekfac"
    Options = EkfacOptions

    def inverse_product(self, study: Study, theta: Tensor, vectors: Tensor) -> Tensor:
        return self.solver(study, theta)(vectors)

    def solver(self, study: Study, theta: Tensor, progress: Progress | None = None, calls: int = 1) -> Operator:
        """The Kronecker factors and corrected eigenvalues computed once at θ (the calls: not counted)."""
        o = self.options
        return ekfac_inverse(study, theta, o.damping, o.samples, o.seed, scope=self.scope, progress=progress)


class GradDot(CurvatureMethod):
    """Gradient dot product, TracIn at the final checkpoint (the curvature replaced by I)."""

    name = "grad_dot"
    Options = SolveOptions

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


def relabelled_examples(study: Study, sets: Sequence[RemovalSetRecord]) -> tuple[Tensor, Tensor]:
    """The training indices [R] and new labels [R] (in the training labels' dtype, on their device) of
    `relabelled_points(sets)`."""
    pairs = relabelled_points(sets)
    labels = torch.tensor([v for _, v in pairs], dtype=torch.float64).to(study.tensors("train")[1])
    return torch.tensor([j for j, _ in pairs], dtype=torch.long), labels


def membership(study: Study, sets: Sequence[RemovalSetRecord]) -> Tensor:
    """W [N + R, S] of the weights w_j each set gives the training points: +1 for a member under its own label,
    and for a relabel set −1 on row N + r, its member's relabelled pair r of `relabelled_points(sets)`."""
    column = {pair: study.n_train + r for r, pair in enumerate(relabelled_points(sets))}
    weights = torch.zeros(study.n_train + len(column), len(sets), dtype=torch.float64)
    for k, s in enumerate(sets):
        weights[list(s.indices), k] = 1.0
        if s.new_labels is not None:
            weights[[column[pair] for pair in zip(s.indices, s.new_labels)], k] = -1.0
    return weights


def predict(study: Study, method: Method, thetas: Tensor, sets: Sequence[RemovalSetRecord],
            scores: Tensor | None = None, progress: Progress | None = None) -> list[PredictionRecord]:
    """The method's set predictions (`Method.set_predictions`, from `scores` where it sums them), one record per
    (set, measurement); none for the measurements the study declares without gradient, nor for relabel sets when
    the method cannot relabel."""
    sets = [s for s in sets if method.relabels or s.new_labels is None]
    predicted = method.set_predictions(study, thetas, sets, scores, progress).tolist()  # [M, S]
    ids = study.measurement_ids
    return [PredictionRecord(study.study_hash, method.label, method.config, s.set_id, ids[m], predicted[m][k])
            for k, s in enumerate(sets) for m in range(len(ids)) if study.differentiable[m]]
