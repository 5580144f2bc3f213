"""DuckDB ledger, split by concern: `connection` (open, lock, transactions), `ledger` (the records' tables),
`chain` (one hash chain of everything that decides a verdict), `anchor` (writable connections and the
receipts outside the file), `audit`, `queue` (verify's jobs and claims), `sandbox` (users' read-only SQL),
and `schema.sql` (tables and views). No torch here."""

from store.anchor import RECEIPTS_VARIABLE, connect, head_line, receipts_path
from store.audit import audit, schema_problems
from store.chain import KEY_VARIABLE, entry_counts, head, prediction_id, register_predictions
from store.connection import fetch, read_only
from store.ledger import (
    calibration_table,
    full_set_id,
    load_models,
    record_runs,
    register_removal_sets,
    register_study,
    removal_set_ids,
    removal_set_indices,
    save_calibration_intervals,
    save_models,
    studies,
)
from store.queue import (
    STALE_AFTER,
    failed_full_seeds,
    job_states,
    pending_jobs,
    process_start,
    regimes_run,
    start_runs,
    trainable_seeds,
)
from store.records import (
    InputError,
    ModelRecord,
    PredictionRecord,
    RemovalSetRecord,
    RunRecord,
    StudyRecord,
    removal_set_id,
    run_id,
)
from store.sandbox import user_query

__all__ = [
    "KEY_VARIABLE",
    "RECEIPTS_VARIABLE",
    "entry_counts",
    "head",
    "head_line",
    "receipts_path",
    "schema_problems",
    "STALE_AFTER",
    "InputError",
    "ModelRecord",
    "PredictionRecord",
    "RemovalSetRecord",
    "RunRecord",
    "StudyRecord",
    "audit",
    "calibration_table",
    "connect",
    "failed_full_seeds",
    "fetch",
    "full_set_id",
    "job_states",
    "load_models",
    "pending_jobs",
    "prediction_id",
    "process_start",
    "read_only",
    "record_runs",
    "regimes_run",
    "register_predictions",
    "register_removal_sets",
    "register_study",
    "removal_set_id",
    "removal_set_ids",
    "removal_set_indices",
    "run_id",
    "save_calibration_intervals",
    "save_models",
    "start_runs",
    "studies",
    "trainable_seeds",
    "user_query",
]
