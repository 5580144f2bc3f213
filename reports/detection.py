"""The report's mislabel-detection section, drawn from the `detection` view alone: its table, detection.png
(recall of the flipped labels against the fraction of training points inspected, one line per method, 95%
intervals over seeds as bands, and the best possible recall), and a plain statement of each method that does not
beat the training-loss baseline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reports.tables import markdown_table  # noqa: E402


def detection_figure(rows: list[dict], path: Path) -> None:
    """Recall of flipped points against the inspected fraction, one line per method, 95% intervals as bands."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, method in enumerate(sorted({r["method"] for r in rows})):
        mine = sorted((r["inspected_fraction"], r["recall"], r["recall_lo"], r["recall_hi"]) for r in rows
                      if r["method"] == method)
        p, recall, lo, hi = (np.array(c, dtype=float) for c in zip(*mine))
        style = {"loss": {"color": "black", "ls": "--"}, "random": {"color": "grey", "ls": ":"}}.get(
            method, {"color": f"C{i}"})
        ax.plot(p, recall, "o", ms=3.5, label=method, **({"ls": "-"} | style))
        if not np.isnan(lo).all():
            ax.fill_between(p, lo, hi, alpha=0.15, color=style["color"])
    edge, flipped_share = max(r["inspected_fraction"] for r in rows), rows[0]["n_flipped"] / rows[0]["n_train"]
    ax.plot([0, min(flipped_share, edge), edge], [0, min(edge / flipped_share, 1), min(edge / flipped_share, 1)],
            color="black", lw=0.5, label="every inspected point flipped (best possible)")
    ax.set_xlabel("fraction of training points inspected (highest scores first)", fontsize=8)
    ax.set_ylabel("recall of flipped labels (mean over seeds, 95% interval)", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def detection_section(rows: list[dict], folder: Path) -> list[str]:
    """The detection table, figure and a plain statement of the methods that do not beat the loss baseline."""
    detection_figure(rows, folder / "detection.png")
    shown = ("method", "inspected_fraction", "recall", "recall_lo", "recall_hi", "auc", "n_seeds", "versus_loss")
    text = ["## Mislabel detection", "",
            f"Recall of the {rows[0]['n_flipped']} flipped labels among the top-scored training points "
            f"(of {rows[0]['n_train']}), mean over seeds with 95% t intervals; `versus_loss` compares each method "
            "with the training-loss baseline at the same fraction (`better`/`worse` only when the intervals do not "
            "overlap).", "", markdown_table(list(shown), [tuple(r[c] for c in shown) for r in rows]), "",
            "![recall against inspected fraction](detection.png)", ""]
    methods = sorted({r["method"] for r in rows} - {"loss", "random"})
    if not any(r["method"] == "loss" for r in rows):
        return [*text, "No training-loss baseline is registered (`ifledger detect STUDY --methods loss`): no method "
                "is shown to beat it.", ""]
    for method in methods:
        verdicts = {r["inspected_fraction"]: r["versus_loss"] for r in rows if r["method"] == method}
        if not any(v == "better" for v in verdicts.values()):
            text.append(f"**{method} does not beat the training-loss baseline** at any inspected fraction "
                        f"({', '.join(f'{p:g}: {v}' for p, v in sorted(verdicts.items()))}).")
        else:
            better = [f"{p:g}" for p, v in sorted(verdicts.items()) if v == "better"]
            text.append(f"{method} beats the training-loss baseline at "
                        + ("every inspected fraction." if len(better) == len(verdicts) else
                           f"inspected fraction {', '.join(better)}; elsewhere it does not."))
    return [*text, ""]
