"""Statistics SQL cannot express well: bootstrap intervals over measurements and paired comparisons.

Point estimates live in the `calibration` view; the functions here recompute the same quantities on
bootstrap resamples of measurements (clusters: a measurement brings all its removal sets along), and
a test checks that they agree with the view on the full data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

REPLICATES = 1000
INTERVALS = ("pearson", "spearman", "slope", "lds")


@dataclass(frozen=True)
class Pairs:
    """Predicted and actual effects with the measurement each pair belongs to."""

    predicted: np.ndarray
    actual: np.ndarray
    measurement: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[tuple[float, float, str]]) -> Pairs:
        predicted, actual, measurement = zip(*rows) if rows else ((), (), ())
        return cls(np.asarray(predicted, float), np.asarray(actual, float), np.asarray(measurement, object))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def point_estimates(p: Pairs) -> dict[str, float]:
    """pearson, spearman (pooled over pairs), slope (least squares of actual on predicted) and lds (Spearman
    across sets within each measurement, averaged over measurements) — as in the `calibration` view."""
    groups = _groups(p)
    return {
        "pearson": _pearson(p.predicted, p.actual),
        "spearman": _pearson(stats.rankdata(p.predicted), stats.rankdata(p.actual)),
        "slope": float(np.polyfit(p.predicted, p.actual, 1)[0]) if np.ptp(p.predicted) > 0 else float("nan"),
        "lds": float(np.nanmean(_within(p, groups))) if groups else float("nan"),
    }


def _groups(p: Pairs) -> list[np.ndarray]:
    _, inverse = np.unique(p.measurement.astype(str), return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if len(inverse) else []


def _within(p: Pairs, groups: list[np.ndarray]) -> np.ndarray:
    return np.array([_pearson(stats.rankdata(p.predicted[g]), stats.rankdata(p.actual[g])) for g in groups])


def _replicate_metrics(p: Pairs, groups: list[np.ndarray], within: np.ndarray, pick: np.ndarray) -> np.ndarray:
    idx = np.concatenate([groups[g] for g in pick])
    x, y = p.predicted[idx], p.actual[idx]
    slope = np.polyfit(x, y, 1)[0] if np.ptp(x) > 0 else np.nan
    return np.array([_pearson(x, y), _pearson(stats.rankdata(x), stats.rankdata(y)), slope,
                     np.nanmean(within[pick]) if np.isfinite(within[pick]).any() else np.nan])


def bootstrap_intervals(p: Pairs, replicates: int = REPLICATES, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of every metric in INTERVALS, resampling measurements with replacement."""
    groups = _groups(p)
    if len(groups) < 2:
        return {name: (float("nan"), float("nan")) for name in INTERVALS}
    within = _within(p, groups)
    rng = np.random.default_rng(seed)
    draws = np.array([_replicate_metrics(p, groups, within, rng.integers(len(groups), size=len(groups)))
                      for _ in range(replicates)])
    return {name: _percentile_interval(draws[:, i]) for i, name in enumerate(INTERVALS)}


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the finite replicates (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


@dataclass(frozen=True)
class Comparison:
    metric: str
    a: float
    b: float
    difference: float  # a − b
    lo: float
    hi: float

    @property
    def verdict(self) -> str:
        if not (np.isfinite(self.lo) and np.isfinite(self.hi)) or self.lo <= 0 <= self.hi:
            return "not distinguishable"
        return "A better" if self.difference > 0 else "B better"


def compare(a: Pairs, b: Pairs, metric: str, replicates: int = REPLICATES, seed: int = 0) -> Comparison:
    """Paired bootstrap over the measurements both methods predicted: the 95% interval of metric(A) − metric(B).
    Both must cover the same (set, measurement) pairs in the same order."""
    column = INTERVALS.index(metric)
    ga, gb = _groups(a), _groups(b)
    wa, wb = _within(a, ga), _within(b, gb)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(replicates):
        pick = rng.integers(len(ga), size=len(ga))
        diffs.append(_replicate_metrics(a, ga, wa, pick)[column] - _replicate_metrics(b, gb, wb, pick)[column])
    ea, eb = point_estimates(a)[metric], point_estimates(b)[metric]
    return Comparison(metric, ea, eb, ea - eb, *_percentile_interval(np.asarray(diffs)))
