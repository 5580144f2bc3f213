"""Modification kinds: removal sets, and relabel sets (the points stay, with new labels). A spec reads
`kind:option=value,...` (the grammar of `retrain.options`; a bare value after a list option extends the list:
`top_k:k=10,30`). A kind is a `ModificationKind` subclass with an `Options` dataclass, `check` (what its options
must satisfy together) and `build` (its sets for a study); `top_k` sets are built once the scores they rank exist
(`rank`). Every spec is parsed and every set validated before anything is written. A user's kind is
`path/to/file.py:ClassName`.

Over ~300 lines on purpose: it is the one registry of every kind a spec can name (each a short class with its
options), and `parse`/`build`/`validate` check them all in one place before anything is written."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from predictions.detection import DETECTORS, detector
from retrain.options import Extension, Registry, option
from retrain.study import Study
from store.records import InputError, RemovalSetRecord


class ModificationKind(Extension, ABC):
    """One parsed spec of a kind: `options` (its validated `Options`) and `text` (the spec as written)."""

    ranked: ClassVar[bool] = False  # True: built from the methods' scores by `rank`, after they exist
    trained: ClassVar[bool] = False  # True: built from the full-data models by `from_models`, before the scores

    def __init__(self, options: Any, text: str):
        self.options, self.text = options, text
        self.check()

    @property
    def kind(self) -> str:
        return self.name

    def check(self) -> None:
        """Refuse options that are each valid but do not fit together (InputError)."""

    @abstractmethod
    def build(self, study: Study) -> list[RemovalSetRecord]:
        """The kind's sets that need no scores (a ranked kind's ranked sets come from `rank`)."""

    def rank(self, study: Study, scores: dict[str, Tensor]) -> list[RemovalSetRecord]:
        """A ranked kind's sets, from the scores [M, N] of each method by label."""
        return []

    def from_models(self, study: Study, thetas: Tensor, seeds: list[int]) -> list[RemovalSetRecord]:
        """A trained kind's sets, from the full-data models θ* [S, P] of `seeds`."""
        return []

    def check_study(self, study: Study) -> None:
        """Refuse (InputError) a trained kind that cannot be built for `study`, before anything is trained."""


@dataclass(frozen=True)
class SingleOptions:
    n: int | None = option("how many points, drawn at random", default_text="all")
    seed: int = option("seed of the draw", 0)


class Single(ModificationKind):
    """n training points, each removed alone."""

    name = "single"
    Options = SingleOptions

    def build(self, study: Study) -> list[RemovalSetRecord]:
        o, n = self.options, study.n_train
        if o.n is not None and not 1 <= o.n <= n:
            raise InputError(f"single:n={o.n} must be between 1 and the {n} training points")
        points = range(n) if o.n is None else np.random.default_rng(o.seed).choice(n, o.n, replace=False)
        return [RemovalSetRecord(study.study_hash, "single", f"single:{i}", (int(i),)) for i in sorted(points)]


@dataclass(frozen=True)
class RandomOptions:
    alpha: float | None = option("fraction of the training set removed, strictly between 0 and 1")
    size: tuple[int, ...] = option("subset sizes (instead of alpha)", many=True, minimum=1)
    k: int = option("subsets per alpha or size", 100, minimum=1)
    seed: int = option("seed of the draws", 0)


class Random(ModificationKind):
    """k random subsets, each of a fraction alpha (or of each size) of the training set: the LDS design."""

    name = "random"
    Options = RandomOptions

    def check(self) -> None:
        o = self.options
        if (o.alpha is None) == (not o.size):
            raise InputError(f"{self.text}: give either alpha=FRACTION or size=N1,N2,... for random sets")
        if o.alpha is not None and not 0 < o.alpha < 1:
            raise InputError(f"{self.text}: alpha must lie strictly between 0 and 1")

    def build(self, study: Study) -> list[RemovalSetRecord]:
        o = self.options
        sizes = [(f"alpha={o.alpha:g}", round(o.alpha * study.n_train))] if o.alpha is not None else \
            [(f"size={s}", s) for s in o.size]
        return random_sets(study, "random", sizes, o.k, o.seed, self.text)


def random_sets(study: Study, kind: str, sizes: list[tuple[str, int]], k: int, seed: int, text: str
                ) -> list[RemovalSetRecord]:
    """k uniformly drawn subsets of each (name, size), labelled `KIND:NAME#i`; a size must leave a point."""
    n = study.n_train
    for _, size in sizes:
        if not 1 <= size < n:
            raise InputError(f"{text}: a random set must remove between 1 and {n - 1} points, not {size}")
    rng = np.random.default_rng(seed)
    return [RemovalSetRecord(study.study_hash, kind, f"{kind}:{name}#{i}",
                             tuple(sorted(rng.choice(n, size, replace=False).tolist())))
            for name, size in sizes for i in range(k)]


@dataclass(frozen=True)
class RelabelOptions:
    size: tuple[int, ...] = option("points per set", (10,), many=True, minimum=1)
    k: int = option("sets per size, points drawn at random", 20, minimum=1)
    shift: float | None = option("new label = label + shift (integer labels: modulo the number of classes, "
                                 "max label + 1)")
    value: float | None = option("new label = value (instead of shift; integer labels: one the data uses)")
    seed: int = option("seed of the draws", 0)


class Relabel(ModificationKind):
    """k random sets of each size whose points keep their inputs and get a new label (label + shift, or value)."""

    name = "relabel"
    Options = RelabelOptions

    def check(self) -> None:
        if (self.options.shift is None) == (self.options.value is None):
            raise InputError(f"{self.text}: give either shift=NUMBER or value=LABEL for relabel sets")

    def build(self, study: Study) -> list[RemovalSetRecord]:
        o, y = self.options, relabelable(study, self.text)
        if max(o.size) > len(y):
            raise InputError(f"{self.text}: a set of {max(o.size)} points is more than the {len(y)} training points")
        integer = not y.is_floating_point()
        if integer and not float(o.shift if o.value is None else o.value).is_integer():
            raise InputError(f"{self.text}: the study's labels are integers; give a whole-number shift or value")
        if integer and o.value is not None and o.value not in set(y.tolist()):
            raise InputError(f"{self.text}: no training example has the label {o.value:g}")
        classes = int(y.max()) + 1 if integer else 0
        rng = np.random.default_rng(o.seed)
        sets = []
        for size in o.size:
            for i in range(o.k):
                points = sorted(rng.choice(len(y), size, replace=False).tolist())
                old = y[points].double()
                new = torch.full_like(old, o.value) if o.value is not None else (
                    (old + o.shift) % classes if integer else old + o.shift)
                how = f"shift={o.shift:g}" if o.value is None else f"value={o.value:g}"
                sets.append(RemovalSetRecord(study.study_hash, "relabel", f"relabel:size={size},{how}#{i}",
                                             tuple(points), new_labels=tuple(new.tolist())))
        return sets


def relabelable(study: Study, where: str) -> Tensor:
    """The study's training labels [N], refused unless there is one label (a number) per example."""
    y = study.tensors("train")[1]
    if y.dim() != 1:
        raise InputError(f"{where}: relabelling needs one label per training example; {study.name}'s targets "
                         f"have shape {list(y.shape)}")
    return y


FIXES = ("remove", "relabel", "both")


@dataclass(frozen=True)
class FlaggedOptions:
    p: tuple[float, ...] = option("percent of the training set flagged", (10,), many=True, minimum=0.01, maximum=100)
    by: str = option("the detection score that flags (`ifledger detect` methods; random: a random p%)", "exact",
                     choices=tuple(DETECTORS))
    fix: str = option("remove the flagged points, relabel them to the models' predicted class, or both sets",
                      "both", choices=FIXES)


class FromModels(ModificationKind, ABC):
    """A kind whose sets come from the full-data models (`from_models`), none from the study alone."""

    trained = True

    def build(self, study: Study) -> list[RemovalSetRecord]:
        return []


class Flagged(FromModels):
    """The cleaning of a practitioner: the top p% of training points by a detection score (averaged over the
    full-data models), removed or relabelled to the models' predicted class (the class of the mean output)."""

    name = "flagged"
    Options = FlaggedOptions

    def check_study(self, study: Study) -> None:
        if self.options.fix != "remove":
            predicted_classes(study, study.init_params(0)[None], self.text)

    def from_models(self, study: Study, thetas: Tensor, seeds: list[int]) -> list[RemovalSetRecord]:
        o = self.options
        order = detector(o.by).scorer(study, thetas, seeds).mean(0).argsort(descending=True, stable=True).tolist()
        sets = []
        for p in o.p:
            size = math.ceil(p / 100 * study.n_train)
            if size >= study.n_train:
                raise InputError(f"{self.text}: flagging {p:g}% would leave nothing to train on")
            sets += fixed(study, thetas, "flagged", f"flagged:by={o.by},p={p:g}", order[:size], o.fix, self.text,
                          ranked_by=o.by)
        return sets


@dataclass(frozen=True)
class OracleOptions:
    fix: str = option("remove the mislabelled points, relabel them, or both sets", "both", choices=FIXES)
    labels: str = option("relabel to the true labels, or to the models' predicted class as `flagged` does", "true",
                         choices=("true", "predicted"))


class Oracle(FromModels):
    """The study's known mislabelled points (its `true_labels()`, hidden from the estimators), removed or
    relabelled: the best a cleaning can do."""

    name = "oracle"
    Options = OracleOptions

    def check_study(self, study: Study) -> None:
        if not study.true_labels():
            raise InputError(f"{self.text}: {study.name} knows no mislabelled points (its true_labels() is empty)")
        if self.options.fix != "remove" and self.options.labels == "predicted":
            predicted_classes(study, study.init_params(0)[None], self.text)

    def from_models(self, study: Study, thetas: Tensor, seeds: list[int]) -> list[RemovalSetRecord]:
        truth = study.true_labels()
        points = sorted(truth)
        true = [float(truth[j]) for j in points] if self.options.labels == "true" else None
        return fixed(study, thetas, "oracle", f"oracle:labels={self.options.labels}", points, self.options.fix,
                     self.text, true)


def predicted_classes(study: Study, thetas: Tensor, where: str) -> Tensor:
    """The class of each training point under the full-data models: argmax of their mean output [N]."""
    y = relabelable(study, where)
    x = study.tensors("train")[0]
    outputs = torch.stack([study.flat(th, x) for th in thetas]).mean(0).detach()
    if y.is_floating_point() or outputs.dim() != 2:
        raise InputError(f"{where}: relabelling to the predicted class needs a classifier (integer labels, outputs "
                         f"[N, classes]); {study.name} has outputs of shape {list(outputs.shape)}")
    return outputs.argmax(1)


def fixed(study: Study, thetas: Tensor, kind: str, label: str, points: list[int], fix: str, where: str,
          labels: list[float] | None = None, ranked_by: str | None = None) -> list[RemovalSetRecord]:
    """The `remove` and/or `relabel` sets of `points`: relabelled to `labels`, or to the predicted classes."""
    sets = []
    if fix in ("remove", "both"):
        sets.append(RemovalSetRecord(study.study_hash, kind, f"{label},fix=remove", tuple(points), ranked_by))
    if fix in ("relabel", "both"):
        new = labels if labels is not None else predicted_classes(study, thetas, where)[points].double().tolist()
        sets.append(RemovalSetRecord(study.study_hash, kind, f"{label},fix=relabel", tuple(points), ranked_by,
                                     new_labels=tuple(new)))
    return sets


@dataclass(frozen=True)
class TopKOptions:
    k: tuple[int, ...] = option("set sizes", (10,), many=True, minimum=1)
    direction: str = option("positive: removing the set should raise the measurement most; negative: lower it",
                            "both", choices=("positive", "negative", "both"))
    method: str = option("rank by this method only", "", default_text="every method registered")
    random: int = option("random sets of each size k registered beside them (kind top_k_baseline): the baseline "
                         "of the top-k figure and of `top_k_effects`", 10, minimum=0)
    random_seed: int = option("seed of the random sets' draws", 1)


class TopK(ModificationKind):
    """Per method and measurement, the k training points with the largest (positive) or smallest (negative)
    predicted effect; beside them, `random` random sets of each size k (kind `top_k_baseline`)."""

    name = "top_k"
    Options = TopKOptions
    ranked = True

    def build(self, study: Study) -> list[RemovalSetRecord]:
        """The baseline: random sets of the top-k sizes (a kind of their own, so that they do not enter the
        `random` rows of the calibration and their LDS)."""
        o = self.options
        return random_sets(study, "top_k_baseline", [(f"size={k}", k) for k in o.k], o.random, o.random_seed,
                           self.text)

    def rank(self, study: Study, scores: dict[str, Tensor]) -> list[RemovalSetRecord]:
        """For each ranking method, measurement with a gradient, k and direction: the k points with the largest
        predicted effect (positive: removing them should raise the measurement most) or the smallest (negative)."""
        o = self.options
        methods = [o.method] if o.method else sorted(scores)
        if o.method and o.method not in scores:
            raise InputError(f"{self.text}: method {o.method!r} is not among those registered "
                             f"({', '.join(sorted(scores))})")
        directions = ["positive", "negative"] if o.direction == "both" else [o.direction]
        ids = study.measurement_ids
        sets = []
        for method in methods:
            order = scores[method].argsort(dim=1, descending=True)  # [M, N], largest predicted effect first
            for m, measurement in enumerate(ids):
                if not study.differentiable[m]:
                    continue
                for direction in directions:
                    ranked = order[m] if direction == "positive" else order[m].flip(0)
                    sets += [RemovalSetRecord(study.study_hash, "top_k",
                                              f"top_k:{method}:{measurement}:{direction}:k={k}",
                                              tuple(sorted(ranked[:k].tolist())), method, measurement, direction)
                             for k in o.k]
        return sets


@dataclass(frozen=True)
class GroupOptions:
    column: str = option("a column of the training data (a label, an entity id)", "y")
    values: tuple[str, ...] = option("only these values", many=True, default_text="every value")


class Group(ModificationKind):
    """One set per distinct value of a column of the training data (e.g. a label or an entity id)."""

    name = "group"
    Options = GroupOptions

    def build(self, study: Study) -> list[RemovalSetRecord]:
        column, wanted = self.options.column, list(self.options.values)
        train = study.data["train"]
        if column not in train.column_names:
            raise InputError(f"{self.text}: the training data has no column {column!r}; columns: "
                             + ", ".join(train.column_names))
        values = [str(v) for v in train[column]]
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
        missing = [w for w in wanted if w not in groups]
        if missing:
            raise InputError(f"{self.text}: no training example has {column}={missing[0]}")
        chosen = wanted or sorted(groups)
        if not wanted and len(chosen) > len(values) // 2:
            raise InputError(f"{self.text}: column {column!r} has {len(chosen)} distinct values; group by a column "
                             "with few values, or name them with values=")
        return [RemovalSetRecord(study.study_hash, "group", f"group:{column}={v}", tuple(groups[v]))
                for v in chosen]


@dataclass(frozen=True)
class UserOptions:
    path: str | None = option("a file with one set per line, training indices separated by spaces")


class User(ModificationKind):
    """One set per line of a file, training indices separated by spaces."""

    name = "user"
    Options = UserOptions

    def check(self) -> None:
        if not self.options.path:
            raise InputError("user sets need a file: --sets user:path=FILE")

    def build(self, study: Study) -> list[RemovalSetRecord]:
        return _user(study.study_hash, study.n_train, self.options.path)


KINDS: Registry[ModificationKind] = Registry("removal-set kind", ModificationKind,
                                             [Single, Random, TopK, Group, Relabel, Flagged, Oracle, User])


def parse(text: str) -> ModificationKind:
    """`kind:option=value,...` -> the kind with its validated options."""
    cls, options = KINDS.parse(text)
    return cls(options, text)


def build(spec: ModificationKind, study: Study) -> list[RemovalSetRecord]:
    """The sets of a spec that needs no scores (a ranked kind's come from `top_k`)."""
    return spec.build(study)


def from_models(spec: ModificationKind, study: Study, thetas: Tensor, seeds: list[int]) -> list[RemovalSetRecord]:
    """The sets of a trained spec (`flagged`, `oracle`), from the full-data models θ* [S, P] of `seeds`."""
    return spec.from_models(study, thetas, seeds)


def top_k(spec: ModificationKind, study: Study, scores: dict[str, Tensor]) -> list[RemovalSetRecord]:
    """The sets of a ranked spec (`top_k`), from each method's scores by label: [M, N] per training point, and
    any further columns (a relabel set's own scores) are not ranked."""
    return spec.rank(study, {label: v[:, : study.n_train] for label, v in scores.items()})


def validate(indices: Sequence[int], n_train: int, where: str) -> tuple[int, ...]:
    """Indices must be distinct integers in [0, n_train), and leave at least one training point."""
    if len(indices) == 0:
        raise InputError(f"{where}: a removal set must hold at least one training index")
    if len(set(indices)) >= n_train and all(0 <= i < n_train for i in indices):
        raise InputError(f"{where}: the set removes every one of the {n_train} training points; nothing would be "
                         "left to train on")
    bad = [i for i in indices if not 0 <= i < n_train]
    if bad:
        raise InputError(f"{where}: index {bad[0]} is out of range; training indices run 0..{n_train - 1}")
    seen: set[int] = set()
    for i in indices:
        if i in seen:
            raise InputError(f"{where}: index {i} appears twice; list each training index once")
        seen.add(i)
    return tuple(sorted(int(i) for i in indices))


def _user(study_hash: str, n_train: int, path: str) -> list[RemovalSetRecord]:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"removal-set file {path} does not exist")
    sets = []
    for lineno, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path} line {lineno}"
        try:
            indices = [int(t) for t in line.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"{where}: indices must be whole numbers separated by spaces") from None
        sets.append(RemovalSetRecord(study_hash, "user", f"user:{file.name}:{lineno}",
                                     validate(indices, n_train, where)))
    if not sets:
        raise InputError(f"removal-set file {path} holds no sets")
    return sets
