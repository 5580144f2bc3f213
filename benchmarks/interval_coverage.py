"""Coverage of the calibration intervals, measured: fresh chance predictors (independent normal numbers, one per
(set, measurement) pair) against the real effects of a ledger's random removal sets. A 95% interval should cover
0 for about 95 of 100 of them. Prints, side by side in one run, the two-way bootstrap that `ifledger calibrate`
uses (sets and measurements resampled), resampling measurements alone, and `scipy.stats.bootstrap` as far as it
applies (it resamples one index: the (set, measurement) pairs for Pearson, the sets for the LDS; it cannot resample
sets and measurements at once). A benchmark, not a test.

    .venv/bin/ifledger --db /tmp/digits.duckdb run digits-mlp
    .venv/bin/python benchmarks/interval_coverage.py /tmp/digits.duckdb [--regime scratch] [--draws 100]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

import store
from reports.stats import INTERVALS, Pairs, _lds, bootstrap_intervals, point_estimates


def measurements_only(p: Pairs, replicates: int, rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """Resample measurements with replacement, each bringing all its sets (a repeated one counts twice)."""
    ids = np.unique(p.measurement)
    draws = []
    for _ in range(replicates):
        parts = [(np.flatnonzero(p.measurement == m), k) for k, m in enumerate(rng.choice(ids, size=len(ids)))]
        idx = np.concatenate([i for i, _ in parts])
        relabelled = np.concatenate([np.full(len(i), f"{k}") for i, k in parts])
        draws.append([point_estimates(Pairs(p.predicted[idx], p.actual[idx], relabelled, p.removal_set[idx]))[m]
                      for m in INTERVALS])
    draws = np.array(draws)
    return {m: tuple(np.nanpercentile(draws[:, i], [2.5, 97.5])) for i, m in enumerate(INTERVALS)}


def scipy_bootstrap(p: Pairs, replicates: int, seed: int) -> dict[str, tuple[float, float]]:
    """scipy.stats.bootstrap (percentile): pairs resampled for Pearson, sets (with all their measurements) for LDS."""
    options = {"n_resamples": replicates, "method": "percentile", "vectorized": False, "random_state": seed}
    pearson = stats.bootstrap((p.predicted, p.actual), lambda x, y: np.corrcoef(x, y)[0, 1], paired=True, **options)
    predicted, actual = p.grid()
    lds = stats.bootstrap((np.arange(len(predicted)),), lambda rows: _lds(predicted[rows], actual[rows]), **options)
    return {"pearson": tuple(pearson.confidence_interval), "lds": tuple(lds.confidence_interval)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db")
    parser.add_argument("--regime", default="scratch")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--replicates", type=int, default=300)
    args = parser.parse_args()
    with store.read_only(args.db, sandbox=False) as con:
        _, rows = store.fetch(con, "SELECT e.effect, e.measurement_id, e.set_id FROM effects e JOIN removal_sets s "
                                   "USING (set_id) WHERE s.kind = 'random' AND e.regime = ?", [args.regime])
    if not rows:
        raise SystemExit(f"{args.db}: no effects of random sets in regime {args.regime!r}")
    actual, measurement, removal_set = zip(*rows)
    print(f"{len(set(removal_set))} random sets × {len(set(measurement))} measurements, regime {args.regime}; "
          f"{args.draws} chance predictors, {args.replicates} replicates each")
    rng = np.random.default_rng(0)
    covered = {"sets and measurements": np.zeros(2), "measurements only": np.zeros(2),
               "scipy (pairs / sets)": np.zeros(2)}
    for draw in range(args.draws):
        pairs = Pairs.of(list(zip(rng.normal(size=len(actual)), actual, measurement, removal_set)))
        for scheme, intervals in (("sets and measurements", bootstrap_intervals(pairs, args.replicates, seed=draw)),
                                  ("measurements only", measurements_only(pairs, args.replicates, rng)),
                                  ("scipy (pairs / sets)", scipy_bootstrap(pairs, args.replicates, draw))):
            covered[scheme] += [intervals[m][0] < 0 < intervals[m][1] for m in ("pearson", "lds")]
    print(f"{'resampled':<24}{'pearson covers 0':>18}{'lds covers 0':>14}")
    for scheme, c in covered.items():
        print(f"{scheme:<24}{c[0] / args.draws:>18.2f}{c[1] / args.draws:>14.2f}")


if __name__ == "__main__":
    main()
