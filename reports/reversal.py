"""The report's reversal section, drawn from the `reversal_test` view alone: its table, and reversal.png.

reversal.png: rows methods, columns regimes; on each panel the reverse effect against the forward effect of
removing an entity's sentences. Filled markers: the retrained (actual) effects with their 95% Student-t intervals
as bars; hollow markers: the method's predicted effects, joined to the actual point by a thin line; colour by
group (NameToDescription, Both), shape by template (trained, held-out). The grey band is seed noise on the reverse
axis (the median 95% half-width of the reverse effects on the panel); the dashed wedge |reverse| = 0.1·|forward| is
the registered prediction's boundary (inside: "the reverse does not move")."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reports.tables import markdown_table  # noqa: E402

COLUMNS = ("method", "regime", "template", "entity_group", "entity", "predicted_ratio", "forward_effect",
           "forward_lo", "forward_hi", "reverse_effect", "reverse_lo", "reverse_hi", "n_seeds", "p_value",
           "control_p_value", "held", "verdict")
GROUP_COLOURS = {"NameToDescription": "tab:blue", "Both": "tab:orange"}
TEMPLATE_MARKERS = {"trained": "o", "heldout": "s"}


def reversal_figure(rows: list[dict], path: Path) -> None:
    """Rows methods, columns regimes (module docstring)."""
    methods = sorted({r["method"] for r in rows})
    regimes = sorted({r["regime"] for r in rows})
    fig, axes = plt.subplots(len(methods), len(regimes), figsize=(4.4 * len(regimes) + 0.4, 3.4 * len(methods) + 1),
                             squeeze=False)
    for i, method in enumerate(methods):
        for j, regime in enumerate(regimes):
            ax = axes[i, j]
            mine = [r for r in rows if (r["method"], r["regime"]) == (method, regime)]
            if not mine:  # a scoped method is scored against its own frozen regime only (`predicts_regime`)
                ax.axis("off")
                continue
            halves = [(r["reverse_hi"] - r["reverse_lo"]) / 2 for r in mine if r["reverse_lo"] is not None]
            if halves:
                ax.axhspan(-float(np.median(halves)), float(np.median(halves)), color="grey", alpha=0.2, lw=0,
                           label="reverse seed noise (median 95% half-width)")
            for r in mine:
                colour = GROUP_COLOURS.get(r["entity_group"], "tab:gray")
                marker = TEMPLATE_MARKERS.get(r["template"], "^")
                x, y = r["forward_effect"], r["reverse_effect"]
                bars = {k: [[v - r[f"{k}_lo"]], [r[f"{k}_hi"] - v]] if r[f"{k}_lo"] is not None else None
                        for k, v in (("forward", x), ("reverse", y))}
                ax.errorbar(x, y, xerr=bars["forward"], yerr=bars["reverse"], fmt=marker, ms=4, color=colour,
                            elinewidth=0.6, alpha=0.8)
                ax.plot(r["predicted_forward"], r["predicted_reverse"], marker, ms=5, mfc="none", color=colour)
                ax.plot([x, r["predicted_forward"]], [y, r["predicted_reverse"]], color=colour, lw=0.4, alpha=0.5)
            edge = max(abs(v) for r in mine for v in (r["forward_effect"], r["predicted_forward"]))
            ax.plot([-edge, edge], [-0.1 * edge, 0.1 * edge], "k--", lw=0.6)
            ax.plot([-edge, edge], [0.1 * edge, -0.1 * edge], "k--", lw=0.6, label="|reverse| = 0.1·|forward|")
            ax.axhline(0, color="grey", lw=0.4)
            ax.axvline(0, color="grey", lw=0.4)
            judged = [r["held"] for r in mine if r["held"] is not None]
            ax.set_title(f"{method} · {regime}\nheld {sum(judged)} of {len(judged)} judged ({len(mine)} rows)",
                         fontsize=8)
            ax.set_xlabel("forward effect (log-odds)", fontsize=8)
            ax.set_ylabel("reverse effect (log-odds)", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], marker=m, ls="", color="black", label=f"{t} template")
               for t, m in TEMPLATE_MARKERS.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in GROUP_COLOURS.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", mfc="none", color="black", label="predicted (hollow)")]
    handles += axes[0, 0].get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 1.0 / fig.get_figheight(), 1, 1))  # an inch at the bottom for the legend
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reversal_section(rows: list[dict], folder: Path) -> list[str]:
    """The report's lines for the reversal test (none when the study has no `reversal_test` rows)."""
    if not rows:
        return []
    reversal_figure(rows, folder / "reversal.png")
    return ["## The reversal test", "",
            "Removing an entity's sentences: the actual effect on its forward and reverse log-odds (mean over paired "
            "seeds, 95% interval), the predicted |reverse| / |forward| ratio, the paired t test of \"reverse effect = "
            "0\" (`p_value`) and of the Both-directions control (`control_p_value`, the positive control), and whether "
            "the registered prediction held (ratio ≤ 0.1: the reverse stays within noise; larger: it moves). "
            "`verdict` says why a row is not judged. View `reversal_test` (store/SCHEMA.md).", "",
            markdown_table(list(COLUMNS), [tuple(r[c] for c in COLUMNS) for r in rows]), "",
            "![reverse against forward effect, predicted and actual, per method](reversal.png)", ""]
