"""Methods by name: how a prediction is made, with its config, averaged over the full-data models."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from predictions.arnoldi import arnoldi_scores
from predictions.ekfac import ekfac_scores
from predictions.influence import cg_scores, exact_scores, grad_dot_scores, lissa_scores
from retrain.study import Study
from store.records import InputError, PredictionRecord, RemovalSetRecord

Scorer = Callable[..., Tensor]  # scorer(study, theta, **options) -> scores [M, N]


@dataclass(frozen=True)
class Estimator:
    """A method's scorer and what it does. Its options: `models` (how many full-data models to average),
    `damping` (λ, default from the study's recipe) when the scorer takes it, and the scorer's keyword
    arguments with the defaults of its signature; an option whose default is an int takes only integers."""

    scorer: Scorer
    description: str

    def defaults(self, study: Study) -> dict[str, int | float]:
        parameters = inspect.signature(self.scorer).parameters
        options: dict[str, int | float] = {"models": study.recipe.seeds}
        if "damping" in parameters:
            options["damping"] = study.recipe.damping
        options.update({k: p.default for k, p in parameters.items() if p.default is not p.empty})
        return options


METHODS: dict[str, Estimator] = {
    "exact": Estimator(exact_scores, "explicit damped Gauss-Newton inverse (models up to ~20k parameters)"),
    "cg": Estimator(cg_scores, "conjugate gradient on matrix-free damped Gauss-Newton products"),
    "lissa": Estimator(lissa_scores, "LiSSA: stochastic Neumann series of minibatch damped Gauss-Newton products"),
    "arnoldi": Estimator(arnoldi_scores, "top-rank Lanczos eigenpairs of Gauss-Newton, damping-only complement"),
    "ekfac": Estimator(ekfac_scores, "eigenvalue-corrected Kronecker-factored Gauss-Newton (Linear, Conv1D)"),
    "grad_dot": Estimator(grad_dot_scores, "gradient dot product, TracIn at the final checkpoint (no curvature)"),
}


@dataclass(frozen=True)
class Method:
    name: str
    config: dict  # every option, defaults filled in, as registered with the predictions
    label: str  # how predictions name it: the name and the options that differ from the study's defaults

    def scores(self, study: Study, thetas: Tensor) -> Tensor:
        """Scores [M, N] averaged over the first `models` full-data models in `thetas` [S, P]."""
        options = {k: v for k, v in self.config.items() if k != "models"}
        used = thetas[: self.config["models"]]
        return torch.stack([METHODS[self.name].scorer(study, th, **options) for th in used]).mean(0)


_MINIMUM = {"damping": 0, "iterations": 1, "tol": 0, "scale": 0, "batch_size": 1, "rank": 1, "samples": 0}


def parse_method(spec: str, study: Study) -> Method:
    """`exact`, `exact:damping=1e-3,models=1`, `cg:iterations=50`, `lissa:batch_size=256,seed=1`, `grad_dot`;
    defaults come from the study's recipe and the estimator's signature (`Estimator`)."""
    name, _, options = spec.partition(":")
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    defaults = METHODS[name].defaults(study)
    config = dict(defaults)
    integers = {k for k, v in config.items() if isinstance(v, int) and k != "damping"}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in config:
            raise InputError(f"method option {item!r} not understood; {name} takes "
                             f"{', '.join(f'{k}=' for k in config)}")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or (key in integers and not number.is_integer()):
            raise InputError(f"method option {key} needs {'an integer' if key in integers else 'a number'}, "
                             f"got {value!r}")
        config[key] = int(number) if key in integers else number
    if not 1 <= config["models"] <= study.recipe.seeds:
        raise InputError(f"models={config['models']} must be between 1 and the study's {study.recipe.seeds} seeds")
    for key, minimum in _MINIMUM.items():
        if key in config and config[key] < minimum:
            raise InputError(f"{key}={config[key]:g} must be >= {minimum}")
    changed = [f"{k}={v:g}" for k, v in config.items() if v != defaults[k]]
    return Method(name, config, f"{name}:{','.join(changed)}" if changed else name)


def predict(study: Study, method: Method, scores: Tensor, sets: list[RemovalSetRecord]) -> list[PredictionRecord]:
    """First-order set predictions from a method's scores [M, N]: Δ̂(S, m) = Σ_{j∈S} score_mj, one record per
    (set, measurement). A non-additive group estimator would replace this sum, not the scores."""
    members = torch.zeros(study.n_train, len(sets), dtype=scores.dtype)
    for k, s in enumerate(sets):
        members[list(s.indices), k] = 1.0
    predicted = (scores @ members).tolist()  # [M, S]
    ids = list(study.measurements())
    return [PredictionRecord(study.study_hash, method.label, method.config, s.set_id, ids[m], predicted[m][k])
            for k, s in enumerate(sets) for m in range(len(ids))]
