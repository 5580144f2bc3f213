"""Two `ifledger run` at once on one machine: each process's torch threads are its share of the cores
(`flows.cores`), so two runs should each take well under 2.5x one alone; with every process taking every core
(`IFLEDGER_THREADS` = the core count, the behaviour before sharing) their threads fight. Prints, from one run of
this script, the wall time of one run alone and of two at once, both ways, and the ratios (a benchmark, not a
test; run it on an otherwise idle machine).

    .venv/bin/python benchmarks/concurrent_runs.py [--study digits-mlp] [--args "--sets single:n=20 --regimes scratch"]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def runs(count: int, study: str, extra: list[str], folder: Path, env: dict[str, str]) -> float:
    """Wall seconds of `count` `ifledger run STUDY` started together, each on its own ledger."""
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "--db", str(folder / f"{k}.duckdb"), "run", study,
                               "--report-dir", str(folder / f"reports{k}"), *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for k in range(count)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"ifledger run failed ({p.returncode}): {err[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="digits-mlp")
    parser.add_argument("--args", default="--sets single:n=20 --regimes scratch warm",
                        help="options of `ifledger run`, quoted")
    args = parser.parse_args()
    extra, cores = shlex.split(args.args), len(os.sched_getaffinity(0))
    base = {**os.environ, "TQDM_DISABLE": "1"}
    base.pop("IFLEDGER_THREADS", None)
    print(f"{cores} cores; load average before {os.getloadavg()[0]:.2f}; ifledger run {args.study} {args.args}")
    rows = []
    for name, env in (("shared cores (default)", base), ("every process takes every core",
                                                           {**base, "IFLEDGER_THREADS": str(cores)})):
        with tempfile.TemporaryDirectory() as alone, tempfile.TemporaryDirectory() as two:
            one = runs(1, args.study, extra, Path(alone), env)
            both = runs(2, args.study, extra, Path(two), env)
        rows.append((name, one, both))
        print(f"{name}: one alone {one:.1f} s, two at once {both:.1f} s, ratio {both / one:.2f}x", flush=True)
    (_, one_shared, two_shared), (_, one_all, two_all) = rows
    print(f"two at once, shared against every core: {two_all / two_shared:.2f}x faster; target: two at once "
          f"< 2.5x one alone (measured {two_shared / one_shared:.2f}x)")


if __name__ == "__main__":
    main()
