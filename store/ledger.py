"""The ledger's records: studies, measurements, removal sets, runs with their outcomes, cached models and the
calibration intervals, written one batch per transaction and read back for the flows. No torch here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb

from store.chain import append
from store.connection import fetch, insert, now, transaction
from store.model_files import ledger_path, model_file, model_file_bytes, models_folder, write_model_file
from store.records import (
    ModelRecord,
    PredictionFailureRecord,
    RemovalSetRecord,
    RunRecord,
    SelfInfluenceRecord,
    StudyRecord,
    WeightChangeRecord,
    content_hash,
    removal_set_id,
    weight_change_id,
)


def register_study(con: duckdb.DuckDBPyConnection, study: StudyRecord) -> None:
    """Record a study, its measurements and its `full` (empty) removal set; idempotent."""
    with transaction(con):
        con.execute(
            "INSERT INTO studies (study_hash, study, source, config, n_train, n_params, created_at, default_regimes, "
            "pairing) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "default_regimes = coalesce(studies.default_regimes, excluded.default_regimes)",
            [study.study_hash, study.name, study.source, json.dumps(study.config, sort_keys=True),
             study.n_train, study.n_params, now(), list(study.default_regimes), study.pairing],
        )
        insert(con, "measurements", ("study_hash", "measurement_id", "description", "differentiable", "tags"),
               [[study.study_hash, m, d, m not in study.without_gradient,
                 json.dumps(study.measurement_tags[m], sort_keys=True) if m in study.measurement_tags else None]
                for m, d in study.measurements.items()])
        append(con, "studies", [study.study_hash])
        append(con, "measurements", [f"{study.study_hash}/{m}" for m in study.measurements])
        insert(con, "flipped_labels", ("study_hash", "train_index", "given_label", "true_label"),
               [[study.study_hash, j, g, t] for j, (g, t) in study.flipped_labels.items()])
        append(con, "flipped_labels", [f"{study.study_hash}/{j}" for j in study.flipped_labels])
    register_removal_sets(con, [RemovalSetRecord(study.study_hash, "full", "full data", ())])


def register_removal_sets(con: duckdb.DuckDBPyConnection, sets: Sequence[RemovalSetRecord]) -> list[str]:
    """Store removal and relabel sets once (content-hashed); returns their ids in order."""
    at = now()
    with transaction(con):
        insert(con, "removal_sets", ("set_id", "study_hash", "kind", "label", "size", "indices", "ranked_by",
                                      "target", "direction", "new_labels", "created_at"),
               [[s.set_id, s.study_hash, s.kind, s.label, len(s.indices), list(s.indices), s.ranked_by, s.target,
                  s.direction, None if s.new_labels is None else list(s.new_labels), at] for s in sets])
        append(con, "removal_sets", list(dict.fromkeys(s.set_id for s in sets)))
    return [s.set_id for s in sets]


def keep_older_ids(con: duckdb.DuckDBPyConnection, sets: Sequence[RemovalSetRecord]) -> list[RemovalSetRecord]:
    """`sets`, each marked `stored_by_members` where the ledger already holds it under its points-only id (as
    ledgers did before set ids covered the kind and ranking) with the same definition: it keeps that id, and with
    it its predictions and runs. Any other set gets its full id."""
    rows = con.execute("SELECT set_id, kind, ranked_by, target, direction FROM removal_sets "
                       "WHERE list_contains($ids, set_id)", {"ids": [s.members_id for s in sets]}).fetchall()
    stored = {set_id: RemovalSetRecord("", kind, "", (), ranked_by, target, direction).definition
              for set_id, kind, ranked_by, target, direction in rows}
    return [replace(s, stored_by_members=True) if stored.get(s.members_id) == s.definition else s for s in sets]


def record_invocation(con: duckdb.DuckDBPyConnection, command: str, config: dict[str, Any], code_version: str
                      ) -> str:
    """Store and chain what one flow run was asked to do (its command's whole config) and its code version;
    returns its id, which the predictions and runs it writes carry (that column is not chained)."""
    at = now()
    invocation_id = content_hash("invocation", command, config, code_version, at.isoformat())
    with transaction(con):
        insert(con, "invocations", ("invocation_id", "command", "config", "code_version", "started_at"),
               [[invocation_id, command, json.dumps(config, sort_keys=True), code_version, at]])
        append(con, "invocations", [invocation_id])
    return invocation_id


def record_runs(con: duckdb.DuckDBPyConnection, runs: Sequence[RunRecord], invocation_id: str | None = None) -> None:
    """Write finished runs and their outcomes, and chain them, in one transaction (run status is the only
    update), naming the invocation that produced them (not chained)."""
    at = now()
    with transaction(con):
        insert(con, "runs", ("run_id", "study_hash", "set_id", "seed", "regime", "status", "reason", "seconds",
                              "train_loss", "converged", "finished_at", "invocation_id", "checkpoint_sha256"),
                [[r.run_id, r.study_hash, r.set_id, r.seed, r.regime, r.status, r.reason, r.seconds,
                  r.train_loss, r.converged, at, invocation_id, r.checkpoint_sha256] for r in runs],
                conflict="ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, reason = excluded.reason, "
                         "seconds = excluded.seconds, train_loss = excluded.train_loss, "
                         "converged = excluded.converged, finished_at = excluded.finished_at, "
                         "invocation_id = excluded.invocation_id, checkpoint_sha256 = excluded.checkpoint_sha256")
        insert(con, "outcomes", ("run_id", "measurement_id", "value"),
               [[r.run_id, m, float(v)] for r in runs if r.status == "done" for m, v in r.outcomes.items()])
        insert(con, "run_weight_changes", ("run_id", "block", "norm", "direction"),
               [[r.run_id, b, float(norm), list(direction)] for r in runs if r.status == "done"
                for b, (norm, direction) in r.weight_changes.items()])
        append(con, "runs", [r.run_id for r in runs])  # a retried failed run gets a new entry


def register_weight_changes(con: duckdb.DuckDBPyConnection, changes: Sequence[WeightChangeRecord], code_version: str
                            ) -> int:
    """Append new predicted weight changes and their chain entries in one transaction (already registered ones, by
    `weight_change_id`, are skipped). Returns how many were added."""
    at = now()
    with transaction(con):
        known = {r[0] for r in con.execute("SELECT weight_change_id FROM predicted_weight_changes").fetchall()}
        rows = {}
        for w in changes:
            key = weight_change_id(w)
            if key not in known and key not in rows:
                rows[key] = [key, w.study_hash, w.method, content_hash(w.method_config),
                             json.dumps(w.method_config, sort_keys=True), w.set_id, w.seed, w.block, float(w.norm),
                             [float(v) for v in w.direction], code_version, at]
        insert(con, "predicted_weight_changes", ("weight_change_id", "study_hash", "method", "config_hash",
                                                 "method_config", "set_id", "seed", "block", "norm", "direction",
                                                 "code_version", "registered_at"), list(rows.values()), conflict="")
        append(con, "predicted_weight_changes", list(rows))
    return len(rows)


def weight_change_sets(con: duckdb.DuckDBPyConnection, study_hash: str) -> set[str]:
    """The sets of a study with predicted weight changes: their runs measure θ_run − θ*."""
    return {s for (s,) in con.execute("SELECT DISTINCT set_id FROM predicted_weight_changes WHERE study_hash = ?",
                                      [study_hash]).fetchall()}


def save_models(con: duckdb.DuckDBPyConnection, models: Sequence[ModelRecord]) -> None:
    """Cache full-data parameters by (study hash, seed), with a supplied model's hash and distance; the chain
    holds the sha256 of the parameters. Parameters larger than `model_file_bytes()` are written first to a
    content-addressed file beside the ledger (store.model_files), and the row names it by `params_sha256` instead of
    holding a BLOB."""
    at, limit, folder = now(), model_file_bytes(), None
    rows = []
    for m in models:
        digest = None
        if len(m.params) > limit:
            folder = folder or models_folder(ledger_path(con))
            digest = write_model_file(folder, m.params)
        rows.append([m.study_hash, m.seed, None if digest else m.params, digest, at, m.supplied_sha256,
                     m.retrained_distance, m.retrained_relative_distance])
    with transaction(con):
        insert(con, "models", ("study_hash", "seed", "params", "params_sha256", "created_at", "supplied_sha256",
                               "retrained_distance", "retrained_relative_distance"), rows)
        append(con, "models", [f"{m.study_hash}/{m.seed}" for m in models])


def load_models(con: duckdb.DuckDBPyConnection, study_hash: str) -> dict[int, bytes | Path]:
    """seed -> the serialized parameters of its full-data model: the BLOB, or the path of its model file (read
    when the model is used, one at a time)."""
    rows = con.execute("SELECT seed, params, params_sha256 FROM models WHERE study_hash = ?", [study_hash]).fetchall()
    folder = models_folder(ledger_path(con)) if any(digest for _, _, digest in rows) else None
    return {int(s): model_file(folder, digest) if digest else bytes(b) for s, b, digest in rows}


def unreproduced_models(con: duckdb.DuckDBPyConnection, study: str | None = None) -> list[dict[str, Any]]:
    """The supplied models the recipe does not reproduce (`supplied_models` rows with `reproduced` false), of one
    study name or all, by study, hash and seed."""
    cols, rows = fetch(con, "SELECT study, study_hash, seed, retrained_relative_distance FROM supplied_models "
                            "WHERE NOT reproduced AND ($s IS NULL OR study = $s) ORDER BY ALL", {"s": study})
    return [dict(zip(cols, r)) for r in rows]


def method_configs(con: duckdb.DuckDBPyConnection, study_hash: str) -> list[tuple[str, dict[str, Any]]]:
    """(method, method_config) of every configuration with predictions of the study, by method."""
    rows = con.execute("SELECT method, any_value(method_config) FROM predictions WHERE study_hash = ? "
                       "GROUP BY method, config_hash ORDER BY ALL", [study_hash]).fetchall()
    return [(m, json.loads(c)) for m, c in rows]


def full_set_id(study_hash: str) -> str:
    return removal_set_id(study_hash, ())


def studies(con: duckdb.DuckDBPyConnection, name: str | None = None) -> list[dict[str, Any]]:
    """Registered studies (optionally one name), oldest first."""
    cols, rows = fetch(con, "SELECT study, study_hash, source, n_train, n_params, created_at, default_regimes, "
                            "config->'$.recipe' AS recipe FROM studies "
                            "WHERE $name IS NULL OR study = $name ORDER BY created_at", {"name": name})
    return [dict(zip(cols, r), recipe=json.loads(r[-1] or "{}")) for r in rows]


def removal_set_indices(con: duckdb.DuckDBPyConnection, set_ids: Sequence[str]
                        ) -> dict[str, tuple[tuple[int, ...], tuple[float, ...] | None]]:
    """set_id -> (indices, new labels): the labels of a relabel set, None for a removal set."""
    rows = con.execute("SELECT set_id, indices, new_labels FROM removal_sets WHERE list_contains($ids, set_id)",
                       {"ids": list(set_ids)}).fetchall()
    return {s: (tuple(i), None if v is None else tuple(v)) for s, i, v in rows}


INTERVAL_COLUMNS = ("study_hash", "method", "config_hash", "regime", "set_kind", "include_post_hoc", "converged_only",
                    "n", "replicates", "pearson_lo", "pearson_hi", "spearman_lo", "spearman_hi", "slope_lo", "slope_hi",
                    "lds_lo", "lds_hi", "nonfinite_replicates")


def save_calibration_intervals(con: duckdb.DuckDBPyConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the bootstrap intervals of each calibration group (derived data, recomputed by calibrate)."""
    at = now()
    with transaction(con):
        insert(con, "calibration_intervals", (*INTERVAL_COLUMNS, "computed_at"),
               [[r[c] for c in INTERVAL_COLUMNS] + [at] for r in rows],
                conflict="ON CONFLICT DO UPDATE SET n = excluded.n, replicates = excluded.replicates, "
                         + ", ".join(f"{c} = excluded.{c}" for c in INTERVAL_COLUMNS[9:])
                         + ", computed_at = excluded.computed_at")


def removal_set_ids(con: duckdb.DuckDBPyConnection, study_hash: str) -> set[str]:
    """The ids of every removal set of the study."""
    return {s for (s,) in con.execute("SELECT set_id FROM removal_sets WHERE study_hash = ?", [study_hash]).fetchall()}


def calibration_table(con: duckdb.DuckDBPyConnection, study: str | None, include_post_hoc: bool,
                      converged_only: bool = False) -> tuple[list[str], list[tuple]]:
    """The calibration table with its intervals (one study, or all), post-hoc predictions only when asked, and only
    the effects of converged runs with `converged_only`."""
    return fetch(con, "SELECT * FROM calibration_with_intervals($post, converged_only := $converged) "
                      "WHERE $s IS NULL OR study = $s",
                 {"s": study, "post": include_post_hoc, "converged": converged_only})


def register_self_influence(con: duckdb.DuckDBPyConnection, records: Sequence[SelfInfluenceRecord],
                            code_version: str) -> int:
    """Store per-point detection scores once per (study, method, config, seed): a rerun adds nothing. Returns how
    many models' scores were added."""
    at = now()
    with transaction(con):
        known = set(con.execute("SELECT DISTINCT study_hash, method, config_hash, seed FROM self_influence").fetchall())
        new = [r for r in records
               if (r.study_hash, r.method, content_hash(r.method_config), r.seed) not in known]
        insert(con, "self_influence", ("study_hash", "method", "config_hash", "method_config", "seed", "train_index",
                                       "score", "code_version", "registered_at"),
                [[r.study_hash, r.method, content_hash(r.method_config), json.dumps(r.method_config, sort_keys=True),
                  r.seed, j, float(v), code_version, at] for r in new for j, v in enumerate(r.scores)], conflict="")
        append(con, "self_influence", [f"{r.study_hash}/{r.method}/{content_hash(r.method_config)}/{r.seed}/{j}"
                                       for r in new for j in range(len(r.scores))])
    return len(new)


def detection_table(con: duckdb.DuckDBPyConnection, study: str | None) -> tuple[list[str], list[tuple]]:
    """The `detection` view (one study, or all)."""
    return fetch(con, "SELECT * FROM detection WHERE $s IS NULL OR study = $s", {"s": study})

def record_prediction_failures(con: duckdb.DuckDBPyConnection, failures: Sequence[PredictionFailureRecord],
                               code_version: str, invocation_id: str | None = None) -> int:
    """Record methods that failed on a study (once per study, method, config and reason); returns how many were
    new."""
    rows = {content_hash(f.study_hash, f.method, f.method_config, f.reason): f for f in failures}
    with transaction(con):
        known = {k for (k,) in con.execute("SELECT failure_id FROM prediction_failures").fetchall()}
        new = {k: f for k, f in rows.items() if k not in known}
        insert(con, "prediction_failures", ("failure_id", "study_hash", "method", "config_hash", "method_config",
                                            "reason", "code_version", "invocation_id", "failed_at"),
               [[k, f.study_hash, f.method, content_hash(f.method_config), json.dumps(f.method_config, sort_keys=True),
                 f.reason, code_version, invocation_id, now()] for k, f in new.items()])
        append(con, "prediction_failures", list(new))
    return len(new)


def last_prediction_seq(con: duckdb.DuckDBPyConnection) -> int:
    """The `seq` of the last registered prediction (0 when there is none)."""
    return int(con.execute("SELECT coalesce(max(seq), 0) FROM predictions").fetchone()[0])


def post_hoc_predictions(con: duckdb.DuckDBPyConnection, study: str | None = None, after_seq: int = 0
                         ) -> dict[str, int]:
    """Per method, how many predictions (after `after_seq` in the chain) are post hoc: registered after an
    outcome of what they predict existed, as the `post_hoc` column of `prediction_accuracy` decides."""
    rows = con.execute("SELECT method, count(DISTINCT seq) FROM prediction_accuracy WHERE post_hoc AND seq > $after "
                       "AND ($study IS NULL OR study = $study) GROUP BY method ORDER BY method",
                       {"after": after_seq, "study": study}).fetchall()
    return {m: int(n) for m, n in rows}
