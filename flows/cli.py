"""`ifledger`: parse arguments, call a flow or the ledger, print. Bad input: one line, exit code 2.

Longer than ~300 lines on purpose: it is the one place where every command's arguments, help and printing live
(15 commands, each a `cmd_*` of a few lines and its sub-parser); it holds no maths, no SQL and imports torch and
Prefect only inside the commands that run flows, so that read-only commands start fast."""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import store
from store import InputError

EXAMPLES = """\
examples:
  ifledger run linreg                         register, retrain, calibrate and report the ridge study
  ifledger run my_study.py:MyStudy            the same for a study you wrote (see README)
  ifledger register linreg --sets single:n=20 --sets user:path=sets.txt
  ifledger register digits-mlp --sets random:alpha=0.5,k=50 --sets top_k:k=10,30,method=exact
  ifledger import-predictions scores.csv --study digits-mlp --method trak
  ifledger verify                             retrain whatever registered predictions still lack
  ifledger verify --runner process --workers 4   four chunks at once; a killed verify resumes where it was
  ifledger verify --runner pool --pool gpus --workers 2   chunks as flow runs on a Prefect work pool's workers
  ifledger status                             pending / running / done / failed per study and regime, with an ETA
  ifledger schedule verify --every 1h         serve verify as a Prefect deployment (see README)
  ifledger calibrate --format csv
  ifledger calibrate --compare exact,grad_dot   paired bootstrap: A better, B better, or not distinguishable
  ifledger sql "SELECT method, regime, pearson, slope FROM calibration"
  ifledger audit                              exit 1, naming what changed, if the ledger was altered
  ifledger head                               the chain head (seq and hash) to publish
  ifledger detect digits-mislabel --methods exact tracin loss random   mislabel detection: recall at p%, AUC
  ifledger bench digits-mlp                   ours and the peer libraries' methods side by side (make peers)
  ifledger export-model digits-mlp --seed 0 --output model.pt   a full-data model as a state_dict

tables: studies, measurements, removal_sets, predictions, runs, outcomes, models, chain, calibration_intervals,
        flipped_labels, self_influence, invocations, prediction_failures, predicted_weight_changes,
        run_weight_changes
views:  chain_positions, supplied_models, seed_effects, effects, prediction_accuracy, noise_ceiling, calibration,
        top_k_effects, brittleness, detection_by_seed, detection, reversal_ratios, reversal_test, reversal_verdict,
        weight_change_by_seed, weight_change (see store/SCHEMA.md)
sign convention: effect = measurement(without the set) - measurement(full data)
"""
STOPPING = ("Ctrl-C (exit 130) or SIGTERM (exit 143) stops it within seconds: its claimed runs are pending\n"
            "again at once, finished chunks are kept, and the next verify resumes.")  # lines for a raw description


def _print_table(columns: list[str], rows: list[tuple], fmt: str) -> None:
    """Print `rows` in `fmt`."""
    from reports.tables import formatted

    print(formatted(columns, rows, fmt))


def _plan(args: argparse.Namespace):
    """The validated plan of `register`/`run`'s options (before any flow starts)."""
    from flows.configs import RegisterConfig
    from flows.pipeline import plan

    config = RegisterConfig(args.db, args.study, tuple(args.methods or ()), tuple(args.sets or ()),
                            args.supplied_must_reproduce, args.weight_changes, _device(args))
    return plan(config, tuple(getattr(args, "regimes", None) or ()))


def _verify_config(args: argparse.Namespace, study: str | None = None):
    from flows.configs import VerifyConfig

    return VerifyConfig(args.db, study, tuple(args.regimes or ()), args.chunk_size,
                        getattr(args, "retry_failed", False), args.runner, args.workers, args.address, _device(args),
                        args.pool)


def _device(args: argparse.Namespace) -> str:
    """`--device` resolved (auto: cuda when torch sees a GPU), e.g. `cpu` or `cuda`; refused in one line when there
    is no such device. Stored resolved in the invocation, so the ledger says where its numbers were computed."""
    from retrain.study import resolve_device

    return str(resolve_device(getattr(args, "device", "cpu")))


def cmd_studies(args: argparse.Namespace) -> int:
    from retrain.studies import BUILTIN, builtin_docstring

    print("built-in studies:")
    for name in sorted(BUILTIN):
        lines = builtin_docstring(name).splitlines() or [""]
        print(f"  {name:<16} {lines[0]}")
        for line in lines[1:]:
            print(f"  {'':<16} {line}".rstrip())
    if Path(args.db).exists():
        from reports.tables import method_rows

        with store.read_only(args.db) as con:
            entries = [(e, store.method_configs(con, e["study_hash"])) for e in store.studies(con)]
        if entries:
            print(f"registered in {args.db}:")
        for e, configs in entries:
            wd, damping = e["recipe"].get("weight_decay"), e["recipe"].get("damping")
            print(f"  {e['study']:<16} {e['study_hash']}  {e['n_train']} train, {e['n_params']} parameters"
                  f"  ({e['source']})")
            if wd is not None and damping is not None:
                print(f"  {'':<16} recipe: weight_decay {wd:g}, damping λ {damping:g} (curvature shift wd + λ = "
                      f"{wd + damping:g})")
            for method, seeds, method_damping, shift in method_rows(configs, wd):
                print(f"  {'':<16} {method}: " + "; ".join(
                    ([f"seeds {seeds}"] if seeds else [])
                    + ([f"damping λ {method_damping:g}" + (f" (curvature shift wd + λ = {shift:g})"
                                                             if shift is not None else "")]
                       if method_damping is not None else [])))
    return 0


def _announce(summary) -> None:
    """Lines after a registration: methods that failed (and the ranked sets not built for want of their scores),
    supplied models the recipe does not reproduce, post-hoc predictions."""
    from reports.tables import unreproduced_line

    for method, reason in summary.failed.items():
        print(f"{method} failed, no predictions registered (see prediction_failures): {reason}")
    for spec in summary.unranked:
        print(f"{spec}: not built, its ranking method failed")
    if summary.unreproduced:
        print(f"{summary.study}: {unreproduced_line(summary.unreproduced)}")
    for method, seeds in summary.other_seeds.items():
        print(f"{method} averages the full-data models of seeds {', '.join(map(str, seeds))} (a seed it would "
              f"average has none); registered with models={len(seeds)}, seeds={seeds}")
    if summary.post_hoc:
        print(f"{summary.post_hoc:,} predictions registered after their outcomes exist: post hoc, excluded from "
              "calibration unless --include-post-hoc")


def _notes(fmt: str):
    """Where lines beside a result go: under a table on stdout; on stderr for csv/json/parquet, so that the
    output stays machine-readable."""
    return sys.stdout if fmt == "table" else sys.stderr


def _post_hoc_footnote(db: str, study: str | None, fmt: str) -> None:
    """Under a table that leaves post-hoc predictions out: how many, of which methods (stderr unless a table)."""
    if not Path(db).exists():
        return
    with store.read_only(db, sandbox=False) as con:
        left_out = store.post_hoc_predictions(con, study)
    if left_out:
        which = ", ".join(f"{n:,} of {m}" for m, n in left_out.items())
        print(f"left out: {sum(left_out.values()):,} post-hoc predictions ({which}), registered after their "
              "outcomes existed; --include-post-hoc scores them", file=_notes(fmt))


def cmd_register(args: argparse.Namespace) -> int:
    from flows.pipeline import register_flow

    summary = register_flow(_plan(args))
    print(f"{summary.study} ({summary.study_hash}): {summary.predictions_added} new predictions over "
          f"{summary.sets} removal sets by {', '.join(summary.methods)}, registered in {args.db} (made with "
          f"{summary.full_models} full-data models)")
    _announce(summary)
    _print_head(args.db)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from flows.pipeline import verify_flow
    from flows.runner import interruptible

    with interruptible(args.db):
        summary = verify_flow(_verify_config(args, args.study))
    _print_verify(summary)
    _print_head(args.db)
    return 0


def _print_verify(summary) -> None:
    print(f"retrained {summary.done + summary.failed} models: {summary.done} done, {summary.failed} failed")
    for reason in sorted(set(summary.reasons))[:5]:
        print(f"  failed: {reason}")
    for note in summary.skipped:
        print(f"  skipped: {note}")
    if summary.elsewhere:
        print(f"  {summary.elsewhere} of the models pending when this verify started were trained or claimed "
              "meanwhile by another verify (whose own count also includes any it finished before this one started)")


def cmd_schedule(args: argparse.Namespace) -> int:
    from prefect import serve

    from flows.schedule import verify_deployment

    deployment = verify_deployment(args.name, _verify_config(args, args.study), args.every, args.cron)
    print(f"serving deployment verify/{args.name} ({'every ' + args.every if args.every else 'cron ' + args.cron})"
          f" on {deployment.parameters['config']['db']}; stop with Ctrl-C")
    serve(deployment, print_starting_message=False)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows.status import unreproduced_notes, verify_status

    _print_table(*verify_status(args.db, args.study), args.format)
    for line in unreproduced_notes(args.db, args.study):
        print(line, file=_notes(args.format))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from flows.pipeline import calibrate_flow, compare_flow

    if args.compare:
        a, _, b = args.compare.partition(",")
        if not a or not b or "," in b:
            raise InputError(f"--compare takes two methods separated by a comma (e.g. exact,grad_dot), "
                             f"not {args.compare!r}")
        columns, rows = compare_flow(args.db, a, b, args.study, args.include_post_hoc, args.converged_only)
    else:
        columns, rows = calibrate_flow(args.db, args.study, args.include_post_hoc, args.converged_only)
        columns, rows = _calibration_columns(columns, rows, args.columns, args.format)
    _print_table(columns, rows, args.format)
    if not args.include_post_hoc:
        _post_hoc_footnote(args.db, args.study, args.format)
    _print_head(args.db, args.format)
    return 0


def _calibration_columns(columns: list[str], rows: list[tuple], wanted: str | None, fmt: str
                         ) -> tuple[list[str], list[tuple]]:
    """`--columns all` (the default for csv and json), a comma list, or (tables) what fits the terminal."""
    from reports.tables import CALIBRATION_COLUMNS, fitting_columns, select

    if wanted == "all" or (wanted is None and fmt != "table"):
        return columns, rows
    if wanted:
        keep = [c.strip() for c in wanted.split(",") if c.strip()]
        unknown = [c for c in keep if c not in columns]
        if unknown:
            raise InputError(f"--columns: unknown column {unknown[0]!r}; choose from {', '.join(columns)} or all")
        return select(columns, rows, keep)
    return select(columns, rows, fitting_columns(columns, rows, CALIBRATION_COLUMNS,
                                                 shutil.get_terminal_size((120, 24)).columns))


def cmd_import(args: argparse.Namespace) -> int:
    from flows.configs import ImportConfig
    from flows.pipeline import import_flow, read_predictions

    study, sets, records = read_predictions(args.db, args.study, args.file, args.method)
    summary = import_flow(ImportConfig(args.db, args.study, args.file, args.method), study, sets, records)
    print(f"{summary.study}: {summary.predictions_added} new predictions of {summary.methods[0]} over "
          f"{summary.sets} removal sets, registered in {args.db}; `ifledger verify` retrains what they need")
    _announce(summary)
    _print_head(args.db)
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from flows.pipeline import detect_flow, detect_plan

    columns, rows = detect_flow(*detect_plan(args.study, args.methods, _device(args)), args.db)
    _print_table(columns, rows, args.format)
    if not rows:
        print(f"{args.study} has no known flipped labels: scores stored in `self_influence`, nothing to score them "
              "against", file=sys.stderr)
    _print_head(args.db, args.format)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.configs import RunConfig
    from flows.pipeline import run_flow
    from flows.runner import interruptible

    request = _plan(args)
    with interruptible(args.db):
        summary = run_flow(RunConfig(request.config, _verify_config(args), args.report_dir), request)
    print(f"registered {summary.register.predictions_added} new predictions "
          f"({summary.register.sets} removal sets, methods {', '.join(summary.register.methods)}) "
          f"from {summary.register.full_models} full-data models")
    _announce(summary.register)
    _print_verify(summary.verify)
    _print_table(*_calibration_columns(*summary.calibration, None, "table"), "table")
    _post_hoc_footnote(args.db, summary.register.study, "table")
    print(f"ledger: {Path(args.db).resolve()}")
    print(f"report: {summary.report.resolve()}")
    _print_head(args.db)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from flows.bench import bench_flow
    from flows.configs import BenchConfig, RegisterConfig
    from flows.runner import interruptible
    from reports.bench import speed_notes

    config = BenchConfig(RegisterConfig(args.db, args.study, tuple(args.methods or ()), tuple(args.sets or ())),
                         _verify_config(args, args.study), args.report_dir)
    with interruptible(args.db):
        summary = bench_flow(config)
    _print_verify(summary.verify)
    _print_table(*summary.table, "table")
    for note in speed_notes(*summary.table):
        print(note)
    print("seconds and peak_mib: scoring every train x query pair (and set) on this machine, the computation alone "
          "(not the Prefect task around it); peak_mib is the process's resident memory above its start, sampled "
          "every 10 ms")
    print(f"table: {summary.markdown.resolve()}" + (f"\nfigure: {summary.figure.resolve()}" if summary.figure else ""))
    _print_head(args.db)
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from flows.export import export_model

    print(export_model(args.db, args.study, args.seed, args.output, args.set, args.regime, args.force))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reports.render import write_report

    with store.read_only(args.db, sandbox=False) as con:
        names = list(dict.fromkeys(e["study"] for e in store.studies(con, args.study)))
    if not names:
        raise InputError(f"study {args.study!r} has nothing registered in {args.db}" if args.study
                         else f"no study is registered in {args.db}")
    for name in names:
        print(f"report: {write_report(args.db, name, Path(args.report_dir), args.converged_only).resolve()}")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    if args.format == "parquet" and not args.output:
        raise InputError("--format parquet writes a file: add --output FILE.parquet")
    if not args.output:
        _print_table(*store.user_query(args.db, args.query, args.timeout, args.memory), args.format)
        return 0
    path = _output_path(Path(args.output), args.db, args.force)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:  # streamed to a partial file, renamed onto the output only once the whole result is there
        with store.query_batches(args.db, args.query, args.timeout, args.memory, arrow=args.format == "parquet"
                                 ) as (columns, batches):
            n = _write_batches(columns, batches, args.format, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {n} row{'s' * (n != 1)} to {args.output}", file=sys.stderr)
    return 0


def _output_path(path: Path, db: str, force: bool) -> Path:
    """`--output` once checked: a file in an existing folder, never the ledger, its write-ahead log or its receipts,
    and not an existing file unless `force`."""
    if path.is_dir() or not path.parent.is_dir():
        raise InputError(f"--output {path}: give a file in an existing folder")
    for kept, what in ((Path(db), "the ledger"), (Path(f"{db}.wal"), "the ledger's write-ahead log"),
                       (store.receipts_path(db), "the ledger's receipts")):
        if path.resolve() == kept.resolve() or path.exists() and kept.exists() and path.samefile(kept):
            raise InputError(f"--output {path} is {what}: refusing to overwrite it (even with --force); give "
                             "another file")
    if path.exists() and not force:
        raise InputError(f"--output {path} exists: give a new file, or add --force to replace it")
    return path


def _write_batches(columns: list[str], batches: Iterator, fmt: str, path: Path) -> int:
    """Write a query's batches to `path` as they come (csv, parquet) or once all are read (table, json: a
    document of its own); returns how many rows were written."""
    n = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = None
        try:
            for batch in batches:
                writer = writer or pq.ParquetWriter(path, batch.schema)
                writer.write_batch(batch)
                n += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            import pyarrow as pa

            pq.write_table(pa.table({c: [] for c in columns}), path)
        return n
    if fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            for batch in batches:
                writer.writerows(batch)
                n += len(batch)
        return n
    from reports.tables import formatted

    rows = [row for batch in batches for row in batch]
    path.write_text(formatted(columns, rows, fmt) + "\n")
    return len(rows)


def cmd_audit(args: argparse.Namespace) -> int:
    receipts = store.receipts_path(args.db)
    heads = store.published_heads(args.head or [], [Path(f) for f in args.heads or []])
    with store.read_only(args.db) as con:
        problems = store.audit(con, receipts, heads)
        counts = store.entry_counts(con)
    if problems:
        for p in problems:
            print(f"ALTERED {p}", file=sys.stderr)
        print(f"audit failed: {len(problems)} problem(s) in {sum(counts.values())} chain entries", file=sys.stderr)
        return 1
    print(f"audit ok: {sum(counts.values())} chain entries ({', '.join(f'{n} {t}' for t, n in counts.items())}) "
          f"match the ledger's rows, their history, every receipt in {receipts}"
          f"{f' and {len(heads)} published head' + 's' * (len(heads) != 1) if heads else ''}; the schema is the "
          "shipped one")
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    with store.read_only(args.db) as con:
        print(store.head_line(con))
    return 0


def _print_head(db: str, fmt: str = "table") -> None:
    """After a writing command: the chain head, as appended to the receipts (stderr unless a table, so that CSV
    and JSON output stay machine-readable)."""
    with store.read_only(db) as con:
        print(f"{store.head_line(con)} (receipts: {store.receipts_path(db)})",
              file=_notes(fmt))


def plan_options() -> str:
    """The methods, set kinds and regimes with every option's meaning and default, generated from their
    options dataclasses (the README's list is this text; a test keeps them equal)."""
    from predictions import KINDS, METHODS
    from predictions.peers import peer_methods
    from retrain.options import help_text
    from retrain.regimes import REGIMES

    return help_text([
        ("methods (--methods NAME:key=value,...; named by the options that differ from the study's defaults):",
         METHODS),
        ("set kinds, removal or relabel (--sets KIND:key=value,...; a bare value after a list option extends it: "
         "k=10,30):", KINDS),
        ("regimes (--regimes NAME):", REGIMES),
    ], f"peer libraries (make peers; see README): {', '.join(peer_methods())}[:key=value,...]\n"
       "your own: path/to/file.py:ClassName[:key=value,...], a subclass of predictions.Method,\n"
       "  predictions.ModificationKind or retrain.regimes.Regime (see README)")


def _add_plan_options(p: argparse.ArgumentParser, regimes: bool) -> None:
    p.add_argument("study", help="a built-in study (see `ifledger studies`) or path/to/file.py:ClassName")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="estimators with options, e.g. exact cg:iterations=50 exact:models=1 (default: the study's;"
                        " all listed below)")
    p.add_argument("--sets", action="append", metavar="SPEC",
                   help="removal or relabel sets, one spec per --sets, repeated for more, e.g. --sets single:n=100 "
                        "--sets random:alpha=0.5,k=50 (default: the study's; all kinds listed below)")
    p.add_argument("--weight-changes", action="store_true",
                   help="also register each method's predicted weight change Δθ̂ per set, seed model and parameter "
                        "block; retraining then measures θ_run − θ* (view weight_change)")
    if regimes:
        p.add_argument("--regimes", nargs="+", metavar="REGIME",
                       help="ground truths, e.g. scratch warm pbrf (default: the study's; listed below)")
    p.add_argument("--supplied-must-reproduce", action="store_true",
                   help="refuse (exit 2, nothing written) a study whose supplied model the recipe does not reproduce "
                        "(relative distance to its retraining above 1e-6; without this option it is announced, and "
                        "its scratch effects are marked `other_model`)")
    p.epilog_factory = plan_options  # computed when the help is shown: it imports torch
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where models are trained, measured and scored: auto (cuda when torch sees a GPU, else cpu), "
                        "cpu, cuda or cuda:N (default auto); recorded with the invocation, not part of the study hash")


def _add_report_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-dir", default="ifledger-reports", metavar="DIR",
                   help="where reports go: DIR/<ledger>-<path hash>/<study>/report.md, so that two ledgers keep "
                        "their own (default ./ifledger-reports)")


def _add_converged_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--converged-only", action="store_true",
                   help="score only runs whose optimisation converged (pbrf: came to rest before `pbrf_steps`): a "
                        "paired effect keeps the seeds whose run and full-data run both converged; `n_converged` of "
                        "`n_runs` says how many those are")


def _add_format(p: argparse.ArgumentParser, export: bool = False) -> None:
    p.add_argument("--format", choices=("table", "csv", "json", "parquet") if export else ("table", "csv", "json"),
                   default="table", help="aligned text (default), CSV, or a JSON list of objects"
                   + (", or Parquet (with --output)" if export else ""))
    if export:
        p.add_argument("--output", metavar="FILE", help="write the result to FILE instead of printing it")


def _add_queue_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", help="only this study (default: all registered)")
    p.add_argument("--regimes", nargs="+", metavar="REGIME", help="default: each study's")
    p.add_argument("--retry-failed", action="store_true",
                   help="retrain failed runs too (they are deterministic, so by default they are not retried)")


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", type=int, default=64, metavar="K",
                   help="models trained together by one task (default 64; 1 for the scratch and warm runs of a "
                        "study with its own trainer, which trains one model per job)")
    p.add_argument("--runner", choices=("thread", "process", "dask", "pool"), default="thread",
                   help="where tasks run: thread (one at a time, in this process), process (a pool of "
                        "--workers processes), dask (a local Dask cluster, or the scheduler at --address) or pool "
                        "(flow runs on the Prefect work pool --pool, whose workers reach the ledger's folder)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="tasks at once for process/dask/pool (default: the number of cores); each uses cores/N "
                        "threads (on a pool: its machine's share)")
    p.add_argument("--address", metavar="URL", help="an existing Dask scheduler, e.g. tcp://host:8786 (--runner dask)")
    p.add_argument("--pool", metavar="NAME",
                   help="a Prefect work pool of type process (--runner pool; needs PREFECT_API_URL), e.g. one "
                        "worker per GPU: CUDA_VISIBLE_DEVICES=1 prefect worker start --pool NAME --limit 1")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ifledger")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose epilog can be computed only when its help is shown (so that building the parser
    for `ifledger status` imports neither torch nor the plug-ins)."""

    epilog_factory = None

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def parser() -> argparse.ArgumentParser:
    root = _Parser(
        prog="ifledger",
        description="Register influence-function predictions before retraining, verify them by retraining, "
                    "and score them in SQL.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--db", default=os.environ.get("IFLEDGER_DB", "ifledger.duckdb"),
                      help="the ledger, a DuckDB file (default ./ifledger.duckdb, or $IFLEDGER_DB)")
    root.add_argument("--receipts", metavar="PATH",
                      help="where writing commands append the chain head and where audit reads it "
                           "(default: the ledger's path plus .receipts, or $IFLEDGER_RECEIPTS)")
    root.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    root.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND",
                              help="`ifledger COMMAND --help` describes each")

    p = sub.add_parser("run", help="register, verify, calibrate and report one study",
                       description="register -> verify -> calibrate -> report. A rerun does only what is missing.\n"
                                   + STOPPING)
    _add_plan_options(p, regimes=True)
    _add_verify_options(p)
    _add_device(p)
    _add_report_dir(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("register", help="train full-data models and register predictions (no retraining)",
                       description="Predictions are frozen, hash-chained and timestamped before any retraining.")
    _add_plan_options(p, regimes=False)
    _add_device(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("verify", help="retrain every pending (removal set, seed, regime)",
                       description="Pending work: removal sets with registered predictions and no finished run. "
                                   + STOPPING)
    _add_queue_options(p)
    _add_verify_options(p)
    _add_device(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("schedule", help="serve `verify` as a Prefect deployment on a schedule",
                       description="Runs until stopped: every --every (or on --cron) it verifies whatever is "
                                   "pending. Set PREFECT_API_URL to a running Prefect server (`prefect server start`) "
                                   "to see and trigger its runs in the Prefect UI.")
    p.add_argument("flow", choices=("verify",), help="the flow to schedule")
    _add_queue_options(p)
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", metavar="INTERVAL", help="e.g. 30m, 1h, 1d")
    when.add_argument("--cron", metavar="EXPR", help='e.g. "0 * * * *" (hourly)')
    p.add_argument("--name", default="ifledger-verify", help="the deployment's name (default ifledger-verify)")
    _add_verify_options(p)
    _add_device(p)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("status", help="pending, running, done and failed runs per study and regime, with an ETA",
                       description="A `running` run whose process died (or that is older than 12 hours) counts "
                                   "as pending: the next verify redoes it.")
    p.add_argument("study", nargs="?", help="only this study")
    _add_format(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("calibrate", help="bootstrap intervals, then print the calibration table",
                       description="Pearson, Spearman, slope and (random sets) LDS with bootstrap 95% intervals "
                                   "(removal sets and measurements resampled), next to the seed-noise ceiling.")
    p.add_argument("study", nargs="?", help="only this study")
    _add_format(p)
    p.add_argument("--include-post-hoc", action="store_true",
                   help="also score predictions registered after their outcomes existed (left out by default)")
    p.add_argument("--columns", metavar="LIST",
                   help="all, or a comma list of columns (default: for a table, the main columns that fit the "
                        "terminal; for csv and json, all)")
    _add_converged_only(p)
    p.add_argument("--compare", metavar="A,B",
                   help="is method A better than B? paired bootstrap over sets and measurements; says "
                        "'not distinguishable' when the interval of the difference covers 0")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("import-predictions", help="register predictions made by another library",
                       description="CSV or Parquet with columns measurement_id, predicted, and set_id (an existing "
                                   "removal set) or indices (training indices; space-separated in CSV). Registered as "
                                   "method imported:NAME and verified and scored like ours. A bad row refuses the "
                                   "whole file, naming its line.")
    p.add_argument("file", help="the predictions: a .csv or .parquet file")
    p.add_argument("--study", required=True, help="the study whose training indices and measurements the file uses")
    p.add_argument("--method", required=True, help="a name for the method, e.g. kronfluence-ekfac")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("detect", help="score every training point for mislabel detection, then print `detection`",
                       description="Self-influence of every training point on each full-data model (exact, "
                                   "grad_dot, tracin) beside the training-loss and random baselines, stored in "
                                   "`self_influence`; the `detection` view scores them against the study's known "
                                   "flipped labels: recall at 5/10/20/30% inspected and AUC, with 95% intervals "
                                   "over seeds.")
    p.add_argument("study", help="e.g. digits-mislabel or digits-mislabel-memorise")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="default: every one of exact, grad_dot, tracin (TracIn over the checkpoints after every "
                        "max(1, epochs // 20)-th epoch, which it retrains; not for a study that supplies its models), "
                        "loss, random that can score the study")
    _add_device(p)
    _add_format(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("sql", help="run read-only SQL against the ledger",
                       description="Read-only and sandboxed: writes, ATTACH, COPY ... TO, INSTALL/LOAD, reading "
                                   "other files and several statements at once are refused; a query over its time "
                                   "or memory limit (its result's size included) is stopped (exit 2). It answers "
                                   "only while the ledger's schema is the one ifledger ships. --output streams the "
                                   "result to a new file (never onto the ledger or its receipts).", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", help='one statement, e.g. "SELECT * FROM calibration"')
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="stop a query that runs longer (default 60)")
    p.add_argument("--memory", default="2GB", metavar="SIZE",
                   help="stop a query that needs more memory, or whose result is larger; nothing spills to disk "
                        "(default 2GB)")
    _add_format(p, export=True)
    p.add_argument("--force", action="store_true",
                   help="let --output replace an existing file (never the ledger, its log or its receipts)")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("audit", help="check the ledger against its hash chain and receipts; exit 1 naming what changed",
                       description="Recomputes every chain entry (studies, measurements, removal sets, predictions, "
                                   "finished runs with their outcomes, model hashes), checks each row's history "
                                   "(a prediction or an outcome never changes; runs move failed -> retry -> done), "
                                   "compares each row with its latest entry, checks every model file beside the "
                                   "ledger (<ledger>.models/) against the sha256 that names it, checks the chain "
                                   "against every receipt "
                                   "in the receipts file and every head you published (--head, --heads), and every "
                                   "schema object (tables with their keys, views, macros) against the ones "
                                   "ifledger ships. With IFLEDGER_KEY set, entries are HMACs under that key.")
    p.add_argument("--head", action="append", metavar="SEQ:HASH",
                   help="a head you published (`ifledger head` prints it); catches a rewrite or a rollback of both "
                        "the ledger and its receipts; repeatable")
    p.add_argument("--heads", action="append", metavar="FILE",
                   help="a file of published heads, one a line (SEQ:HASH or a line `ifledger head` printed)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("head", help="print the chain head (seq and hash) to publish it",
                       description="One line: the chain's last seq and its hash, the same line writing commands "
                                   "append to the receipts file. Publish it (a paper, a commit, a preregistration): "
                                   "any later rewrite or rollback of what it covers is caught by "
                                   "`ifledger audit --head SEQ:HASH`.")
    p.set_defaults(func=cmd_head)

    p = sub.add_parser("report", help="re-render the report of every registered study (or one) from the ledger",
                       description="The calibration table and figures (predicted against actual per method and "
                                   "regime, top-k against random sets of the same sizes, LDS with intervals), from "
                                   "what the ledger holds; run `ifledger calibrate` first to refresh the intervals.")
    p.add_argument("study", nargs="?", help="only this study")
    _add_report_dir(p)
    _add_converged_only(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="every method, ours and the peer libraries', side by side on one study",
                       description="register -> verify -> calibrate with every built-in method and every installed "
                                   "peer (kronfluence:..., dattri:..., traker; `make peers` installs them), each "
                                   "from one model (models=1), and exact from all seeds, unless --methods, on the "
                                   "same full-data models, sets and retrains; then one table: seconds and peak "
                                   "memory of scoring, Pearson and Spearman against each regime with 95% intervals "
                                   "and the noise ceiling, LDS with its interval; ours first, then peers, then "
                                   "failures with their reasons (also in the `prediction_failures` table). Writes "
                                   "bench.md and bench.png (LDS against seconds) in the study's report folder.\n"
                                   + STOPPING)
    _add_plan_options(p, regimes=True)
    _add_verify_options(p)
    _add_report_dir(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export-model", help="write a model of a study as a state_dict file",
                       description="The full-data model of --seed from the ledger, or with --set and --regime that "
                                   "model retrained without the set (deterministic: the model verify trains), as a "
                                   "torch state_dict that study.model().load_state_dict or any library loads.")
    p.add_argument("study", help="a built-in study or path/to/file.py:ClassName, registered in the ledger")
    p.add_argument("--seed", type=int, required=True, help="which seed's model")
    p.add_argument("--set", metavar="SET_ID", help="a removal set id (see `ifledger sql \"FROM removal_sets\"`)")
    p.add_argument("--regime", metavar="REGIME", help="how the set's model is retrained, e.g. scratch, warm, pbrf")
    p.add_argument("--output", required=True, metavar="FILE", help="the .pt file to write")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("studies", help="list built-in and registered studies",
                       description="Built-in studies with their full descriptions, then the studies registered in "
                                   "the ledger (hash, size, source).")
    p.set_defaults(func=cmd_studies)
    return root


FLOW_COMMANDS = (cmd_run, cmd_register, cmd_verify, cmd_schedule, cmd_calibrate, cmd_import,
                 cmd_bench)  # need a Prefect API


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    before = os.environ.get(store.RECEIPTS_VARIABLE)
    if args.receipts:  # for this command only (and the workers it starts), not for a later `main` in the process
        os.environ[store.RECEIPTS_VARIABLE] = args.receipts
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
        for logger in ("FLOW_RUNS", "TASK_RUNS"):  # a failed flow or task: the one line that ends the command says why
            os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_PREFECT_{logger}_LEVEL", "CRITICAL")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the dask runner's cluster
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        store.model_file_bytes()  # a bad IFLEDGER_MODEL_FILE_BYTES is refused before anything is written
        if args.func is not cmd_audit and getattr(args, "db", None) and store.bring_up_to_date(args.db):
            print(f"ifledger: {args.db} was written by an older ifledger: its schema is now the shipped one (no "
                  "chained row changed)", file=sys.stderr)
        if args.func in (cmd_report, cmd_calibrate) and Path(args.db).is_file():  # they read through the views
            with store.read_only(args.db) as con:
                store.refuse_swapped_schema(con)
        if args.func not in FLOW_COMMANDS:
            return args.func(args)
        from flows.cores import computing, threads_for
        from flows.server import prefect_api

        threads_for()  # a bad IFLEDGER_THREADS is refused before anything is written
        if getattr(args, "runner", None) == "pool":  # refused before a temporary server (no use to workers) starts
            from flows.runner import shared_api

            shared_api()
        with computing(), prefect_api():
            return args.func(args)
    except InputError as e:
        print(f"ifledger: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`ifledger sql ... | head`): stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit does not raise again
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    finally:
        if before is None:
            os.environ.pop(store.RECEIPTS_VARIABLE, None)
        else:
            os.environ[store.RECEIPTS_VARIABLE] = before


if __name__ == "__main__":
    sys.exit(main())
