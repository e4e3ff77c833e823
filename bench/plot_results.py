"""Turn the benchmark CSVs in bench/results into PNG plots (matplotlib).

* ``deploy_e2e_<tag>.csv``: images/s per architecture, one bar per provider, one panel per batch size (with the
  FLOPs ratio dense / SPViT under each architecture) -> ``deploy_e2e_<tag>.png``; with ``deploy_e2e_<tag>_layers.csv``
  the deployed model's time per part (embedding, attention by kind, FFN, head) -> ``deploy_e2e_<tag>_layers.png``.
* any other ``<name>.csv`` with a ``provider`` column: ``img_s`` when present, else the fraction of the measured peak
  (``frac_of_peak``) when present, else the time (``ms``) per configuration, one bar per provider -> ``<name>.png``.
  Configuration columns are the usual shape / mode columns found in the file (op, case, mode, model, arch, config,
  choice, B, N, C, d, F, T, batch, dtype).

Rows of several devices in one CSV give one figure per device (``<name>-<device>.png``); for each (device,
configuration, provider) the latest row wins.

python bench/plot_results.py [--dir bench/results] [--out DIR] [--run RUN_ID]
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG_COLS = ("op", "case", "mode", "model", "arch", "config", "choice", "B", "N", "C", "d", "F", "T", "batch",
               "dtype")
PROVIDER_ORDER = ("fused", "ours", "deployed", "ours_compiled", "deployed_compiled", "ours_onnxruntime", "pruned",
                  "pruned_compiled", "dense", "dense_compiled", "dense_onnxruntime", "triton", "ext", "eager", "eager_compiled", "compiled", "timm",
                  "timm_compiled")
PART_COLORS = {"embed": "#999999", "attn_msa": "#4c72b0", "attn_3x3": "#dd8452", "attn_1x1": "#55a868",
               "attn_skip_ln": "#c44e52", "ffn": "#8172b3", "ffn_width0": "#cccccc", "norm_head": "#64b5cd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(v) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # NaN -> None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")[:40]


def _by_device(rows: List[Dict]) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = OrderedDict()
    for r in rows:
        out.setdefault(r.get("device", "?"), []).append(r)
    return out


def _latest(rows: List[Dict], key_cols) -> List[Dict]:
    """Keep the last row for every key (CSV rows are appended in time order)."""
    keep: Dict[tuple, Dict] = OrderedDict()
    for r in rows:
        keep[tuple(r.get(c, "") for c in key_cols)] = r
    return list(keep.values())


def _providers(rows: List[Dict]) -> List[str]:
    seen = list(OrderedDict.fromkeys(r["provider"] for r in rows))
    return sorted(seen, key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER), p))


def _grouped_bars(ax, groups: List[str], providers: List[str], value, ylabel: str, log: bool = False) -> None:
    width = 0.8 / max(1, len(providers))
    for i, prov in enumerate(providers):
        xs, ys = [], []
        for g_i, g in enumerate(groups):
            v = value(g, prov)
            if v is not None:
                xs.append(g_i + (i - (len(providers) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width=width, label=prov)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def plot_deploy_e2e(rows: List[Dict], title: str, out_png: str) -> str:
    plt = _plt()
    rows = [r for r in _latest(rows, ("arch", "batch", "provider", "dtype")) if _float(r.get("img_s"))]
    batches = sorted({int(r["batch"]) for r in rows})
    archs = list(OrderedDict.fromkeys(r["arch"] for r in rows))
    providers = _providers(rows)
    val = {(r["arch"], int(r["batch"]), r["provider"]): _float(r["img_s"]) for r in rows}
    ratio = {r["arch"]: _float(r.get("flops_ratio")) for r in rows if r["provider"] == "ours"}
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches) + 1, 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        labels = [f"{a}\n(FLOPs x{ratio[a]:.2f})" if ratio.get(a) else a for a in archs]
        _grouped_bars(ax, archs, providers, lambda a, p: val.get((a, b, p)), "images / s", log=True)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"batch {b}")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_layers(rows: List[Dict], title: str, out_png: str) -> str:
    plt = _plt()
    rows = _latest(rows, ("arch", "batch", "part", "dtype"))
    keys = list(OrderedDict.fromkeys((r["arch"], int(r["batch"])) for r in rows))
    parts = list(OrderedDict.fromkeys(r["part"] for r in rows))
    ms = {(r["arch"], int(r["batch"]), r["part"]): _float(r["ms"]) or 0.0 for r in rows}
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(keys) + 2.4))
    for k_i, (a, b) in enumerate(keys):
        total = sum(ms.get((a, b, p), 0.0) for p in parts) or 1.0
        left = 0.0
        for p in parts:
            share = ms.get((a, b, p), 0.0) / total
            ax.barh(k_i, share, left=left, color=PART_COLORS.get(p), label=p if k_i == 0 else None)
            left += share
        ax.text(1.01, k_i, f"{total:.3g} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{a} b{b}" for a, b in keys], fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("share of the deployed model's time")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_generic(rows: List[Dict], title: str, out_png: str) -> Optional[str]:
    if not rows or "provider" not in rows[0]:
        return None
    if any(_float(r.get("img_s")) for r in rows):
        metric, ylabel, log = "img_s", "images / s", True
    elif any(_float(r.get("frac_of_peak")) for r in rows):
        metric, ylabel, log = "frac_of_peak", "fraction of the measured peak (GEMM or copy)", False
    else:
        metric, ylabel, log = "ms", "ms (lower is better)", True
    cfg_cols = [c for c in CONFIG_COLS if c in rows[0]]
    rows = [r for r in _latest(rows, cfg_cols + ["provider"]) if _float(r.get(metric))]
    if not rows:
        return None
    plt = _plt()
    groups = list(OrderedDict.fromkeys(" ".join(f"{r[c]}" for c in cfg_cols if r.get(c)) for r in rows))
    val = {(" ".join(f"{r[c]}" for c in cfg_cols if r.get(c)), r["provider"]): _float(r[metric]) for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) + 3), 4.2))
    _grouped_bars(ax, groups, _providers(rows), lambda g, p: val.get((g, p)), ylabel, log=log)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_all(results_dir: str = RESULTS_DIR, out_dir: Optional[str] = None, run: Optional[str] = None) -> List[str]:
    """Plot every CSV in ``results_dir`` (only the rows of run id ``run`` when given); returns the PNG paths."""
    out_dir = out_dir or results_dir
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.csv"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if re.search(r"-\d{14}$", name):  # an older layout kept beside the current file by write_rows
            continue
        rows = [r for r in read_csv(path) if run is None or r.get("run_id") == run]
        if not rows:
            continue
        per_dev = _by_device(rows)
        for dev, drows in per_dev.items():
            suffix = "" if len(per_dev) == 1 else "-" + _slug(dev)
            first = drows[-1]
            title = (f"{name}: {dev}; torch {first.get('torch', '?')}, triton {first.get('triton', '?')}; "
                     f"{first.get('date', '')}")
            png = os.path.join(out_dir, f"{name}{suffix}.png")
            try:
                if name.startswith("deploy_e2e") and name.endswith("_layers"):
                    res = plot_layers(drows, title, png)
                elif name.startswith("deploy_e2e"):
                    res = plot_deploy_e2e(drows, title, png)
                else:
                    res = plot_generic(drows, title, png)
            except Exception as exc:  # noqa: BLE001 - one odd CSV must not stop the others
                print(f"skipped {path} ({dev}): {type(exc).__name__}: {exc}")
                continue
            if res:
                written.append(res)
                print(f"wrote {res}")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=RESULTS_DIR, help="directory of the CSVs (default bench/results)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: --dir)")
    p.add_argument("--run", default=None, help="plot only the rows of this run id (a CSV may hold several runs)")
    args = p.parse_args(argv)
    return plot_all(args.dir, args.out, args.run)


if __name__ == "__main__":
    main()
