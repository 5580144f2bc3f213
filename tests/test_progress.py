"""Retraining progress is counted in model-steps: a chunk of every regime reports its models × their steps, once,
however the regime groups its models (pbrf solves one seed at a time), so done/total and models/s are right."""

from __future__ import annotations

import io

import pytest

from flows.progress import RetrainProgress
from flows.runner import regime_task
from retrain import load_study
from retrain.regimes import Job, parse_regime, train_full


@pytest.fixture(scope="module")
def linreg():
    study = load_study("linreg")
    full, _ = train_full(study, [0, 1], "full")
    return study, full


@pytest.mark.parametrize("regime", ["scratch", "warm", "pbrf"])
def test_a_chunk_over_two_seeds_reports_each_model_step_once(linreg, regime):
    study, full = linreg
    regime = parse_regime(regime)
    jobs = [Job(f"set{i}", seed, (i,)) for i in range(3) for seed in (0, 1)]  # pbrf solves it as 2 groups
    steps = regime.steps(study)
    planned = 10 * len(jobs)  # more than the chunk, so that no cap on `done` could hide an over-count
    progress = RetrainProgress("linreg", {regime.label: steps}, {regime.label: planned}, stream=io.StringIO(),
                               every=3600)
    progress.start(regime.label)
    records = regime_task.fn(study.source, study.study_hash, regime, jobs, full, progress=progress)
    assert [r.status for r in records] == ["done"] * len(jobs)
    assert progress.done[regime.label] == steps * len(jobs)
    assert progress.line().startswith(f"linreg: {regime.label} {len(jobs)}/{planned} models, ")
