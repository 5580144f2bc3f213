"""`ifledger`: parse arguments, call a flow or the ledger, print. Bad input: one line, exit code 2."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import store
from store import InputError

EXAMPLES = """\
examples:
  ifledger run linreg                         register, retrain, calibrate and report the ridge study
  ifledger run my_study.py:MyStudy            the same for a study you wrote (see README)
  ifledger register linreg --sets single:n=20 --sets user:path=sets.txt
  ifledger verify                             retrain whatever registered predictions still lack
  ifledger calibrate --format csv
  ifledger sql "SELECT method, regime, pearson, slope FROM calibration"
  ifledger audit                              exit 1, naming the row, if a prediction was altered

tables: studies, measurements, removal_sets, predictions, runs, outcomes, models
views:  seed_effects, effects, prediction_accuracy, noise_ceiling, calibration   (see store/SCHEMA.md)
sign convention: effect = measurement(without the set) - measurement(full data)
"""


def _format(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(columns, r)) for r in rows], indent=2, default=str)
    if fmt == "csv":
        out = _Lines()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(rows)
        return "".join(out.lines).rstrip("\n")
    from reports.render import format_value

    cells = [columns] + [[format_value(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n({len(rows)} row{'s' * (len(rows) != 1)})"


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, s: str) -> None:
        self.lines.append(s)


def _plan(args: argparse.Namespace):
    from flows.pipeline import plan

    return plan(args.study, args.methods, args.sets, getattr(args, "regimes", None))


def cmd_studies(args: argparse.Namespace) -> int:
    from retrain import builtin_studies

    print("built-in studies:")
    for name, cls in sorted(builtin_studies().items()):
        print(f"  {name:<16} {(cls.__doc__ or '').strip().splitlines()[0]}")
    if Path(args.db).exists():
        with store.read_only(args.db) as con:
            entries = store.studies(con)
        if entries:
            print(f"registered in {args.db}:")
            for e in entries:
                print(f"  {e['study']:<16} {e['study_hash']}  {e['n_train']} train, {e['n_params']} parameters"
                      f"  ({e['source']})")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from flows.pipeline import register_flow

    summary = register_flow(_plan(args), args.db)
    print(f"{summary.study} ({summary.study_hash}): {summary.predictions_added} new predictions over "
          f"{summary.sets} removal sets by {', '.join(summary.methods)}, registered in {args.db}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from flows.pipeline import verify_flow

    summary = verify_flow(args.db, args.study, args.regimes, args.chunk_size)
    _print_verify(summary)
    return 0


def _print_verify(summary) -> None:
    print(f"retrained {summary.done + summary.failed} models: {summary.done} done, {summary.failed} failed")
    for reason in sorted(set(summary.reasons))[:5]:
        print(f"  failed: {reason}")
    for note in summary.skipped:
        print(f"  skipped: {note}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from flows.pipeline import calibrate_flow

    columns, rows = calibrate_flow(args.db, args.study)
    print(_format(columns, rows, args.format))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import run_flow
    from reports.render import CALIBRATION_COLUMNS

    summary = run_flow(_plan(args), args.db, args.report_dir, args.chunk_size)
    print(f"registered {summary.register.predictions_added} new predictions "
          f"({summary.register.sets} removal sets, methods {', '.join(summary.register.methods)})")
    _print_verify(summary.verify)
    columns, rows = summary.calibration
    keep = [columns.index(c) for c in CALIBRATION_COLUMNS if c in columns]
    print(_format([columns[i] for i in keep], [tuple(r[i] for i in keep) for r in rows], "table"))
    print(f"ledger: {Path(args.db).resolve()}")
    print(f"report: {summary.report.resolve()}")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    columns, rows = store.user_query(args.db, args.query)
    print(_format(columns, rows, args.format))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with store.read_only(args.db) as con:
        problems = store.audit(con)
        (n,) = con.execute("SELECT count(*) FROM predictions").fetchone()
    if problems:
        for p in problems:
            print(f"ALTERED {p}", file=sys.stderr)
        print(f"audit failed: {len(problems)} problem(s) in {n} registered predictions", file=sys.stderr)
        return 1
    print(f"audit ok: {n} registered predictions, hash chain and removal-set ids intact")
    return 0


def _add_plan_options(p: argparse.ArgumentParser, regimes: bool) -> None:
    p.add_argument("study", help="a built-in study (see `ifledger studies`) or path/to/file.py:ClassName")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="estimators, optionally with options: exact, exact:damping=1e-3,models=1 "
                        "(default: the study's)")
    p.add_argument("--sets", action="append", metavar="SPEC",
                   help="removal sets, repeatable: single:n=100[,seed=0] | user:path=FILE "
                        "(one set per line, indices separated by spaces) (default: the study's)")
    if regimes:
        p.add_argument("--regimes", nargs="+", metavar="REGIME",
                       help="ground truths: scratch (retrain from the same init and order), warm (continue "
                            "the full model without the set), pbrf (proximal Bregman response) "
                            "(default: the study's)")


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", type=int, default=64, metavar="K",
                   help="models trained together by one task (default 64)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="ifledger",
        description="Register influence-function predictions before retraining, verify them by retraining, "
                    "and score them in SQL.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--db", default=os.environ.get("IFLEDGER_DB", "ifledger.duckdb"),
                      help="the ledger, a DuckDB file (default ./ifledger.duckdb, or $IFLEDGER_DB)")
    root.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="register, verify, calibrate and report one study",
                       description="register -> verify -> calibrate -> report. A rerun does only what is missing.")
    _add_plan_options(p, regimes=True)
    _add_verify_options(p)
    p.add_argument("--report-dir", default="ifledger-reports", metavar="DIR",
                   help="where reports go: DIR/<study>/report.md (default ./ifledger-reports)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("register", help="train full-data models and register predictions (no retraining)",
                       description="Predictions are frozen, hash-chained and timestamped before any retraining.")
    _add_plan_options(p, regimes=False)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("verify", help="retrain every pending (removal set, seed, regime)",
                       description="Pending work: removal sets with registered predictions and no finished run.")
    p.add_argument("study", nargs="?", help="only this study (default: all registered)")
    p.add_argument("--regimes", nargs="+", metavar="REGIME", help="default: each study's")
    _add_verify_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("calibrate", help="print the calibration table")
    p.add_argument("study", nargs="?", help="only this study")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("sql", help="run read-only SQL against the ledger",
                       description="Read-only and sandboxed: writes, ATTACH, COPY ... TO, INSTALL/LOAD and "
                                   "reading other files are refused.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", help='e.g. "SELECT * FROM calibration"')
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("audit", help="recompute the prediction hash chain; exit 1 naming any altered row")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("studies", help="list built-in and registered studies")
    p.set_defaults(func=cmd_studies)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return args.func(args)
    except InputError as e:
        print(f"ifledger: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
