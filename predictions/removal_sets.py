"""Removal-set builders. A spec reads `kind:option=value,...`; every set is validated against the
study's training-set size before anything is written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from store.records import InputError, RemovalSetRecord


def validate(indices: Sequence[int], n_train: int, where: str) -> tuple[int, ...]:
    """Indices must be distinct integers in [0, n_train)."""
    if len(indices) == 0:
        raise InputError(f"{where}: a removal set must hold at least one training index")
    bad = [i for i in indices if not 0 <= i < n_train]
    if bad:
        raise InputError(f"{where}: index {bad[0]} is out of range; training indices run 0..{n_train - 1}")
    if len(set(indices)) != len(indices):
        dup = next(i for i in indices if list(indices).count(i) > 1)
        raise InputError(f"{where}: index {dup} appears twice; list each training index once")
    return tuple(sorted(int(i) for i in indices))


def single(study_hash: str, n_train: int, n: int | None = None, seed: int = 0) -> list[RemovalSetRecord]:
    """`n` single training points drawn without replacement (all of them when n is None)."""
    if n is not None and not 1 <= n <= n_train:
        raise InputError(f"single:n={n} must be between 1 and the {n_train} training points")
    points = range(n_train) if n is None else np.random.default_rng(seed).choice(n_train, n, replace=False)
    return [RemovalSetRecord(study_hash, "single", f"single:{i}", (int(i),)) for i in sorted(points)]


def user(study_hash: str, n_train: int, path: str) -> list[RemovalSetRecord]:
    """One set per non-empty line of a text file: training indices separated by spaces or commas."""
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
        indices = validate(indices, n_train, where)
        sets.append(RemovalSetRecord(study_hash, "user", f"user:{file.name}:{lineno}", indices))
    if not sets:
        raise InputError(f"removal-set file {path} holds no sets")
    return sets


def _options(spec: str, allowed: dict[str, type]) -> dict:
    kind, _, rest = spec.partition(":")
    out = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise InputError(f"removal-set option {item!r} not understood in {spec!r}; {kind} takes "
                             f"{', '.join(f'{k}=' for k in allowed) or 'no options'}")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise InputError(f"removal-set option {key} in {spec!r} needs a {allowed[key].__name__}") from None
    return out


BUILDERS = {
    "single": ("single:n=100[,seed=0]  n training points, each removed alone", {"n": int, "seed": int}),
    "user": ("user:path=FILE  one set per line of FILE (indices separated by spaces)", {"path": str}),
}


def build(spec: str, study_hash: str, n_train: int) -> list[RemovalSetRecord]:
    """Build the sets a spec names, e.g. `single:n=100` or `user:path=sets.txt`."""
    kind = spec.partition(":")[0]
    if kind not in BUILDERS:
        raise InputError(f"unknown removal-set kind {kind!r}; use one of: "
                         + "; ".join(help_ for help_, _ in BUILDERS.values()))
    options = _options(spec, BUILDERS[kind][1])
    if kind == "single":
        return single(study_hash, n_train, **options)
    if "path" not in options:
        raise InputError("user sets need a file: --sets user:path=FILE")
    return user(study_hash, n_train, options["path"])
