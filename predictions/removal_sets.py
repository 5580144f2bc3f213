"""Removal-set builders. A spec reads `kind:option=value,...` (a bare value after a list option extends the
list: `top_k:k=10,30`). Every spec is parsed and every set validated before anything is written; `top_k`
sets are built once the scores they rank exist."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from retrain.study import Study
from store.records import InputError, RemovalSetRecord


@dataclass(frozen=True)
class Option:
    type: type
    default: Any = None
    many: bool = False  # a list of values
    help: str = ""


KINDS: dict[str, tuple[str, dict[str, Option]]] = {
    "single": ("n training points, each removed alone", {
        "n": Option(int, None, help="how many points (default: all)"), "seed": Option(int, 0)}),
    "random": ("k random subsets, each of a fraction alpha (or of each size) of the training set: the LDS design", {
        "alpha": Option(float, None, help="fraction removed"), "size": Option(int, (), many=True, help="sizes"),
        "k": Option(int, 100, help="subsets per alpha or size"), "seed": Option(int, 0)}),
    "top_k": ("the k training points with the largest (positive) or smallest (negative) predicted effect on each "
              "measurement, per method", {
        "k": Option(int, (10,), many=True), "direction": Option(str, "both", help="positive|negative|both"),
        "method": Option(str, "", help="rank by this method only (default: every method registered)")}),
    "group": ("one set per distinct value of a column of the training data (e.g. a label or an entity id)", {
        "column": Option(str, "y"), "values": Option(str, (), many=True, help="only these values")}),
    "user": ("one set per line of FILE, training indices separated by spaces", {"path": Option(str, None)}),
}


@dataclass(frozen=True)
class SetSpec:
    kind: str
    options: dict[str, Any]
    text: str


def describe() -> str:
    """One line per kind with its options, for --help."""
    lines = []
    for kind, (what, options) in KINDS.items():
        opts = ",".join(f"{k}={'V1,V2' if o.many else o.type.__name__.upper()}" for k, o in options.items())
        lines.append(f"{kind}:{opts}  {what}")
    return "\n".join(lines)


def parse(text: str) -> SetSpec:
    kind, _, rest = text.partition(":")
    if kind not in KINDS:
        raise InputError(f"unknown removal-set kind {kind!r} in {text!r}; use one of {', '.join(KINDS)}")
    schema = KINDS[kind][1]
    options = {k: (list(o.default) if o.many else o.default) for k, o in schema.items()}
    given: set[str] = set()
    last = None
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq and last is not None and schema[last].many:
            key, value = last, item
        elif not eq or key not in schema:
            raise InputError(f"removal-set option {item!r} not understood in {text!r}; {kind} takes "
                             + ", ".join(f"{k}=" for k in schema))
        try:
            parsed = schema[key].type(value)
        except ValueError:
            raise InputError(f"removal-set option {key} in {text!r} needs {schema[key].type.__name__} values, "
                             f"got {value!r}") from None
        if schema[key].many:
            options[key] = (options[key] if key in given else []) + [parsed]
        else:
            options[key] = parsed
        given.add(key)
        last = key
    spec = SetSpec(kind, options, text)
    _check(spec)
    return spec


def _check(spec: SetSpec) -> None:
    o = spec.options
    if spec.kind == "random":
        if (o["alpha"] is None) == (not o["size"]):
            raise InputError(f"{spec.text}: give either alpha=FRACTION or size=N1,N2,... for random sets")
        if o["alpha"] is not None and not 0 < o["alpha"] < 1:
            raise InputError(f"{spec.text}: alpha must lie strictly between 0 and 1")
        if o["k"] < 1:
            raise InputError(f"{spec.text}: k must be at least 1")
    if spec.kind == "top_k" and o["direction"] not in ("positive", "negative", "both"):
        raise InputError(f"{spec.text}: direction must be positive, negative or both")
    if spec.kind == "top_k" and min(o["k"]) < 1:
        raise InputError(f"{spec.text}: k must be at least 1")
    if spec.kind == "user" and not o["path"]:
        raise InputError("user sets need a file: --sets user:path=FILE")


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


def build(spec: SetSpec, study: Study) -> list[RemovalSetRecord]:
    """The sets of every kind but `top_k` (which needs scores: see `top_k`)."""
    o, n, h = spec.options, study.n_train, study.study_hash
    if spec.kind == "single":
        if o["n"] is not None and not 1 <= o["n"] <= n:
            raise InputError(f"single:n={o['n']} must be between 1 and the {n} training points")
        points = range(n) if o["n"] is None else np.random.default_rng(o["seed"]).choice(n, o["n"], replace=False)
        return [RemovalSetRecord(h, "single", f"single:{i}", (int(i),)) for i in sorted(points)]
    if spec.kind == "random":
        rng = np.random.default_rng(o["seed"])
        sizes = [(f"alpha={o['alpha']:g}", round(o["alpha"] * n))] if o["alpha"] is not None else \
            [(f"size={s}", s) for s in o["size"]]
        for _, size in sizes:
            if not 1 <= size < n:
                raise InputError(f"{spec.text}: a random set must remove between 1 and {n - 1} points, not {size}")
        return [RemovalSetRecord(h, "random", f"random:{name}#{i}", tuple(sorted(rng.choice(n, size, replace=False)
                                                                            .tolist())))
                for name, size in sizes for i in range(o["k"])]
    if spec.kind == "group":
        return _groups(spec, study)
    if spec.kind == "user":
        return _user(h, n, o["path"])
    return []


def _groups(spec: SetSpec, study: Study) -> list[RemovalSetRecord]:
    column, wanted = spec.options["column"], spec.options["values"]
    train = study.data["train"]
    if column not in train.column_names:
        raise InputError(f"{spec.text}: the training data has no column {column!r}; columns: "
                         + ", ".join(train.column_names))
    values = [str(v) for v in train[column]]
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    missing = [w for w in wanted if w not in groups]
    if missing:
        raise InputError(f"{spec.text}: no training example has {column}={missing[0]}")
    chosen = wanted or sorted(groups)
    if not wanted and len(chosen) > len(values) // 2:
        raise InputError(f"{spec.text}: column {column!r} has {len(chosen)} distinct values; group by a column "
                         "with few values, or name them with values=")
    return [RemovalSetRecord(study.study_hash, "group", f"group:{column}={v}", tuple(groups[v])) for v in chosen]


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


def top_k(spec: SetSpec, study: Study, scores: dict[str, Tensor]) -> list[RemovalSetRecord]:
    """For each ranking method, measurement, k and direction: the k points with the largest predicted effect
    (positive: removing them should raise the measurement most) or the smallest (negative)."""
    o = spec.options
    methods = [o["method"]] if o["method"] else sorted(scores)
    if o["method"] and o["method"] not in scores:
        raise InputError(f"{spec.text}: method {o['method']!r} is not among those registered "
                         f"({', '.join(sorted(scores))})")
    directions = ["positive", "negative"] if o["direction"] == "both" else [o["direction"]]
    ids = list(study.measurements())
    sets = []
    for method in methods:
        order = scores[method].argsort(dim=1, descending=True)  # [M, N], largest predicted effect first
        for m, measurement in enumerate(ids):
            for direction in directions:
                ranked = order[m] if direction == "positive" else order[m].flip(0)
                for k in o["k"]:
                    sets.append(RemovalSetRecord(study.study_hash, "top_k",
                                                 f"top_k:{method}:{measurement}:{direction}:k={k}",
                                                 tuple(sorted(ranked[:k].tolist())), method, measurement, direction))
    return sets
