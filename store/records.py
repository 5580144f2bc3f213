"""Plain records that the layers above hand to the ledger, and the content hashes that key them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class InputError(ValueError):
    """Bad input from a user: reported as one line, exit code 2, ledger unchanged."""


def content_hash(*parts: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `parts`, hex, truncated to `length` characters."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def removal_set_id(study_hash: str, indices: Sequence[int]) -> str:
    """Content id of a set of points alone: the same indices of the same study always get the same id (the `full`
    set's id, and the id an older ledger gave every removal set; see `RemovalSetRecord.set_id`)."""
    return content_hash("removal_set", study_hash, sorted(int(i) for i in indices))


def relabel_set_id(study_hash: str, indices: Sequence[int], new_labels: Sequence[float]) -> str:
    """Content id of a relabel set: the points (sorted) with their new labels; never equal to a removal set's id."""
    pairs = sorted(zip((int(i) for i in indices), (float(v) for v in new_labels)))
    return content_hash("relabel_set", study_hash, [i for i, _ in pairs], [v for _, v in pairs])


def run_id(study_hash: str, set_id: str, seed: int, regime: str) -> str:
    """Deterministic key of one trained model (study, removal set, seed, regime)."""
    return content_hash("run", study_hash, set_id, int(seed), regime)


@dataclass(frozen=True)
class StudyRecord:
    name: str
    study_hash: str
    source: str  # how to load it again: a built-in name or "path/to/file.py:Class"
    config: dict[str, Any]
    n_train: int
    n_params: int
    measurements: dict[str, str]  # measurement_id -> description
    flipped_labels: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (given, true) label
    default_regimes: tuple[str, ...] = ("scratch",)  # what `verify` retrains when not told (read by `status`)
    without_gradient: set[str] = field(default_factory=set)  # measurement ids no method predicts
    measurement_tags: dict[str, dict[str, str]] = field(default_factory=dict)  # measurement_id -> facets
    pairing: str = "masked"  # how its runs pair with their seed's full-data run: masked or dropped (retrain.study)


@dataclass(frozen=True)
class SelfInfluenceRecord:
    """One detection method's score for every training point of one full-data model (larger = more suspect)."""

    study_hash: str
    method: str
    method_config: dict[str, Any]
    seed: int
    scores: tuple[float, ...]


@dataclass(frozen=True)
class PredictionFailureRecord:
    """A method that ran on a study and failed (a peer library's exception, non-finite scores): its reason."""

    study_hash: str
    method: str
    method_config: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class RemovalSetRecord:
    """A modification of the training set: its points removed, or, with `new_labels` (one per index, in the
    order of `indices`), given those labels instead (a relabel set: kind and labels are part of its id)."""

    study_hash: str
    kind: str  # full | single | random | top_k | top_k_baseline | group | relabel | flagged | oracle | user
    label: str
    indices: tuple[int, ...]
    ranked_by: str | None = None  # top_k only: the method whose scores ranked the points,
    target: str | None = None  # the measurement they were ranked against,
    direction: str | None = None  # and positive (largest predicted effect) or negative
    new_labels: tuple[float, ...] | None = None  # relabel sets only: the new label of each point of `indices`
    # registered by an older ledger under `members_id` with this same definition (`store.keep_older_ids`)
    stored_by_members: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:  # indices sorted, each new label kept with its point
        pairs = sorted(zip(self.indices, self.new_labels or [0.0] * len(self.indices)))
        object.__setattr__(self, "indices", tuple(int(i) for i, _ in pairs))
        if self.new_labels is not None:
            object.__setattr__(self, "new_labels", tuple(float(v) for _, v in pairs))

    @property
    def definition(self) -> dict[str, str]:
        """What defines the set besides its points and new labels: its kind and, for a ranked set, the ranking
        method, the target measurement and the direction."""
        return {k: v for k, v in (("kind", self.kind), ("ranked_by", self.ranked_by), ("target", self.target),
                                  ("direction", self.direction)) if v is not None}

    @property
    def members_id(self) -> str:
        """The id of the points (and new labels) alone, whatever chose them."""
        if self.new_labels is not None:
            return relabel_set_id(self.study_hash, self.indices, self.new_labels)
        return removal_set_id(self.study_hash, self.indices)

    @property
    def set_id(self) -> str:
        """Content id of the set as defined: its points, new labels and `definition`, so that a `single` set and a
        top_k set of one point, or two rankings that pick the same points, are different sets. The `full` set, and
        a set an older ledger registered (by its points alone) with the same definition, keep `members_id`."""
        if self.kind == "full" or self.stored_by_members:
            return self.members_id
        return content_hash("set", self.members_id, self.definition)


@dataclass(frozen=True)
class PredictionRecord:
    study_hash: str
    method: str
    method_config: dict[str, Any]
    set_id: str
    measurement_id: str
    predicted: float


SUPPLIED_TOLERANCE = 1e-6  # the largest ‖θ_supplied − θ_retrained‖ / ‖θ_retrained‖ of a reproduced supplied model


@dataclass(frozen=True)
class WeightChangeRecord:
    """A method's predicted weight change Δθ̂_B of one parameter block B for one (set, seed model): its norm and
    `direction`, the block's vector itself or its count sketch (`predictions.weight_change.sketch`)."""

    study_hash: str
    method: str
    method_config: dict[str, Any]
    set_id: str
    seed: int
    block: str
    norm: float
    direction: tuple[float, ...]


def weight_change_id(w: WeightChangeRecord) -> str:
    """A predicted weight change's identity: the same method and config on the same (set, seed, block)."""
    return content_hash("weight_change", w.study_hash, w.method, w.method_config, w.set_id, w.seed, w.block)


@dataclass(frozen=True)
class ModelRecord:
    """The full-data model θ* of a seed (serialized flat parameters). When the study supplied it (trained
    elsewhere): its sha256 and its distance ‖θ_supplied − θ_retrained‖ (and relative, ÷ ‖θ_retrained‖) to the model
    the recipe retrains; all three None when θ* is the retrained model."""

    study_hash: str
    seed: int
    params: bytes
    supplied_sha256: str | None = None
    retrained_distance: float | None = None
    retrained_relative_distance: float | None = None

    @property
    def reproduced(self) -> bool | None:
        """Whether the recipe reproduces a supplied model (relative distance within SUPPLIED_TOLERANCE, the
        `supplied_models` view's test); None for a retrained model."""
        if self.supplied_sha256 is None:
            return None
        return self.retrained_relative_distance is not None and self.retrained_relative_distance <= SUPPLIED_TOLERANCE


@dataclass
class RunRecord:
    study_hash: str
    set_id: str
    seed: int
    regime: str
    status: str  # done | failed
    reason: str | None = None
    seconds: float | None = None
    train_loss: float | None = None
    converged: bool | None = None
    outcomes: dict[str, float] = field(default_factory=dict)  # measurement_id -> value
    # block -> (‖Δθ_B‖, Δθ_B or its sketch), Δθ = θ_run − θ* of the seed; only for sets with predicted weight changes
    weight_changes: dict[str, tuple[float, tuple[float, ...]]] = field(default_factory=dict)
    checkpoint_sha256: str | None = None  # the checkpoint file a study's own trainer wrote (None: the engine's run)

    @property
    def run_id(self) -> str:
        return run_id(self.study_hash, self.set_id, self.seed, self.regime)
