"""Error rates of the reversal verdict's pooled test, measured through the `reversal_verdict` view itself: synthetic
ledgers whose per-entity true ratios E[reverse / forward] = mu_e are chosen, with seed noise, and many independent
replicates of the pooled row (one per `template` facet value). Prints, per scenario, how often the view shows the
reverse under a tenth (ratio_hi < 0.1) and moving by more (ratio_lo > 0.1); at the boundary |mu_e| = 0.1 both rates
must stay under 5% (the tests' size), and beside them the same rate for the former pooling over (seed, entity)
pairs (the mean of per-seed |ratio| and its 90% t bound, computed here with numpy for the contrast only). A
benchmark, not a test.

    .venv/bin/python benchmarks/reversal_equivalence.py [--replicates 200] [--entities 20] [--seeds 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

import store
from store import PredictionRecord, RemovalSetRecord, RunRecord, StudyRecord

FORWARD = -10.0  # mean forward effect; the reverse effect is mu_e × forward + noise


def scenario_ledger(path: Path, mu: np.ndarray, noise: float, seeds: int, rng: np.random.Generator) -> np.ndarray:
    """A ledger with one study, entities e (forward-only, plus one Both control moving fully with its forward) and
    replicates t (the `template` facet): effects forward ~ FORWARD + N(0, 0.5), reverse = mu[t, e] × forward +
    N(0, noise × |FORWARD|) per seed. Returns the per-seed ratios [t, e, seed]."""
    replicates, entities = mu.shape
    names = [f"e{k}" for k in range(entities)] + ["both"]
    group = {n: "NameToDescription" for n in names[:-1]} | {"both": "Both"}
    ids = {(t, n, d): f"t{t}/{n}/{d}" for t in range(replicates) for n in names for d in ("forward", "reverse")}
    tags = {m: {"statistic": "margin", "template": f"t{t}", "entity": n, "direction": d, "group": group[n]}
            for (t, n, d), m in ids.items()}
    study = StudyRecord("sim", "hsim", "sim", {}, n_train=len(names), n_params=1,
                        measurements=dict.fromkeys(ids.values(), ""), measurement_tags=tags)
    sets = {n: RemovalSetRecord("hsim", "group", f"group:entity={n}", (k,)) for k, n in enumerate(names)}
    forward = FORWARD + rng.normal(0, 0.5, (replicates, len(names), seeds))
    ratio_true = np.concatenate([mu, np.ones((replicates, 1))], axis=1)[..., None]
    reverse = ratio_true * forward + rng.normal(0, noise * abs(FORWARD), forward.shape)
    full = store.full_set_id("hsim")
    runs = [RunRecord("hsim", full, s, "scratch", "done", outcomes=dict.fromkeys(ids.values(), 0.0))
            for s in range(seeds)]
    for k, n in enumerate(names):
        for s in range(seeds):
            outcomes = dict.fromkeys(ids.values(), 0.0)
            for t in range(replicates):
                outcomes[ids[(t, n, "forward")]] = float(forward[t, k, s])
                outcomes[ids[(t, n, "reverse")]] = float(reverse[t, k, s])
            runs.append(RunRecord("hsim", sets[n].set_id, s, "scratch", "done", outcomes=outcomes))
    with store.connect(path) as con:
        store.register_study(con, study)
        store.register_removal_sets(con, list(sets.values()))
        store.register_predictions(con, [PredictionRecord("hsim", "m", {}, sets[n].set_id, m,
                                                          -5.0 if d == "forward" else -2.5)
                                         for (_, n, d), m in ids.items()], "benchmark")
        store.record_runs(con, runs)
    return (reverse / forward)[:, :-1]


def rates(path: Path, ratios: np.ndarray) -> dict[str, float]:
    """Share of replicates whose pooled forward-only row shows under a tenth / a movement beyond it, by the view and
    by the former pooling over (seed, entity) pairs."""
    with store.read_only(path) as con:
        lo, hi = np.array(con.execute("SELECT ratio_lo, ratio_hi FROM reversal_verdict WHERE entity_group <> 'Both' "
                                      "ORDER BY template").fetchall(), dtype=float).T
    pairs = np.abs(ratios.reshape(len(ratios), -1))
    n = pairs.shape[1]
    pairs_hi = pairs.mean(1) + stats.t.ppf(0.95, n - 1) * pairs.std(1, ddof=1) / np.sqrt(n)
    return {"under": float(np.mean(hi < 0.1)), "moves": float(np.mean(lo > 0.1)),
            "pairs_under": float(np.mean(pairs_hi < 0.1)), "replicates": len(hi)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--entities", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.12, help="seed noise of a ratio (the default run: ~0.1)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.replicates, args.entities)
    signs = rng.choice([-1.0, 1.0], shape)
    scenarios = {
        "|mu| = 0.1 for every entity, random signs (boundary)": 0.1 * signs,
        "mu = +0.1 for every entity (boundary)": np.full(shape, 0.1),
        "|mu| = 0.05, random signs": 0.05 * signs,
        "mu = 0": np.zeros(shape),
        "|mu| = 0.2, random signs": 0.2 * signs,
        "mu ~ N(0.01, 0.08) per entity (the default run's spread)": rng.normal(0.01, 0.08, shape),
    }
    print(f"{args.replicates} replicates × {args.entities} forward-only entities × {args.seeds} seeds, seed noise "
          f"{args.noise} of the forward effect; share of replicates whose pooled row shows:")
    print(f"{'scenario':<60} {'under 0.1':>10} {'moves':>8} {'former (pairs) under':>21}  seconds")
    for label, mu in scenarios.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "sim.duckdb"
            ratios = scenario_ledger(path, mu, args.noise, args.seeds, rng)
            r = rates(path, ratios)
        print(f"{label:<60} {r['under']:>10.3f} {r['moves']:>8.3f} {r['pairs_under']:>21.3f}  "
              f"{time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
