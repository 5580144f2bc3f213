"""The bench table and figure: each method's scoring cost beside its calibration rows (read from the `calibration`
view, never recomputed): Pearson and Spearman with 95% intervals against each regime on the single-point sets with
the noise ceiling, and LDS with its interval on the random sets; ours first, then the peers, then failures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from reports.render import report_folder
from reports.tables import markdown_table


def _interval(lo: object, hi: object) -> str | None:
    return None if lo is None or hi is None else f"[{lo:.3g}, {hi:.3g}]"


def bench_rows(calibration: tuple[list[str], list[tuple]], methods: Sequence[str], peer: Mapping[str, bool],
               costs: Mapping[str, tuple[float, float]], failed: Mapping[str, str], regimes: Sequence[str]
               ) -> tuple[list[str], list[tuple]]:
    """One row per method: source (ours/peer), seconds and peak MiB of scoring, per regime Pearson and Spearman
    [95% interval] of the single-point sets and their noise ceiling, LDS [95% interval] of the random sets under
    the first regime, and status (`ok` or `failed: reason`). Ours first, then peers, then failures."""
    columns, rows = calibration
    found = {(r["method"], r["regime"], r["set_kind"]): r for r in (dict(zip(columns, row)) for row in rows)}
    header = ["method", "source", "seconds", "peak_mib"]
    for regime in regimes:
        header += [f"{regime}_pearson", f"{regime}_pearson_ci", f"{regime}_spearman", f"{regime}_spearman_ci",
                   f"{regime}_ceiling"]
    header += ["lds", "lds_ci", "status"]
    table = []
    for method in sorted(methods, key=lambda m: (m in failed, peer.get(m, False))):
        seconds, memory = costs.get(method, (None, None))
        row: list[object] = [method, "peer" if peer.get(method) else "ours", seconds, memory]
        for regime in regimes:
            c = found.get((method, regime, "single"), {})
            row += [c.get("pearson"), _interval(c.get("pearson_lo"), c.get("pearson_hi")), c.get("spearman"),
                    _interval(c.get("spearman_lo"), c.get("spearman_hi")), c.get("noise_ceiling")]
        lds = found.get((method, regimes[0], "random"), {}) if regimes else {}
        row += [lds.get("lds"), _interval(lds.get("lds_lo"), lds.get("lds_hi")),
                f"failed: {failed[method]}" if method in failed else "ok"]
        table.append(tuple(row))
    return header, table


def speed_notes(columns: list[str], rows: list[tuple]) -> list[str]:
    """The comparisons the issue asks for, each time with both LDS: every `exact` configuration against the fastest
    peer, every `lissa` against every dattri LiSSA, and the highest LDS of ours against the peers'."""
    by = {r[0]: dict(zip(columns, r)) for r in rows if r[columns.index("status")] == "ok"}
    peers = {m: r for m, r in by.items() if r["source"] == "peer" and r["seconds"]}
    ours = {m: r for m, r in by.items() if r["source"] == "ours" and r["seconds"]}

    def lds(method: str) -> str:
        value = by[method]["lds"]
        return "no LDS" if value is None else f"LDS {value:.3f}"

    def ratio(mine: str, theirs: str) -> str:
        return (f"{mine} scored in {ours[mine]['seconds'] / peers[theirs]['seconds']:.2f}x the time of {theirs} "
                f"({ours[mine]['seconds']:.2f} s against {peers[theirs]['seconds']:.2f} s; {lds(mine)} against "
                f"{lds(theirs)})")

    notes = []
    if peers:
        fastest = min(peers, key=lambda m: peers[m]["seconds"])
        notes += [ratio(m, fastest) + ", the fastest peer" for m in ours if m.split(":")[0] == "exact"]
        notes += [ratio(m, p) for m in ours if m.split(":")[0] == "lissa"
                  for p in peers if p.startswith("dattri:lissa")]
    scored = {m: r["lds"] for m, r in by.items() if r["lds"] is not None}
    best = {source: max((m for m in scored if by[m]["source"] == source), key=scored.get, default=None)
            for source in ("ours", "peer")}
    if best["ours"] and best["peer"]:
        notes.append(f"highest LDS of ours: {best['ours']} {scored[best['ours']]:.3f}; of the peers: {best['peer']} "
                     f"{scored[best['peer']]:.3f}")
    return notes


def _bench_figure(columns: list[str], rows: list[tuple], path: Path) -> bool:
    """LDS against seconds of scoring (log scale), one point per method, the Pareto front (no other method both
    faster and better) drawn as a step line. False when no method has both."""
    points = [(r[columns.index("seconds")], r[columns.index("lds")], r[0], r[1]) for r in rows
              if r[columns.index("seconds")] and r[columns.index("lds")] is not None
              and math.isfinite(r[columns.index("lds")])]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for seconds, lds, name, source in points:
        ax.scatter(seconds, lds, marker="o" if source == "ours" else "s", color="C0" if source == "ours" else "C1")
        ax.annotate(name, (seconds, lds), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front, best = [], -math.inf
    for seconds, lds, *_ in sorted(points):
        if lds > best:
            front.append((seconds, lds))
            best = lds
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", linestyle="--",
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("seconds to score all train x query pairs (log)")
    ax.set_ylabel("LDS (random sets)")
    ax.scatter([], [], marker="o", color="C0", label="ours")
    ax.scatter([], [], marker="s", color="C1", label="peer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_bench(db: str | Path, study: str, table: tuple[list[str], list[tuple]], out_dir: Path
                ) -> tuple[Path, Path | None]:
    """bench.md (the table and the speed ratios) and bench.png (LDS against seconds) in the study's report folder."""
    folder = report_folder(db, study, out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    columns, rows = table
    figure = folder / "bench.png"
    drawn = _bench_figure(columns, rows, figure)
    lines = [f"# bench: {study}", "", markdown_table(columns, rows), "", *(f"- {n}" for n in speed_notes(*table))]
    if drawn:
        lines += ["", "![LDS against seconds](bench.png)"]
    markdown = folder / "bench.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown, figure if drawn else None
