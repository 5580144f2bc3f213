"""Methods by name: how a prediction is made, with its config, averaged over the full-data models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from predictions.influence import exact_scores
from retrain.study import Study
from store.records import InputError, PredictionRecord, RemovalSetRecord

Scorer = Callable[[Study, Tensor, dict], Tensor]


def _exact(study: Study, theta: Tensor, config: dict) -> Tensor:
    return exact_scores(study, theta, config["damping"])


METHODS: dict[str, tuple[Scorer, str]] = {
    "exact": (_exact, "explicit damped Gauss-Newton inverse (models up to ~20k parameters)"),
}


@dataclass(frozen=True)
class Method:
    name: str
    config: dict  # every option, defaults filled in, as registered with the predictions

    def scores(self, study: Study, thetas: Tensor) -> Tensor:
        """Scores [M, N] averaged over the first `models` full-data models in `thetas` [S, P]."""
        scorer = METHODS[self.name][0]
        used = thetas[: self.config["models"]]
        return torch.stack([scorer(study, th, self.config) for th in used]).mean(0)


def parse_method(spec: str, study: Study) -> Method:
    """`exact` or `exact:damping=1e-3,models=1`; defaults come from the study's recipe."""
    name, _, options = spec.partition(":")
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    config: dict = {"damping": study.recipe.damping, "models": study.recipe.seeds}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in config:
            raise InputError(f"method option {item!r} not understood; {name} takes "
                             f"{', '.join(f'{k}=' for k in config)}")
        try:
            config[key] = type(config[key])(float(value)) if key == "models" else float(value)
        except ValueError:
            raise InputError(f"method option {key} needs a number, got {value!r}") from None
    if not 1 <= config["models"] <= study.recipe.seeds:
        raise InputError(f"models={config['models']} must be between 1 and the study's {study.recipe.seeds} seeds")
    if config["damping"] < 0:
        raise InputError("damping must be >= 0")
    return Method(name, config)


def predict(study: Study, method: Method, thetas: Tensor, sets: list[RemovalSetRecord]) -> list[PredictionRecord]:
    """First-order set predictions: Δ̂(S, m) = Σ_{j∈S} score_mj, one record per (set, measurement)."""
    scores = method.scores(study, thetas)  # [M, N]
    members = torch.zeros(study.n_train, len(sets), dtype=scores.dtype)
    for k, s in enumerate(sets):
        members[list(s.indices), k] = 1.0
    predicted = (scores @ members).tolist()  # [M, S]
    ids = list(study.measurements())
    return [PredictionRecord(study.study_hash, method.name, method.config, s.set_id, ids[m], predicted[m][k])
            for k, s in enumerate(sets) for m in range(len(ids))]
