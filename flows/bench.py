"""`ifledger bench STUDY`: every available method, ours and the peer libraries', on the same study, full-data
models, removal sets and retrains, in one run: register (timing each method's scoring) -> verify -> calibrate ->
one table and a figure. The metrics are the `calibration` view's; this flow only joins them to the costs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow

import store
from flows.configs import BenchConfig
from flows.pipeline import RegisterSummary, _invocation, calibrate_flow, plan, register_flow, verify_flow
from flows.runner import Runner, VerifySummary
from predictions import METHODS
from predictions.peers import is_peer, peer_methods
from reports.bench import bench_rows, write_bench


def bench_methods() -> tuple[str, ...]:
    """Like for like from one full-data model (seed 0): every built-in method, then every installed peer's, each
    with `models=1`; and `exact` averaged over all the study's seeds (the same label as `exact:models=1` on a
    one-seed study, where `plan` keeps one)."""
    return ("exact", *(f"{m}:models=1" for m in (*METHODS.names(), *peer_methods(only_installed=True))))


@dataclass
class BenchSummary:
    register: RegisterSummary
    verify: VerifySummary
    table: tuple[list[str], list[tuple]]
    markdown: Path
    figure: Path | None


@flow(name="bench")
def bench_flow(config: BenchConfig) -> BenchSummary:
    """Register every method's predictions from the same full-data models (a peer that fails is recorded in
    `prediction_failures`), retrain the sets under the regimes, calibrate, and write the bench table and figure."""
    r, v = config.register, config.verify
    Runner.of(v.runner, v.workers, v.address, v.pool)  # refuse bad runner options before anything is written
    request = plan(replace(r, methods=r.methods or bench_methods()), v.regimes)
    _invocation("bench", config, r.db)
    registered = register_flow(request)
    verified = verify_flow(replace(v, study=request.study.name, regimes=tuple(request.regimes)))
    calibrate_flow(r.db, request.study.name)
    with store.read_only(r.db, sandbox=False) as con:
        calibration = store.calibration_table(con, request.study.name, False, False)
    labels = [m.label for m in request.methods]
    table = bench_rows(calibration, labels, {m.label: is_peer(m.label) for m in request.methods},
                       registered.costs, registered.failed, request.regimes)
    markdown, figure = write_bench(r.db, request.study.name, table, Path(config.report_dir))
    return BenchSummary(registered, verified, table, markdown, figure)
