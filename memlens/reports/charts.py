"""Report charts: matplotlib figures rendered to inline SVG (vector, text kept as text)."""

from __future__ import annotations

import io
import itertools
import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "font.family": "DejaVu Sans", "font.size": 9,
                     "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "memlens"})
COLORS = {"S_C": "#c0392b", "S_S": "#7f8c8d", "S_I": "#2471a3", "S_E": "#27ae60"}
NAMES = {"S_C": "S_C candidates", "S_S": "S_S shared", "S_I": "S_I independent", "S_E": "S_E extra"}


_counter = itertools.count()


def _svg(fig) -> str:
    """The figure as an inline <svg> element whose ids are unique within the report: every chart
    of a document shares one id namespace, and matplotlib numbers ids per figure."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    prefix = f"c{next(_counter)}-"
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    return re.sub(r'(href="#|url\(#)([^")]+)', lambda m: f"{m.group(1)}{prefix}{m.group(2)}", text)


def sslmem_distributions(points: pd.DataFrame, *, score: str = "sslmem") -> str:
    """Histogram of the score per subset (SSLMem paper, Fig. 2c)."""
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    values = points[score].to_numpy(dtype=float)
    lo, hi = np.nanpercentile(values, [0.5, 99.5]) if len(values) else (0, 1)
    span = hi - lo or 1.0
    bins = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 41)
    for name in ("S_S", "S_E", "S_I", "S_C"):
        v = points.loc[points["subset"] == name, score].to_numpy(dtype=float)
        v = v[np.isfinite(v)]  # (references: images in every or no encoder have no score)
        if len(v):
            ax.hist(v, bins=bins, density=True, histtype="stepfilled" if name == "S_C" else "step", alpha=0.35
                    if name == "S_C" else 1.0, color=COLORS[name], linewidth=1.4, label=f"{NAMES[name]} (n={len(v)})")
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"{score} (higher = more memorized)")
    ax.set_ylabel("density")
    ax.legend(frameon=False, fontsize=7, loc="upper right")
    return _svg(fig)


def layermem_chart(layers: pd.DataFrame) -> str:
    """LayerMem (line) and ΔLayerMem (bars) per exposed layer, in forward order."""
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    x = np.arange(len(layers))
    ax.bar(x, layers["delta_layermem"].fillna(0).to_numpy(dtype=float), color="#d5dbdb", label="ΔLayerMem")
    ax.plot(x, layers["layermem"].to_numpy(dtype=float), color="#c0392b", marker="o", markersize=3,
            label="LayerMem (all candidates)")
    if "layermem_top" in layers:
        ax.plot(x, layers["layermem_top"].to_numpy(dtype=float), color="#922b21", linestyle="--", linewidth=1,
                label="LayerMem (most memorized)")
        ax.plot(x, layers["layermem_least"].to_numpy(dtype=float), color="#7f8c8d", linestyle=":", linewidth=1,
                label="LayerMem (least memorized)")
    ax.axhline(0, color="black", linewidth=0.5)
    step = max(1, len(layers) // 24)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(layers["layer"].tolist()[::step], rotation=70, ha="right", fontsize=6)
    ax.set_ylabel("SSLMem' (localizing paper Eq. 3)")
    ax.legend(frameon=False, fontsize=7)
    return _svg(fig)


def unitmem_boxes(units: pd.DataFrame, layers: list[str]) -> str:
    """Distribution of UnitMem per layer."""
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    data = [units.loc[units["layer"] == name, "unitmem"].dropna().to_numpy(dtype=float) for name in layers]
    ax.boxplot(data, showfliers=False, widths=0.6)
    ax.axhline(0.5, color="#c0392b", linewidth=0.6, linestyle="--")
    step = max(1, len(layers) // 24)
    ax.set_xticks(np.arange(1, len(layers) + 1)[::step])
    ax.set_xticklabels(layers[::step], rotation=70, ha="right", fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("UnitMem")
    return _svg(fig)


def unit_vs_class(units: pd.DataFrame) -> str:
    """UnitMem against ClassMem for every unit (localizing paper, Fig. 3): below the diagonal,
    a unit singles out individual images rather than classes."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    u = units.dropna(subset=["unitmem", "classmem"])
    ax.scatter(u["classmem"], u["unitmem"], s=3, alpha=0.4, color="#2471a3", linewidths=0)
    ax.plot([0, 1], [0, 1], color="#c0392b", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("ClassMem")
    ax.set_ylabel("UnitMem")
    return _svg(fig)


def epsilon_chart(rows: list[dict]) -> str:
    """Memorization and utility against epsilon, side by side (SSLMem paper, Table 5 as a figure)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6.4, 2.4))
    labels = [f"ε = {r['epsilon_label']}" for r in rows]
    x = np.arange(len(rows))
    offset_free = all(r.get("mem_mean") is not None for r in rows)
    key = ("mem_mean", "mem_ci_low", "mem_ci_high") if offset_free else ("mean", "ci_low", "ci_high")
    mem, lo, hi = (np.array([np.nan if r[k] is None else r[k] for r in rows], dtype=float) for k in key)
    ax1.bar(x, mem, color="#c0392b", alpha=0.8, width=0.55)
    ax1.errorbar(x, mem, yerr=[np.nan_to_num(mem - lo), np.nan_to_num(hi - mem)], fmt="none", ecolor="black",
                 capsize=3, linewidth=0.8)
    ax1.axhline(0, color="black", linewidth=0.5)
    ax1.set_xticks(x)
    ax1.set_xticklabels(labels)
    ax1.set_title("memorization of S_C above the controls (95% CI)" if offset_free else
                  "memorization: mean SSLMem of S_C (95% CI)", fontsize=8)
    acc = np.array([np.nan if r["probe_accuracy"] is None else 100 * r["probe_accuracy"] for r in rows], dtype=float)
    ax2.bar(x, np.nan_to_num(acc), color="#2471a3", alpha=0.8, width=0.55)
    for xi, a in zip(x, acc, strict=True):
        ax2.text(xi, (0 if math.isnan(a) else a) + 1, "n/a" if math.isnan(a) else f"{a:.1f}%", ha="center",
                 fontsize=7)
    ax2.set_ylim(0, 105)
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels)
    ax2.set_title("utility: linear-probe accuracy (%)", fontsize=8)
    fig.tight_layout()
    return _svg(fig)


SCORE_NAMES = {"sslmem": "SSLMem (f vs reference g)", "neg_align_f": "f's alignment alone",
               "loss_ref": "training loss (target vs references)", "neg_loss_f": "f's training loss alone",
               "neg_align": "target's alignment alone", "align_ref": "alignment (target vs references)",
               "lira_align": "LiRA on the alignment", "rmia_align": "RMIA on the alignment",
               "neg_loss": "target's training loss alone", "lira_loss": "LiRA on the loss",
               "rmia_loss": "RMIA on the loss"}


def roc_chart(metrics: dict[str, dict], *, title: str) -> str:
    """ROC curves of membership scores (log-scaled FPR shows the low-FPR regime that matters)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6.4, 3.4))
    # eight distinct colours and two line styles: one look per score (the legend sits below the plots)
    palette = ["#c0392b", "#2471a3", "#27ae60", "#f39c12", "#8e44ad", "#7f8c8d", "#16a085", "#2c3e50"]
    styles = ["-", "--"]
    for k, (name, m) in enumerate(metrics.items()):
        f, t = np.asarray(m["roc_fpr"]), np.asarray(m["roc_tpr"])
        label = f"{SCORE_NAMES.get(name, name)}: AUC {m['auc']:.2f}"
        for ax in (ax1, ax2):
            ax.plot(f, t, color=palette[k % len(palette)], linestyle=styles[(k // len(palette)) % 2],
                    linewidth=1.2, label=label)
    for ax in (ax1, ax2):
        ax.plot([1e-4, 1], [1e-4, 1], color="black", linewidth=0.5, linestyle=":")
        ax.set_xlabel("false-positive rate")
    ax1.set_ylabel("true-positive rate")
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlim(1e-3, 1)
    ax2.set_ylim(1e-3, 1)
    ax2.set_title("log scale", fontsize=7)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=6, loc="lower center", ncol=2)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.08 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    return _svg(fig)


def epsilon_claims_chart(rows: list[dict]) -> str:
    """Claimed (accountant) against empirical (canary lower bound) epsilon over a sweep."""
    fig, ax = plt.subplots(figsize=(4.6, 2.5))
    x = np.arange(len(rows))
    claimed = [r["claimed"] for r in rows]
    empirical = [r["empirical"] if r["empirical"] is not None else np.nan for r in rows]
    cap = max([c for c in claimed if c is not None and np.isfinite(c)] + [e for e in empirical if np.isfinite(e)]
              + [1.0]) * 1.3
    shown = [cap if (c is None or not np.isfinite(c)) else c for c in claimed]
    ax.bar(x - 0.18, shown, width=0.36, color="#d5dbdb", label="claimed (accountant)")
    for xi, c in zip(x, claimed, strict=True):
        if c is None or not np.isfinite(c):
            ax.text(xi - 0.18, cap * 0.5, "∞", ha="center", fontsize=11)
    ax.bar(x + 0.18, np.nan_to_num(empirical), width=0.36, color="#c0392b", label="empirical lower bound (95%)")
    for xi, e in zip(x, empirical, strict=True):
        ax.text(xi + 0.18, (0 if not np.isfinite(e) else e) + cap * 0.02, "n/a" if not np.isfinite(e) else f"{e:.2f}",
                ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([f"ε = {r['label']}" for r in rows])
    ax.set_ylim(0, cap * 1.1)
    ax.set_ylabel("epsilon")
    ax.legend(frameon=False, fontsize=7)
    return _svg(fig)
