"""Prefect's overhead on `verify`: the same digits-mlp retraining through `verify_flow` and by calling the plain
functions directly (same chunks, same ledger writes), in one run; prints both wall times and their ratio
(target <= 1.25x) and checks that both ledgers got the same outcomes (a benchmark, not a test).

    .venv/bin/python benchmarks/prefect_overhead.py [--sets 20] [--chunk-size 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402

import store  # noqa: E402
from flows.configs import RegisterConfig, VerifyConfig  # noqa: E402
from flows.pipeline import _full_models, plan, register_flow, verify_flow  # noqa: E402
from retrain import load_study  # noqa: E402
from retrain.regimes import Job, run_regime  # noqa: E402

REGIMES = ["scratch"]


def direct(db: str, chunk_size: int) -> int:
    """verify_flow's work without Prefect: pending jobs, chunks, run_regime, the same claims and writes."""
    study = load_study("digits-mlp")
    full = _full_models(study, db)  # cached by register: no task runs
    with store.read_only(db, sandbox=False) as con:
        pending = store.pending_jobs(con, study.study_hash, sorted(full), REGIMES)
        indices = store.removal_set_indices(con, sorted({p[0] for p in pending}))
    jobs = [Job(s, seed, *indices[s]) for s, seed, _ in pending]
    finished: list = []
    for i in range(0, len(jobs), chunk_size):
        chunk = jobs[i : i + chunk_size]
        with store.connect(db) as con:
            store.record_runs(con, finished)
            store.start_runs(con, study.study_hash, [(j.set_id, j.seed, "scratch") for j in chunk])
        finished = run_regime(study, "scratch", chunk, full)
    with store.connect(db) as con:
        store.record_runs(con, finished)
    return len(jobs)


@flow
def warm_up() -> None:
    """Starts Prefect's temporary server (once per process), so that it is timed on its own."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=20, help="single removals registered (default 20)")
    parser.add_argument("--chunk-size", type=int, default=16, help="models per task (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain/flow rounds (default 2)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ifledger-overhead-"))
    base = str(folder / "base.duckdb")
    start = time.perf_counter()
    warm_up()
    server = time.perf_counter() - start
    register_flow(plan(RegisterConfig(base, "digits-mlp", ("grad_dot",), (f"single:n={args.sets}",))))
    sql = "SELECT run_id, measurement_id, value FROM outcomes ORDER BY ALL"
    busy = "SELECT sum(seconds) FROM runs WHERE started_at IS NOT NULL"  # inside run_regime
    totals = {"plain functions": [0.0, 0.0], "verify_flow": [0.0, 0.0]}
    outcomes = []
    for k in range(args.rounds):  # alternate, so that a change in the machine's load hits both alike
        for name in totals:
            db = str(folder / f"{name.replace(' ', '_')}-{k}.duckdb")
            shutil.copy(base, db)
            start = time.perf_counter()
            if name == "verify_flow":
                models = verify_flow(VerifyConfig(str(db), "digits-mlp", tuple(REGIMES), args.chunk_size)).done
            else:
                models = direct(db, args.chunk_size)
            totals[name][0] += time.perf_counter() - start
            with store.read_only(db) as con:
                totals[name][1] += con.execute(busy).fetchone()[0]
                outcomes.append(con.execute(sql).fetchall())
    print(f"digits-mlp, {models} scratch models in chunks of {args.chunk_size}, {os.cpu_count()} cores, "
          f"{args.rounds} rounds")
    print(f"  Prefect temporary server start (once per process, not counted): {server:.1f} s")
    for name, (wall, inside) in totals.items():
        print(f"  {name:<16} {wall / args.rounds:6.1f} s per round (of which inside run_regime "
              f"{inside / args.rounds:.1f} s)")
    ratio = totals["verify_flow"][0] / totals["plain functions"][0]
    print(f"  ratio flow/plain: {ratio:.3f}x (target <= 1.25x); identical outcomes: "
          f"{all(o == outcomes[0] for o in outcomes)}")
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
