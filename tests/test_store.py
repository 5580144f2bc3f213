"""The ledger on its own: hash chain, audit, views, pending jobs, the SQL sandbox. No training here."""

from __future__ import annotations

import re

import duckdb
import numpy as np
import pytest
from conftest import file_digest
from scipy import stats

import store
from store import InputError, PredictionRecord, RemovalSetRecord, RunRecord, StudyRecord

STUDY = StudyRecord("toy", "h0", "toy", {"x": 1}, n_train=10, n_params=3, measurements={"m0": "", "m1": ""})


def _sets(n: int) -> list[RemovalSetRecord]:
    return [RemovalSetRecord("h0", "single", f"single:{i}", (i,)) for i in range(n)]


def _predict(con, sets, values, method="exact") -> int:
    records = [PredictionRecord("h0", method, {"damping": 0.0}, s.set_id, m, float(values[k][j]))
               for k, s in enumerate(sets) for j, m in enumerate(["m0", "m1"])]
    return store.register_predictions(con, records, "test")


def _runs(con, sets, effects_by_seed, base=1.0, regime="scratch", unconverged=frozenset()) -> None:
    """Full runs measure `base`; set k's run for seed s measures base + effects_by_seed[s][k][m] (and has not
    converged when (k, s) is in `unconverged`)."""
    full = store.full_set_id("h0")
    records = []
    for seed, effects in enumerate(effects_by_seed):
        records.append(RunRecord("h0", full, seed, regime, "done", outcomes={"m0": base, "m1": base}, converged=True))
        for k, s in enumerate(sets):
            records.append(RunRecord("h0", s.set_id, seed, regime, "done", converged=(k, seed) not in unconverged,
                                     outcomes={m: base + effects[k][j] for j, m in enumerate(["m0", "m1"])}))
    store.record_runs(con, records)


@pytest.fixture
def ledger(tmp_path):
    db = tmp_path / "l.duckdb"
    with store.connect(db) as con:
        store.register_study(con, STUDY)
        store.register_removal_sets(con, _sets(6))
    return db


def test_chain_is_idempotent_and_audit_names_an_altered_row(ledger):
    sets = _sets(6)
    rng = np.random.default_rng(0)
    with store.connect(ledger) as con:
        assert _predict(con, sets, rng.normal(size=(6, 2))) == 12
        assert _predict(con, sets, rng.normal(size=(6, 2))) == 0  # same ids: nothing added
        assert _predict(con, sets, rng.normal(size=(6, 2)), method="grad_dot") == 12
        assert store.audit(con) == []
        con.execute("UPDATE predictions SET predicted = predicted + 1e-9 WHERE seq = 5")
        problems = store.audit(con)
    assert len(problems) == 1 and "predictions" in problems[0] and "predicted" in problems[0]


def test_audit_detects_deleted_rows_and_altered_sets(ledger):
    sets = _sets(6)
    with store.connect(ledger) as con:
        _predict(con, sets, np.ones((6, 2)))
        con.execute("DELETE FROM predictions WHERE seq = 3")
        con.execute("UPDATE removal_sets SET indices = [7] WHERE label = 'single:2'")
        problems = store.audit(con)
    assert any(p.startswith("predictions") and "deleted" in p for p in problems)
    assert any(p.startswith("removal_sets") and "indices" in p for p in problems)


def test_views_compute_paired_effects_and_calibration(ledger):
    sets = _sets(6)
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(6, 2))
    seeds = [truth + 0.1 * rng.normal(size=(6, 2)) for _ in range(4)]
    predicted = 2.0 * truth + 0.5
    with store.connect(ledger) as con:
        _predict(con, sets, predicted)
        _runs(con, sets, seeds)
        _, eff = store.fetch(con, "SELECT e.effect, e.effect_se, e.n_seeds FROM effects e JOIN removal_sets s "
                                  "USING (set_id) WHERE s.label = 'single:0' AND measurement_id = 'm1'")
        cols, rows = store.fetch(con, "SELECT * FROM calibration")
    per_seed = np.array([s[0, 1] for s in seeds])
    assert eff[0][0] == pytest.approx(per_seed.mean())
    assert eff[0][1] == pytest.approx(per_seed.std(ddof=1) / 2)
    assert eff[0][2] == 4
    row = dict(zip(cols, rows[0]))
    actual = np.mean(seeds, axis=0).ravel()
    assert row["n"] == 12
    assert row["pearson"] == pytest.approx(stats.pearsonr(predicted.ravel(), actual)[0])
    assert row["spearman"] == pytest.approx(stats.spearmanr(predicted.ravel(), actual)[0])
    slope, intercept = np.polyfit(predicted.ravel(), actual, 1)
    assert row["slope"] == pytest.approx(slope) and row["intercept"] == pytest.approx(intercept)
    error_variance = np.mean(np.var(seeds, axis=0, ddof=1).ravel() / len(seeds))
    assert row["noise_ceiling"] == pytest.approx(np.sqrt(1 - error_variance / np.var(actual, ddof=1)))


def test_converged_only_scores_the_effects_of_converged_runs_alone(ledger):
    """`calibration_with_intervals(false, converged_only := true)`: effects, noise ceiling and intervals from the
    converged runs alone; n_runs and n_converged count every run either way; the default scores every run."""
    from reports.calibration import interval_rows

    sets = _sets(6)
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(6, 2))
    seeds = np.array([truth + 0.3 * rng.normal(size=(6, 2)) for _ in range(3)])
    unconverged = {(0, 1), (2, 1), (4, 0)}  # (set, seed): stopped at the step budget
    seeds[1, 0] += 5.0  # an unconverged run far off: scoring it or not must show
    predicted = truth
    kept = np.array([[[(k, s) not in unconverged] * 2 for k in range(6)] for s in range(3)])
    with store.connect(ledger) as con:
        _predict(con, sets, predicted)
        _runs(con, sets, seeds, regime="pbrf", unconverged=unconverged)
    intervals = interval_rows(ledger, converged_only=True, replicates=50)
    with store.connect(ledger) as con:
        store.save_calibration_intervals(con, intervals)
        tables = [store.calibration_table(con, None, False, only) for only in (False, True)]
    every, converged = (dict(zip(columns, rows[0])) for columns, rows in tables)
    actual = (seeds * kept).sum(0) / kept.sum(0)
    assert converged["pearson"] == pytest.approx(stats.pearsonr(predicted.ravel(), actual.ravel())[0])
    assert every["pearson"] == pytest.approx(stats.pearsonr(predicted.ravel(), seeds.mean(0).ravel())[0])
    assert every["pearson"] < converged["pearson"] - 0.05
    assert (every["n_runs"], every["n_converged"]) == (converged["n_runs"], converged["n_converged"]) == (18, 15)
    error_variance = np.mean([seeds[kept[:, k, j], k, j].var(ddof=1) / kept[:, k, j].sum()
                              for k in range(6) for j in range(2)])
    assert converged["noise_ceiling"] == pytest.approx(np.sqrt(1 - error_variance / actual.ravel().var(ddof=1)))
    assert converged["pearson_lo"] is not None and every["pearson_lo"] is None  # intervals of what they describe


def test_an_older_ledgers_intervals_are_kept_when_their_key_gains_converged_only(ledger):
    with duckdb.connect(str(ledger)) as con:
        con.execute("DROP TABLE calibration_intervals")
        con.execute("CREATE TABLE calibration_intervals (study_hash VARCHAR, method VARCHAR, config_hash VARCHAR, "
                    "regime VARCHAR, set_kind VARCHAR, include_post_hoc BOOLEAN, n BIGINT, replicates INTEGER, "
                    "pearson_lo DOUBLE, computed_at TIMESTAMP, "
                    "PRIMARY KEY (study_hash, method, config_hash, regime, set_kind, include_post_hoc))")
        con.execute("INSERT INTO calibration_intervals VALUES ('h0', 'exact', 'c', 'pbrf', 'single', false, 12, "
                    "1000, 0.5, now())")
    with store.connect(ledger) as con:
        rows = con.execute("SELECT include_post_hoc, converged_only, n, pearson_lo FROM calibration_intervals"
                           ).fetchall()
        assert store.schema_problems(con) == []
    assert rows == [(False, False, 12, 0.5)]


def test_an_older_ledger_is_brought_up_to_date_by_a_reader_and_audit_says_so_first(ledger, capsys):
    from flows.cli import main

    with store.connect(ledger) as con:
        _predict(con, _sets(6), np.ones((6, 2)))
    with duckdb.connect(str(ledger)) as con:  # as an older ifledger left it: a column and a view it did not have
        con.execute("ALTER TABLE runs DROP COLUMN invocation_id; DROP VIEW reversal_test")
    before = file_digest(ledger)
    assert main(["--db", str(ledger), "audit"]) == 2
    assert "written by an older ifledger (it lacks runs.invocation_id)" in capsys.readouterr().err
    assert file_digest(ledger) == before  # audit changes nothing
    assert main(["--db", str(ledger), "sql", "SELECT count(*) FROM predictions"]) == 0
    out, err = capsys.readouterr()
    assert "12" in out and "written by an older ifledger: its schema is now the shipped one" in err
    assert main(["--db", str(ledger), "audit"]) == 0  # no chained row changed
    assert main(["--db", str(ledger), "sql", "SELECT 1"]) == 0
    assert "older" not in capsys.readouterr().err  # once only


def test_predictions_registered_after_outcomes_are_post_hoc(ledger):
    sets = _sets(6)
    with store.connect(ledger) as con:
        _predict(con, sets[:3], np.ones((3, 2)))
        _runs(con, sets, [np.ones((6, 2))])
        _predict(con, sets[3:], np.ones((3, 2)))
        _, rows = store.fetch(con, "SELECT s.label, post_hoc FROM prediction_accuracy JOIN removal_sets s "
                                   "USING (set_id) ORDER BY s.label")
        _, n = store.fetch(con, "SELECT n FROM calibration")
    assert {label: flag for label, flag in rows} == {f"single:{i}": i >= 3 for i in range(6)}
    assert n[0][0] == 6  # post-hoc predictions are left out of the default statistics


def test_pending_jobs_shrink_as_runs_finish(ledger):
    sets = _sets(6)
    with store.connect(ledger) as con:
        _predict(con, sets[:4], np.ones((4, 2)))
        pending = store.pending_jobs(con, "h0", [0, 1], ["scratch"])
        assert len(pending) == (4 + 1) * 2  # four predicted sets and the full-data baseline, two seeds
        assert pending[0][0] == store.full_set_id("h0")  # baselines first
        store.record_runs(con, [RunRecord("h0", sets[0].set_id, 0, "scratch", "done", outcomes={"m0": 1.0}),
                                RunRecord("h0", sets[1].set_id, 0, "scratch", "failed", reason="diverged")])
        assert len(store.pending_jobs(con, "h0", [0, 1], ["scratch"])) == 8


@pytest.mark.parametrize("sql", [
    "INSERT INTO studies SELECT * FROM studies",
    "UPDATE predictions SET predicted = 0",
    "DELETE FROM runs",
    "DROP TABLE outcomes",
    "CREATE TABLE x (a INTEGER)",
    "CREATE TEMP TABLE x AS SELECT 1",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY predictions TO '/tmp/leak.csv'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SET enable_external_access = true",
    "SELECT 1; DELETE FROM runs",
    "SELEC 1",
    "SELECT * FROM no_such_table",
    "",
])
def test_user_sql_refuses_anything_but_reading_the_ledger(ledger, sql):
    before = file_digest(ledger)
    with pytest.raises(InputError):
        store.user_query(ledger, sql)
    assert file_digest(ledger) == before


def test_user_sql_reads_tables_and_views(ledger):
    cols, rows = store.user_query(ledger, "SELECT kind, count(*) AS n FROM removal_sets GROUP BY kind ORDER BY kind")
    assert cols == ["kind", "n"] and rows == [("full", 1), ("single", 6)]
    assert store.user_query(ledger, "SELECT count(*) FROM calibration")[1] == [(0,)]


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a database")
    with pytest.raises(InputError, match="not a DuckDB ledger"), store.connect(bogus):
        pass
    with pytest.raises(InputError, match="no ledger"):
        store.user_query(tmp_path / "missing.duckdb", "SELECT 1")
    with pytest.raises(InputError, match="directory"):
        store.user_query(tmp_path, "SELECT 1")
    assert bogus.read_text() == "not a database"


def test_writer_waits_for_a_lock_then_gives_a_clear_error(ledger, monkeypatch):
    monkeypatch.setattr(store.connection, "WRITER_WAIT_SECONDS", 0.3)
    calls = []

    def locked(*args, **kwargs):
        calls.append(1)
        raise duckdb.IOException('Could not set lock on file "x": Conflicting lock is held')

    monkeypatch.setattr(store.connection.duckdb, "connect", locked)
    with pytest.raises(InputError, match="busy"), store.connect(ledger):
        pass
    assert len(calls) > 1  # it retried before giving up


@pytest.mark.parametrize("sql, message", [
    ("SELECT 1; SELECT 2", "one statement, not 2"),
    ("COPY predictions TO 'x.parquet'", "--format parquet --output FILE"),
    ("SELECT count(*) FROM range(1e13::BIGINT) t(i) WHERE hash(i) % 7 = 1", "longer than 0.5 s"),
    ("SELECT * FROM range(1e12::BIGINT) t(i) ORDER BY hash(i)", "more than 100MB of memory"),
])
def test_user_sql_stops_at_its_limits_with_one_line(ledger, sql, message):
    before = file_digest(ledger)
    with pytest.raises(InputError, match=re.escape(message)):
        store.user_query(ledger, sql, timeout=0.5 if "1e13" in sql else 60, memory_limit="100MB")
    assert file_digest(ledger) == before and not list(ledger.parent.glob("*.tmp"))


def test_user_sql_refuses_to_answer_through_a_swapped_view(ledger):
    con = duckdb.connect(str(ledger))
    con.execute("CREATE OR REPLACE VIEW calibration AS SELECT 0.999999 AS pearson")
    con.close()
    with pytest.raises(InputError, match="view calibration differs"):
        store.user_query(ledger, "SELECT 1")
    with store.connect(ledger):  # a write puts the shipped views back
        pass
    assert store.user_query(ledger, "SELECT 1")[1] == [(1,)]


def test_an_older_ledger_is_chained_on_its_first_write_in_the_order_it_was_written(ledger):
    sets = _sets(6)
    with store.connect(ledger) as con:
        _predict(con, sets[:3], np.ones((3, 2)))
        _runs(con, sets, [np.ones((6, 2))] * 2)
        _predict(con, sets[3:], np.ones((3, 2)))  # after the outcomes: post hoc
        con.execute("DROP TABLE chain")  # as an ifledger without the chain left it
    with store.read_only(ledger, sandbox=False) as con:
        assert store.audit(con)[0].startswith("chain: none yet")
    with store.connect(ledger) as con:  # the first write of a newer ifledger
        entries = con.execute("SELECT entry, bool_and(legacy), count(*) FROM chain GROUP BY ALL ORDER BY ALL"
                              ).fetchall()
        assert store.audit(con) == []
        post_hoc = con.execute("SELECT set_id, bool_and(post_hoc) FROM prediction_accuracy GROUP BY ALL").fetchall()
    assert entries == [("measurements", True, 2), ("predictions", True, 12), ("removal_sets", True, 7),
                       ("runs", True, 14), ("studies", True, 1)]
    assert dict(post_hoc) == {s.set_id: k >= 3 for k, s in enumerate(sets)}


def test_measurement_facets_are_chained_and_rows_from_before_them_keep_their_content(tmp_path):
    db = tmp_path / "l.duckdb"
    tagged = StudyRecord("toy", "h0", "toy", {}, n_train=10, n_params=3, measurements={"m0": "", "rank": ""},
                         without_gradient={"rank"}, measurement_tags={"m0": {"direction": "forward"}})
    with store.connect(db) as con:
        store.register_study(con, tagged)
        rows = con.execute("SELECT measurement_id, differentiable, tags->>'direction' FROM measurements ORDER BY 1"
                           ).fetchall()
        assert rows == [("m0", True, "forward"), ("rank", False, None)]
        assert store.audit(con) == []
        con.execute("UPDATE measurements SET tags = '{\"direction\": \"reverse\"}' WHERE measurement_id = 'm0'")
        assert any(p.startswith("measurements h0/m0: changed") and "reverse" in p for p in store.audit(con))
        con.execute("UPDATE measurements SET differentiable = NULL, tags = NULL")  # as written before the columns
        assert store.chain.contents(con, "measurements") == {"h0/m0": {"description": ""},
                                                             "h0/rank": {"description": ""}}


def test_a_full_disk_is_one_line_and_rolls_the_write_back(ledger, monkeypatch):
    with store.read_only(ledger) as con:
        before = store.head(con), store.fetch(con, "SELECT count(*) FROM removal_sets")[1]

    def full(*args, **kwargs):
        raise duckdb.IOException("IO Error: Could not write file \"l.duckdb.wal\": No space left on device")

    monkeypatch.setattr(store.ledger, "insert", full)
    with pytest.raises(InputError, match="disk holding .* is full: the write was rolled back"), \
            store.connect(ledger) as con:
        store.register_removal_sets(con, [RemovalSetRecord("h0", "single", "new", (9, 8))])
    with store.read_only(ledger) as con:
        assert (store.head(con), store.fetch(con, "SELECT count(*) FROM removal_sets")[1]) == before


def test_with_a_key_an_entry_cannot_be_forged_without_it(tmp_path, monkeypatch):
    db = tmp_path / "keyed.duckdb"
    monkeypatch.setenv(store.KEY_VARIABLE, "the lab's secret")
    with store.connect(db) as con:
        store.register_study(con, STUDY)
        _predict(con, _sets(2), np.ones((2, 2)))
        assert store.audit(con) == []
    for forger_key in (None, "a guess"):
        copy = tmp_path / f"forged-{forger_key}.duckdb"
        copy.write_bytes(db.read_bytes())
        if forger_key is None:
            monkeypatch.delenv(store.KEY_VARIABLE)
        else:
            monkeypatch.setenv(store.KEY_VARIABLE, forger_key)
        with duckdb.connect(str(copy)) as con:  # a forger with ifledger's code, appending one prediction
            _predict(con, _sets(3)[2:], np.ones((1, 2)))
        monkeypatch.setenv(store.KEY_VARIABLE, "the lab's secret")
        with store.read_only(copy) as con:
            problems = store.audit(con)
        assert problems and all("chain seq" in p for p in problems), problems
        assert ("not keyed" if forger_key is None else "entry altered") in problems[0]
    monkeypatch.delenv(store.KEY_VARIABLE)
    with store.read_only(db) as con:
        assert "set it to audit" in store.audit(con)[0]


def test_a_retried_failed_run_gets_a_retry_entry_then_a_new_entry(ledger):
    sets = _sets(1)
    job = (sets[0].set_id, 0, "scratch")
    with store.connect(ledger) as con:
        store.record_runs(con, [RunRecord("h0", *job, "failed", reason="diverged")])
        assert store.start_runs(con, "h0", [job], retry_failed=True) == [job]
        assert store.audit(con) == []  # a failed run claimed again has its retry entry
        store.record_runs(con, [RunRecord("h0", *job, "done", outcomes={"m0": 1.0, "m1": 2.0})])
        assert store.audit(con) == []
        statuses = con.execute("SELECT content->>'status' FROM chain WHERE entry = 'runs' ORDER BY seq").fetchall()
        assert statuses == [("failed",), ("running",), ("done",)]
        con.execute("UPDATE runs SET status = 'running'")
        problems = store.audit(con)
        assert problems[0] == f"runs {store.run_id('h0', *job)}: status changed 'done' -> 'running'", problems


@pytest.mark.full  # seconds of simulated seeds: the full tier (make test-fast stays quick)
@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_noise_ceiling_is_unbiased_and_reached_by_the_true_effects(tmp_path, seeds):
    """Simulated effects with a known reliability: t_i ~ N(0, 1) true effects, seed effects t_i + N(0, σ²), so the
    reliability of an n-seed mean is 1 / (1 + σ²/n). Over 20 studies of 150 items the view's estimate averages to
    it (the split half was biased for odd seed counts), the true effects reach the ceiling, and a predictor
    averaging n independent seeds stays below it (its Pearson is about the reliability itself)."""
    sigma2, trials, names = 2.0, 20, ["m0", "m1"]
    truth = 1 / (1 + sigma2 / seeds)
    rng = np.random.default_rng(seeds)
    with store.connect(tmp_path / "sim.duckdb") as con:
        for trial in range(trials):
            h = f"h{trial}"
            sets = [RemovalSetRecord(h, "single", f"single:{i}", (i,)) for i in range(75)]
            true = rng.normal(size=(75, 2))
            store.register_study(con, StudyRecord(f"sim{trial}", h, "sim", {}, 75, 3, dict.fromkeys(names, "")))
            store.register_removal_sets(con, sets)
            independent = true + rng.normal(scale=np.sqrt(sigma2 / seeds), size=true.shape)  # n fresh seeds' mean
            for method, values in (("truth", true), ("fresh", independent)):
                store.register_predictions(con, [PredictionRecord(h, method, {}, s.set_id, m, float(values[k][j]))
                                                 for k, s in enumerate(sets) for j, m in enumerate(names)], "t")
            effects = true[None] + rng.normal(scale=np.sqrt(sigma2), size=(seeds, *true.shape))
            store.record_runs(con, [RunRecord(h, store.full_set_id(h), seed, "scratch", "done",
                                              outcomes=dict.fromkeys(names, 0.0)) for seed in range(seeds)]
                              + [RunRecord(h, s.set_id, seed, "scratch", "done",
                                           outcomes={m: float(effects[seed, k, j]) for j, m in enumerate(names)})
                                 for seed in range(seeds) for k, s in enumerate(sets)])
        rows = con.execute("SELECT c.study_hash, nc.reliability, c.noise_ceiling, "
                           "max(c.pearson) FILTER (WHERE c.method = 'truth'), "
                           "max(c.pearson) FILTER (WHERE c.method = 'fresh') "
                           "FROM calibration c JOIN noise_ceiling nc USING (study_hash, regime, set_kind) "
                           "GROUP BY ALL").fetchall()
    reliability, ceiling, oracle, fresh = (np.array(column, float) for column in list(zip(*rows))[1:])
    assert len(rows) == trials

    def near(values: np.ndarray, target: float) -> bool:  # within 3 standard errors (and a small bias allowance)
        return abs(values.mean() - target) < 3 * values.std(ddof=1) / np.sqrt(trials) + 0.01

    assert near(reliability, truth), (reliability.mean(), truth)
    assert near(oracle - ceiling, 0.0), (oracle - ceiling).mean()  # a ceiling, not a loose bound
    assert near(fresh, truth), (fresh.mean(), truth)  # sqrt(rel_n · rel_n) = rel_n
    assert (fresh - ceiling).mean() < -0.1


def test_non_finite_bootstrap_replicates_are_counted_not_dropped_silently():
    from reports.stats import Pairs, bootstrap_intervals

    # one distinct prediction among nine: a resample that leaves it out has a constant predictor, so no Pearson
    rows = [(float(s == 2 and m == 2), float(s + m), f"m{m}", f"s{s}") for s in range(3) for m in range(3)]
    intervals = bootstrap_intervals(Pairs.of(rows), replicates=200)
    pearson = intervals["pearson"]
    assert 0 < pearson.nonfinite < 200
    assert np.isfinite(pearson.lo) and np.isfinite(pearson.hi)
