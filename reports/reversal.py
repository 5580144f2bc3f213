"""The report's reversal section, drawn from the `reversal_ratios` view alone (its pooled rows are `reversal_verdict`,
its per-entity rows `reversal_test`): the pooled verdict table, one sentence per method, and reversal.png.

reversal.png: rows methods, columns (statistic, regime); on each panel, per entity and template, the method's
predicted ratio |reverse| / |forward| (x) against the retrained |mean reverse / mean forward| (y) with its folded
90% Fieller interval over seeds (log axes; an interval reaching below FLOOR is drawn to it, an unbounded one not at
all); colour by group (NameToDescription; Both, the positive controls), shape by template (trained, held-out); each
group's pooled row (the mean over entities) as a large outlined marker with its 90% interval over entities. Dashed:
the 0.1 boundaries (left of the vertical one the registered prediction says "the reverse does not move"; an interval
wholly below the horizontal one shows the reverse under a tenth of the forward effect); dotted: predicted = actual."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from reports.tables import format_value, markdown_table  # noqa: E402

COLUMNS = ("method", "regime", "statistic", "template", "entity_group", "n_entities", "n_seeds", "predicted_ratio",
           "actual_ratio", "ratio_lo", "ratio_hi", "signed_ratio", "signed_lo", "signed_hi", "forward_effect",
           "reverse_effect", "control_signed_lo", "held", "verdict")
GROUP_COLOURS = {"NameToDescription": "tab:blue", "Both": "tab:orange"}
TEMPLATE_MARKERS = {"trained": "o", "heldout": "s"}
BOUNDARY = 0.1
FLOOR = 1e-3


def reversal_figure(rows: list[dict], path: Path) -> None:
    """Rows methods, columns (statistic, regime) (module docstring)."""
    methods = sorted({r["method"] for r in rows})
    columns = sorted({(r["statistic"], r["regime"]) for r in rows})
    fig, axes = plt.subplots(len(methods), len(columns), figsize=(4.4 * len(columns) + 0.4, 3.6 * len(methods) + 1),
                             squeeze=False)
    for i, method in enumerate(methods):
        for j, (statistic, regime) in enumerate(columns):
            ax = axes[i, j]
            mine = [r for r in rows if (r["method"], r["statistic"], r["regime"]) == (method, statistic, regime)
                    and r["predicted_ratio"] and r["actual_ratio"] is not None]
            if not mine:  # a scoped method is scored against its own frozen regime only (`predicts_regime`)
                ax.axis("off")
                continue
            for r in mine:
                y = max(r["actual_ratio"], FLOOR)
                bars = ([[y - max(r["ratio_lo"], FLOOR)], [r["ratio_hi"] - y]]
                        if r["ratio_lo"] is not None and r["ratio_hi"] is not None else None)
                style = dict(ms=9, mfc="none", mew=1.6, elinewidth=1.6, zorder=3) if r["pooled"] else \
                    dict(ms=4, elinewidth=0.6, alpha=0.7)
                ax.errorbar(r["predicted_ratio"], y, yerr=bars,
                            fmt=TEMPLATE_MARKERS.get(r["template"], "^"),
                            color=GROUP_COLOURS.get(r["entity_group"], "tab:gray"), **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_minor_formatter(NullFormatter())
            ax.axvline(BOUNDARY, color="k", ls="--", lw=0.6)
            ax.axhline(BOUNDARY, color="k", ls="--", lw=0.6)
            predicted = [r["predicted_ratio"] for r in mine]
            low, high = min(predicted + [0.01]) / 2, max(predicted + [1.0]) * 2
            ax.plot([low, high], [low, high], "k:", lw=0.6)
            ax.set_xlim(low, high)
            pooled = [r for r in mine if r["pooled"] and r["entity_group"] != "Both"]
            judged = ", ".join(f"{r['template']}: {r['verdict'].split(':')[0]}" for r in pooled)
            ax.set_title(f"{method}\n{statistic} · {regime} · forward-only pooled: {judged}", fontsize=7)
            ax.set_xlabel("predicted |reverse| / |forward|", fontsize=8)
            ax.set_ylabel("actual |reverse / forward| (90%)", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], marker=m, ls="", color="black", label=f"{t} template")
               for t, m in TEMPLATE_MARKERS.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in GROUP_COLOURS.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", ms=9, mfc="none", color="black",
                           label="pooled over entities (large, hollow)"),
                plt.Line2D([], [], ls="--", color="black", lw=0.6, label=f"ratio {BOUNDARY}"),
                plt.Line2D([], [], ls=":", color="black", lw=0.6, label="predicted = actual")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict_sentence(row: dict, control: dict | None) -> str:
    """One sentence on a pooled forward-only row: the registered prediction, what retraining showed, the verdict."""
    said = ("no prediction" if row["predicted_ratio"] is None else
            "the reverse does not move" if row["predicted_ratio"] <= BOUNDARY else "the reverse moves")
    v = {k: format_value(row[k]) for k in ("actual_ratio", "ratio_lo", "ratio_hi", "signed_ratio", "signed_lo",
                                           "signed_hi")}
    interval = (f"|ratio| {v['actual_ratio']} [{v['ratio_lo']}, {v['ratio_hi']}], signed {v['signed_ratio']} "
                f"[{v['signed_lo']}, {v['signed_hi']}]")
    shown = (f"Both control signed {format_value(control['signed_ratio'])} [{format_value(control['signed_lo'])}, "
             f"{format_value(control['signed_hi'])}]" if control else "no Both control")
    outcome = {True: "held", False: "was refuted"}.get(row["held"], f"is not judged ({row['verdict']})")
    return (f"- `{row['method']}` ({row['statistic']}, {row['template']} template, {row['regime']}): predicted ratio "
            f"{format_value(row['predicted_ratio'])} ({said}); retraining measured {interval} over "
            f"{row['n_entities']} entities × {row['n_seeds']} seeds ({shown}): the registered prediction {outcome}.")


def reversal_section(rows: list[dict], folder: Path) -> list[str]:
    """The report's lines for the reversal test, from `reversal_ratios` rows (none when the study has none)."""
    if not rows:
        return []
    reversal_figure(rows, folder / "reversal.png")
    pooled = sorted((r for r in rows if r["pooled"]), key=lambda r: (r["method"], r["regime"], r["statistic"],
                                                                     r["template"], r["entity_group"] == "Both"))
    key = ("study_hash", "method", "config_hash", "regime", "statistic", "template")
    controls = {tuple(r[k] for k in key): r for r in pooled if r["entity_group"] == "Both"}
    sentences = [verdict_sentence(r, controls.get(tuple(r[k] for k in key)))
                 for r in pooled if r["entity_group"] != "Both"]
    return ["## The reversal test", "",
            "Removing an entity's sentences, pooled over each group's entities: each entity's ratio of its mean "
            "reverse to its mean forward effect over its seeds, pooled over entities as the mean of its absolute "
            "value with a 90% interval over entities [`ratio_lo`, `ratio_hi`] (ratio_hi < 0.1 is the one-sided test "
            "at 5% of |reverse| < 0.1 × |forward|; ratio_lo > 0.1 shows the reverse moving by more, in either "
            "direction, so opposite movements do not cancel) and signed with its 90% interval (a systematic "
            "movement), beside the method's mean predicted |reverse| / |forward|. The registered prediction (ratio "
            "≤ 0.1: the reverse does not move) holds when ratio_hi < 0.1; one above 0.1 holds when ratio_lo > 0.1; "
            "otherwise nothing is decided, and forward-only rows count only when their Both control's signed "
            "interval lies above 0.1 (`control_signed_lo`). Views "
            "`reversal_verdict` (pooled) and `reversal_test` (per entity), store/SCHEMA.md.", "",
            markdown_table(list(COLUMNS), [tuple(r[c] for c in COLUMNS) for r in pooled]), "", *sentences, "",
            "![predicted against actual ratio per entity, per method and statistic](reversal.png)", ""]
