"""The report's localisation section: where a dataset change lands, predicted and retrained.

- Restricted effects: per parameter scope (a method `exact:scope=R` scored against `frozen:scope=R,from=full`, only
  that scope retrained), the predicted and the retrained effect of removing each set on the measurements, beside
  the unrestricted ones (methods without a scope against `pbrf`, `warm`, `scratch`): how much of a set's effect one
  block carries when only it may change, and whether influence restricted to it predicts that.
- weight_change.png: per (method, regime), the actual weight-change norm ‖Δθ_B‖ of each (set, seed, block) against
  the predicted ‖Δθ̂_B‖, log-log, colour by block, y = x dashed; the panel's title gives the median cosine of the
  whole vectors and the mean across-block Spearman of the norms.
- The weight-change table (view `weight_change_summary`): per (method, regime, block) over sets, the median and
  quartiles of the cosine, mean norms, and the mean `norm_spearman` of the sets with its interval over sets.
The closing note is written from these numbers."""

from __future__ import annotations

from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reports.tables import markdown_table  # noqa: E402

RESTRICTED_COLUMNS = ("scope", "method", "regime", "set_kind", "n", "mean_abs_predicted", "mean_abs_actual",
                      "pearson", "pearson_lo", "pearson_hi", "share_of_unrestricted")
WEIGHT_COLUMNS = ("method", "regime", "block", "sets", "cosine_q1", "cosine_median", "cosine_q3",
                  "mean_predicted_norm", "mean_actual_norm", "norm_spearman", "norm_spearman_lo", "norm_spearman_hi")


def localisation_rows(con: duckdb.DuckDBPyConnection, study: str) -> dict[str, list[dict]]:
    """What the section draws, read from the views: restricted effects (Pearson and its interval from `calibration`,
    where every correlation is defined), weight-change summaries (`weight_change_summary`) and per-seed points."""
    def rows(sql: str) -> list[dict]:
        cursor = con.execute(sql, {"study": study})
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]

    restricted = rows("""
        WITH pa AS (
            SELECT coalesce(nullif(p.method_config->>'scope', ''), '(all parameters)') AS scope, pa.method,
                   pa.config_hash, pa.regime, pa.set_kind, pa.predicted, pa.actual
            FROM prediction_accuracy pa
            JOIN predictions p ON p.seq = pa.seq
            WHERE pa.study = $study AND NOT pa.post_hoc AND pa.set_kind <> 'full'
        ), unrestricted AS (
            SELECT set_kind, avg(abs(actual)) AS mean_abs FROM pa
            WHERE scope = '(all parameters)' AND regime = 'warm' GROUP BY set_kind
        ), sizes AS (
            SELECT scope, method, config_hash, regime, set_kind, avg(abs(predicted)) AS mean_abs_predicted,
                   avg(abs(actual)) AS mean_abs_actual
            FROM pa GROUP BY ALL
        )
        SELECT z.scope, z.method, z.regime, z.set_kind, c.n, z.mean_abs_predicted, z.mean_abs_actual,
               c.pearson, c.pearson_lo, c.pearson_hi,
               z.mean_abs_actual / nullif(u.mean_abs, 0) AS share_of_unrestricted
        FROM sizes z
        JOIN calibration c ON c.study = $study AND c.method = z.method AND c.config_hash = z.config_hash
         AND c.regime = z.regime AND c.set_kind = z.set_kind
        LEFT JOIN unrestricted u ON u.set_kind = z.set_kind
        ORDER BY z.scope <> '(all parameters)', z.scope, z.set_kind, z.regime, z.method""")
    weights = rows("""
        SELECT method, regime, block, sets, cosine_q1, cosine_median, cosine_q3, mean_predicted_norm,
               mean_actual_norm, norm_spearman, norm_spearman_lo, norm_spearman_hi
        FROM weight_change_summary WHERE study = $study""")
    points = rows("""
        SELECT method, regime, block, predicted_norm, actual_norm, cosine
        FROM weight_change_by_seed WHERE study = $study AND NOT post_hoc""")
    return {"restricted": restricted, "weights": weights, "points": points}


def weight_change_figure(points: list[dict], weights: list[dict], path: Path) -> None:
    """Actual against predicted block norms, one panel per (method, regime) (module docstring)."""
    panels = sorted({(p["method"], p["regime"]) for p in points})
    blocks = sorted({p["block"] for p in points if p["block"] != "(all)"})
    colours = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(blocks)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.4, 4.2), squeeze=False)
    for ax, (method, regime) in zip(axes[0], panels):
        mine = [p for p in points if (p["method"], p["regime"]) == (method, regime) and p["block"] != "(all)"
                and p["predicted_norm"] > 0 and p["actual_norm"] > 0]
        for block in blocks:
            xs = [p["predicted_norm"] for p in mine if p["block"] == block]
            ys = [p["actual_norm"] for p in mine if p["block"] == block]
            ax.scatter(xs, ys, s=6, alpha=0.6, color=colours[block], label=block)
        if mine:
            low = min(min(p["predicted_norm"], p["actual_norm"]) for p in mine)
            high = max(max(p["predicted_norm"], p["actual_norm"]) for p in mine)
            ax.plot([low, high], [low, high], "k--", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        whole = next((w for w in weights if (w["method"], w["regime"], w["block"]) == (method, regime, "(all)")), None)
        title = f"{method} · {regime}"
        if whole:
            title += (f"\nmedian cosine {whole['cosine_median']:.3g}, "
                      f"norm Spearman {_number(whole['norm_spearman'])}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("predicted ‖Δθ̂_B‖", fontsize=8)
        ax.set_ylabel("actual ‖Δθ_B‖ (run − its regime's full run)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = axes[0, 0].get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(blocks), 6), fontsize=7, frameon=False,
               markerscale=2)
    fig.tight_layout(rect=(0, 0.7 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def closing_note(restricted: list[dict], weights: list[dict]) -> str:
    """What a reader learns, in words, from the numbers of the section."""
    notes = []
    whole = [w for w in weights if w["block"] == "(all)"]
    for w in whole:
        notes.append(f"`{w['method']}` against `{w['regime']}`: the predicted weight change points the way the "
                     f"model moved with median cosine {w['cosine_median']:.3g} (quartiles {w['cosine_q1']:.3g}–"
                     f"{w['cosine_q3']:.3g}, {w['sets']} sets), and ranks the blocks by how far they move with "
                     f"Spearman {_number(w['norm_spearman'])}.")
    by_regime = {w["regime"]: w["cosine_median"] for w in whole}
    if "pbrf" in by_regime and "scratch" in by_regime:
        notes.append(f"Influence describes the PBRF response (median cosine {by_regime['pbrf']:.3g}), not what a "
                     f"second training from the same initialisation does ({by_regime['scratch']:.3g}): there the "
                     "set's effect on the weights is mixed with the seed noise of two trainings, which no first-order "
                     "prediction contains.")
    blocks = [w for w in weights if w["block"] != "(all)" and w["regime"] == "pbrf"]
    if blocks:
        top_predicted = max(blocks, key=lambda w: w["mean_predicted_norm"])
        top_actual = max(blocks, key=lambda w: w["mean_actual_norm"])
        notes.append(f"Under pbrf the block predicted to move most is `{top_predicted['block']}`; the one that moved "
                     f"most is `{top_actual['block']}`.")
    scoped = [r for r in restricted if r["scope"] != "(all parameters)"]
    for r in scoped:
        interval = ("" if r["pearson_lo"] is None
                    else f" [{_number(r['pearson_lo'])}, {_number(r['pearson_hi'])}]")
        notes.append(f"Retraining only `{r['scope']}` moves the measurements of `{r['set_kind']}` sets by "
                     f"{_number(r['share_of_unrestricted'])} of the unrestricted (warm) effect, and influence "
                     f"restricted to it predicts that with Pearson {_number(r['pearson'])}{interval}.")
    return " ".join(notes)


def localisation_section(data: dict[str, list[dict]], folder: Path) -> list[str]:
    """The report's lines on where dataset changes land (none without weight changes or scoped predictions)."""
    restricted, weights, points = data["restricted"], data["weights"], data["points"]
    if not weights and not any(r["scope"] != "(all parameters)" for r in restricted):
        return []
    text = ["## Where a dataset change lands", ""]
    if any(r["scope"] != "(all parameters)" for r in restricted):
        text += ["Removing each set when only one scope of parameters may change (`frozen:scope=R,from=full`, "
                 "predicted by the method with the same scope) beside the unrestricted retraining; "
                 "`share_of_unrestricted`: mean |actual effect| over that of `warm` (the same continued training "
                 "with every parameter free).", "",
                 markdown_table(list(RESTRICTED_COLUMNS), [tuple(r[c] for c in RESTRICTED_COLUMNS)
                                                           for r in restricted]), ""]
    if weights:
        weight_change_figure(points, weights, folder / "weight_change.png")
        text += ["Predicted weight change Δθ̂_B = ((1/N) A⁻¹ Σ_{j∈S} ∇L_j)_B against the retrained Δθ_B, "
                 "paired with its regime's full-data run of the same seed, per parameter block; `(all)` is the whole "
                 "vector. Cosine quartiles over sets (each "
                 "set's cosine averaged over seeds); `norm_spearman`: per set and seed, the Spearman of predicted "
                 "and actual norms across blocks, averaged (interval: 95% t over sets); blocks "
                 "of very different sizes (a weight and its bias) rank by size whatever the set, so it tells most "
                 "with comparable blocks (the study's `parameter_blocks`). "
                 "View `weight_change` (store/SCHEMA.md says why `scratch` is the weakest test).", "",
                 markdown_table(list(WEIGHT_COLUMNS), [tuple(w[c] for c in WEIGHT_COLUMNS) for w in weights]), "",
                 "![actual against predicted weight-change norm per block](weight_change.png)", ""]
    return [*text, closing_note(restricted, weights), ""]
