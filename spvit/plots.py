"""Plots of a demo / search run (matplotlib, optional): per-block choices and the FLOPs / accuracy trade-off."""
from __future__ import annotations

import csv
import os
from typing import Dict

COLORS = {"msa": "#4c72b0", "3x3": "#dd8452", "1x1": "#55a868", "skip": "#c44e52"}


def _read_csv(path: str):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_demo(out: str, summary: Dict) -> str:
    """Write ``out/demo.png``: left, FFN units kept per block coloured by attention choice; right, GFLOPs vs
    accuracy of the teacher, the supernet's read-out per search epoch and the fine-tuned pruned model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    blocks = summary["blocks"]
    xs = [b["block"] for b in blocks]
    a1.bar(xs, [b["ffn_total"] for b in blocks], color="#dddddd", label="FFN units (dense)")
    a1.bar(xs, [b["ffn_kept"] for b in blocks], color=[COLORS[b["attn"]] for b in blocks])
    for b in blocks:
        a1.text(b["block"], b["ffn_kept"] + 2, b["attn"], ha="center", va="bottom", fontsize=9)
    for k, c in COLORS.items():
        a1.bar([0], [0], color=c, label=k)
    a1.set_xlabel("block")
    a1.set_ylabel("FFN hidden units kept")
    a1.set_title("Searched architecture")
    a1.set_ylim(0, 1.3 * max(b["ffn_total"] for b in blocks))
    a1.legend(fontsize=8, loc="upper center", ncol=3)

    rows = _read_csv(os.path.join(out, "search", "metrics.csv"))
    if rows:
        g = [float(r["gflops"]) * 1e3 for r in rows]
        acc = [float(r["val_acc1"]) for r in rows]
        ep = [int(r["epoch"]) for r in rows]
        a2.plot(g, acc, "-", color="#dddddd", zorder=1)
        sc = a2.scatter(g, acc, c=ep, cmap="viridis", s=30, zorder=2,
                        label="supernet read-out per search epoch (validation)")
        for x, y, e in zip(g, acc, ep):
            a2.annotate(str(e), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="#555555")
        fig.colorbar(sc, ax=a2, label="search epoch")
    a2.scatter([summary["teacher_gflops"] * 1e3], [summary["teacher_acc"]], s=80, marker="s", color="black",
               label="teacher (dense, test)", zorder=3)
    a2.scatter([summary["pruned_gflops"] * 1e3], [summary["pruned_acc"]], s=110, marker="*", color="#c44e52",
               label="SPViT pruned + fine-tuned (test)", zorder=3)
    a2.axvline(summary["target_gflops"] * 1e3, ls="--", color="#bbbbbb", label="FLOPs target")
    a2.set_xlabel("MFLOPs per image (MACs)")
    a2.set_ylabel("top-1 accuracy (%)")
    a2.set_title("FLOPs / accuracy")
    a2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out, "demo.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compress(out: str, summary: Dict) -> str:
    """Write ``out/report.png`` for ``spvit compress``: per-block choices (FFN units kept, coloured by attention
    choice) and, over the search epochs, the read-out's GFLOPs against validation accuracy and the predicted
    latency (when the search had a latency target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_csv(os.path.join(out, "search", "metrics.csv"))
    has_ms = bool(rows) and all(r.get("pred_ms") not in (None, "") for r in rows)
    fig, axes = plt.subplots(1, 3 if has_ms else 2, figsize=(15 if has_ms else 11, 4))
    a1, a2 = axes[0], axes[1]
    blocks = summary["blocks"]
    xs = [b["block"] for b in blocks]
    a1.bar(xs, [b["ffn_total"] for b in blocks], color="#dddddd", label="FFN units (dense)")
    a1.bar(xs, [b["ffn_kept"] for b in blocks], color=[COLORS[b["attn"]] for b in blocks])
    for b in blocks:
        a1.text(b["block"], b["ffn_kept"], b["attn"], ha="center", va="bottom", fontsize=7, rotation=90)
    for k, c in COLORS.items():
        a1.bar([0], [0], color=c, label=k)
    a1.set_xlabel("block")
    a1.set_ylabel("FFN hidden units kept")
    a1.set_title("Per-block choices")
    a1.legend(fontsize=7, loc="upper right", ncol=3)
    if rows:
        ep = [int(r["epoch"]) for r in rows]
        g = [float(r.get("arch_gflops") or r["gflops"]) for r in rows]
        acc = [float(r["val_acc1"]) for r in rows]
        a2.plot(g, acc, "-", color="#dddddd", zorder=1)
        sc = a2.scatter(g, acc, c=ep, cmap="viridis", s=30, zorder=2)
        fig.colorbar(sc, ax=a2, label="search epoch")
        if has_ms:
            a3 = axes[2]
            a3.plot(ep, [float(r["pred_ms"]) for r in rows], "o-", label="predicted (read-out)")
            a3.set_xlabel("search epoch")
            a3.set_ylabel("latency (ms per batch)")
            a3.set_title("Latency over the search")
            a = summary["achieved"]
            a3.axhline(a["compressed_ms"], ls="--", color="#c44e52", label="measured (deployed)")
            a3.axhline(a["dense_ms"], ls=":", color="black", label="measured dense")
            a3.legend(fontsize=8)
    a2.set_xlabel("GFLOPs (read-out)")
    a2.set_ylabel("validation top-1 (%)")
    a2.set_title("FLOPs / accuracy over the search")
    fig.tight_layout()
    path = os.path.join(out, "report.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
