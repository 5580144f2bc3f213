"""Wall time of the read-only commands (`ifledger --help`, `status`, `studies`, `sql`) against what importing
torch and Prefect alone costs, each the median of a few fresh processes in one run (target: --help and status
under 1.5 s on an idle machine). A benchmark, not a test: the test checks only that these commands import
neither torch nor Prefect.

    .venv/bin/python benchmarks/cli_latency.py [--db LEDGER] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import store
from store import PredictionRecord, RemovalSetRecord, StudyRecord


def _toy_ledger(path: Path) -> None:
    """A ledger with one study and a few predictions, made without training."""
    sets = [RemovalSetRecord("h0", "single", f"single:{i}", (i,)) for i in range(20)]
    with store.connect(path) as con:
        store.register_study(con, StudyRecord("toy", "h0", "toy", {"recipe": {"seeds": 3}}, 20, 3, {"m": ""}))
        store.register_removal_sets(con, sets)
        store.register_predictions(con, [PredictionRecord("h0", "exact", {}, s.set_id, "m", 0.1) for s in sets], "b")


def _seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--db", help="a ledger to run status/sql on (default: a small one made here)")
    args.add_argument("--repeats", type=int, default=5)
    opts = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = opts.db or str(Path(tmp) / "toy.duckdb")
        if not opts.db:
            _toy_ledger(Path(db))
        cli = [sys.executable, "-m", "flows.cli", "--db", db]
        baseline = _seconds([sys.executable, "-c", "import torch, prefect"], opts.repeats)
        print(f"{'command':<40} {'seconds':>8} {'x import torch+prefect':>24}")
        print(f"{'python -c import torch, prefect':<40} {baseline:8.2f} {1.0:24.2f}")
        for argv in (["--help"], ["status"], ["studies"], ["sql", "SELECT * FROM calibration"], ["audit"]):
            seconds = _seconds(cli + argv, opts.repeats)
            print(f"{'ifledger ' + ' '.join(argv):<40} {seconds:8.2f} {seconds / baseline:24.2f}")


if __name__ == "__main__":
    main()
