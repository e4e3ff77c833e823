"""End-to-end inference of deployed SPViT models vs the eager pruned model, torch.compile and dense timm.

Providers (one ``setup_<provider>`` each; all in eval mode under ``torch.inference_mode``):
  ours                  spvit.deploy(pruned): BN folded, compact FFNs, fused ops through the dispatcher (eager call)
  ours_compiled         torch.compile(deployed)
  pruned                the eager PrunedModel (fine-tune model in eval mode)
  pruned_compiled       torch.compile(pruned)
  dense                 the dense timm model
  dense_compiled        torch.compile(dense timm model)
  ours_onnxruntime      the deployed model exported by spvit.export_onnx, run by onnxruntime (CPU runs only)
  dense_onnxruntime     the dense timm model exported by torch.onnx.export (same exporter), run by onnxruntime
                        (both with a dynamic batch, ``intra_op_num_threads`` = torch's thread count; checked against
                        the eager torch model at setup, tolerance 1e-3 relative: a wrong result is an error row;
                        ``max_abs_err`` of the ours_* rows is the deployed model's vs the pruned one)

Architectures: the DeiT-Ti / DeiT-S / DeiT-B (l008_t60 and l006_t100) fine-tune configurations of the original
paper (docs/method.md §8.3: MSA choices and FFN widths; the kept units are the first k, which does not change the
speed) and a demo-like small model (16x16 one-channel input, patch 2, dim 64, depth 6, every attention choice). Weights are
random (speed does not depend on them); ``max_abs_err`` checks ours against the eager pruned model on the same input.

Swin (section at the end): SPViT-Swin-T and -S (docs/method.md §8.3; skip layers with the original x + LN1(x), as
the released checkpoints) and a small Swin with every attention choice for ``--quick``; same providers, rows and
tables (the per-part breakdown adds PatchMerging).

GPU: bf16, batch 1 / 64 / 256, every architecture. CPU: fp32, ``torch.set_num_threads(2)``, DeiT-Ti and DeiT-S at
batch 1 and 16 (``--batches`` to change), compiled providers included. ``--quick``: the demo-like model only.

Timing: on GPU ``triton.testing.do_bench`` (median); on CPU, which is shared with other processes here, the providers
are called in interleaved rotated rounds (``--rounds``) and img/s and the speedups use the best round (``ms_min``);
the median is reported as ``latency_ms``.

Rows: img/s, latency (ms per batch, median and 20/80 % quantiles), GFLOPs (MACs/1e9 per image, the paper's FLOPs
model), ``flops_ratio`` = dense / model GFLOPs, ``speedup_vs_dense`` (img/s over the eager dense model's),
``speedup_vs_dense_compiled``, ``speedup_vs_pruned_compiled``. A second table ``deploy_e2e_layers`` breaks the
deployed model's time down per part (embedding, attention by kind, FFN, head): each block's attention residual and
FFN residual timed alone on its real input. Results: ``deploy_e2e_{gpu,cpu}.{csv,json,md}`` in ``--out``.

python bench/bench_deploy_e2e.py --out bench/results [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (bench_fn, compile_backend, default_device, env_info, first_call_s,  # noqa: E402
                          markdown_table, peak_memory_mb, write_rows)

PROVIDERS = ("ours", "ours_compiled", "pruned", "pruned_compiled", "dense", "dense_compiled")
CPU_PROVIDERS = ("ours", "ours_compiled", "pruned", "pruned_compiled", "dense", "dense_compiled", "ours_onnxruntime",
                 "dense_onnxruntime")
ORT_PROVIDERS = ("ours_onnxruntime", "dense_onnxruntime")

# docs/method.md §8.3: (timm model, MSA choices, kept FFN units per block), from the package's table of published archs
from spvit.models.registry import SHIPPED  # noqa: E402

ARCHS: Dict[str, tuple] = OrderedDict([
    ("spvit_deit_ti", SHIPPED["spvit_deit_tiny_patch16_224"]),
    ("spvit_deit_s", SHIPPED["spvit_deit_small_patch16_224"]),
    ("spvit_deit_b_l008_t60", SHIPPED["spvit_deit_base_patch16_224"]),
    ("spvit_deit_b_l006_t100", SHIPPED["spvit_deit_base_l006_t100_patch16_224"]),
    ("demo_like", ("demo", ["1x1", "3x3", "msa", "skip", "1x1", "msa"], [201, 150, 177, 96, 61, 0])),
])
DEMO_KWARGS = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
                   mlp_ratio=4.0)
GPU_ARCHS = list(ARCHS)
CPU_ARCHS = ["spvit_deit_ti", "spvit_deit_s"]
GPU_BATCHES = [1, 64, 256]
CPU_BATCHES = [1, 16]


def build_dense(base_name: str) -> torch.nn.Module:
    import timm

    if base_name == "demo":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**DEMO_KWARGS).eval()
    return timm.create_model(base_name, pretrained=False).eval()


def build_models(name: str, device: torch.device, dtype: torch.dtype):
    """(dense timm model, pruned model, deployed model) of architecture ``name``, eval mode, on device/dtype."""
    if name in SWIN_ARCHS:
        return build_swin_models(name, device, dtype)
    base_name, choices, widths = ARCHS[name]
    return build_from_spec(build_dense(base_name), choices, widths, device, dtype)


def build_from_spec(dense: torch.nn.Module, choices, widths, device: torch.device, dtype: torch.dtype):
    """(dense, pruned, deployed) for the dense timm model ``dense`` and the architecture given by its MSA choices and
    kept FFN widths per block (the first ``w`` units kept), with non-trivial BN statistics and head mixing, as after
    fine-tuning; the dense and pruned models are moved to device/dtype, all three are in eval mode."""
    import spvit
    from spvit.arch import Architecture
    from spvit.models.convert import model_name_of, signature_of

    dense = dense.eval()
    arch = Architecture.from_choices(model_name_of(dense), signature_of(dense), choices, [range(w) for w in widths])
    with torch.no_grad():
        pruned = spvit.prune(dense, arch)
        for m in pruned.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "head_probs"):
                m.head_probs.add_(0.02 * torch.randn_like(m.head_probs))
    pruned = pruned.eval()
    deployed = spvit.deploy(pruned, dtype=dtype, device=device)
    return dense.to(device, dtype), pruned.to(device, dtype), deployed


_COMPILE = {"backend": "inductor"}  # set by run(): inductor, or dynamo capture only in CPU --quick runs


def _compile(model: torch.nn.Module, device: torch.device):
    # dynamo is reset once per batch size in run(): every shape compiles anew, and the compiled providers of one
    # batch size stay compiled through the interleaved CPU rounds
    return torch.compile(model, backend=_COMPILE["backend"], dynamic=False)


def setup_ours(models, device):
    return models["deployed"]


def setup_ours_compiled(models, device):
    return _compile(models["deployed"], device)


def setup_pruned(models, device):
    return models["pruned"]


def setup_pruned_compiled(models, device):
    return _compile(models["pruned"], device)


def setup_dense(models, device):
    return models["dense"]


def setup_dense_compiled(models, device):
    return _compile(models["dense"], device)


# -- onnxruntime providers ------------------------------------------------------------------------------------------
def _ort_session(model: torch.nn.Module, deployed: bool, device: torch.device):
    """An onnxruntime CPU session of ``model`` exported with a dynamic batch (a deployed model via
    spvit.export_onnx, a timm model via torch.onnx.export with the same exporter), checked against the model."""
    import tempfile

    import onnxruntime as ort

    from spvit.export import dynamo_exporter_available, export_onnx

    if device.type != "cpu":
        raise RuntimeError("onnxruntime rows are CPU-only (the CPU execution provider)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        if deployed:
            export_onnx(model, path)
        else:
            _export_timm_onnx(model, path, dynamo_exporter_available())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # no busy-waiting between calls: the providers are timed in interleaved rounds on the same cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = _example(model, 3)
    with torch.inference_mode():
        ref = model(x).float()
    got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
    err = (got - ref).abs().max().item()
    if not err <= 1e-3 * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"onnxruntime output differs from the torch model by {err:.3g}")

    def run(x: torch.Tensor):
        return sess.run(None, {name: x.numpy()})[0]

    return run


def _example(model: torch.nn.Module, batch: int) -> torch.Tensor:
    from spvit.models.convert import signature_of

    sig = model.signature if hasattr(model, "signature") else signature_of(model)  # deployed / timm model
    return torch.randn(batch, sig.in_chans, *sig.img_size)


def _export_timm_onnx(model: torch.nn.Module, path: str, dynamo: bool) -> None:
    """torch.onnx.export of a timm model: input ``images`` with a dynamic batch, output ``logits``."""
    example = _example(model, 2)
    kwargs = dict(input_names=["images"], output_names=["logits"], dynamo=dynamo, verbose=False)
    if dynamo:
        kwargs.update(dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    else:
        kwargs.update(dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = torch.onnx.export(model, (example,), path, **kwargs)
    if dynamo and result is not None and not os.path.exists(path):
        result.save(path, external_data=False)


def setup_ours_onnxruntime(models, device):
    if "ours_ort" not in models:  # one export per architecture (dynamic batch)
        models["ours_ort"] = _ort_session(models["deployed"], True, device)
    return models["ours_ort"]


def setup_dense_onnxruntime(models, device):
    if "dense_ort" not in models:
        models["dense_ort"] = _ort_session(models["dense"], False, device)
    return models["dense_ort"]


def _loadavg() -> float:
    """1-minute load average of the machine (other processes disturb CPU timings); -1 where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return -1.0


def cpu_interleaved(fns: Dict, x: torch.Tensor, res: Dict[str, Dict], rounds: int) -> None:
    """CPU timing on a shared machine: ``rounds`` rounds, each calling every provider once in a rotated order, so
    that load from other processes falls on all providers alike. Adds ms (median), ms_min, ms_p20, ms_p80."""
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[n](x)
                times[n].append((time.perf_counter() - t0) * 1e3)
    for n, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else ts * 9
        res[n].update({"ms": statistics.median(ts), "ms_min": ts[0], "ms_p20": q[1], "ms_p80": q[7]})


def layer_breakdown(deployed, x: torch.Tensor, device: torch.device) -> Dict[str, float]:
    """Milliseconds per part of the deployed model: each block's attention / FFN residual timed on its real input."""
    parts: Dict[str, float] = OrderedDict()

    def timed(fn) -> float:
        if device.type == "cuda":
            return bench_fn(fn, device)["ms"]
        fn()
        best = float("inf")
        for _ in range(10 if x.shape[0] <= 4 else 3):  # best of a few: the least disturbed by other processes
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
        return best

    def add(key, fn):
        parts[key] = parts.get(key, 0.0) + timed(fn)

    with torch.inference_mode():
        add("embed", lambda: deployed.embed(x))
        h = deployed.embed(x)
        for blk in deployed.blocks:
            if blk.kind != "skip":
                add(f"attn_{blk.kind}", lambda blk=blk, h=h: blk.attn_residual(h))
            h = blk.attn_residual(h)
            add("ffn" if blk.ffn_width else "ffn_width0", lambda blk=blk, h=h: blk.ffn_residual(h))
            h = blk.ffn_residual(h)
        add("norm_head", lambda: deployed.forward_head(deployed.norm(h)))
    counts: Dict[str, int] = {}
    for blk in deployed.blocks:
        if blk.kind != "skip":
            counts[f"attn_{blk.kind}"] = counts.get(f"attn_{blk.kind}", 0) + 1
    return parts, counts


def run(arch_names: List[str], batches: List[int], device: torch.device, dtype: torch.dtype,
        providers: List[str], breakdown: bool = True, rounds: int = 5, smoke: bool = False):
    import spvit
    from spvit_kernels.backend import backend_of

    env = env_info(device)
    _COMPILE["backend"] = compile_backend(device, smoke)
    rows, layer_rows = [], []
    for name in arch_names:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        dense, pruned, deployed = build_models(name, device, dtype)
        models = {"dense": dense, "pruned": pruned, "deployed": deployed}
        gf_model, gf_dense = spvit.gflops(pruned), spvit.gflops(dense)
        backends = ",".join(f"{op}={backend_of(op, device)}" for op in ("deploy_conv", "pruned_ffn"))
        sig = deployed.signature
        print(f"[{name}] built in {time.perf_counter() - t0:.1f}s: {gf_model:.3f} vs dense {gf_dense:.3f} GFLOPs; "
              f"ops {backends}", flush=True)
        fns = {}
        for batch in batches:
            x = torch.randn(batch, sig.in_chans, *sig.img_size, device=device, dtype=dtype)
            with torch.inference_mode():
                err = (deployed(x).float() - pruned(x).float()).abs().max().item()
            res: Dict[str, Dict] = {}
            torch._dynamo.reset()
            for prov in providers:
                try:
                    # a fresh setup per batch size: compiled providers compile anew for every shape
                    fn = fns[prov] = globals()[f"setup_{prov}"](models, device)
                    with torch.inference_mode():
                        compile_s = first_call_s(lambda: fn(x), device)  # compilation for the compiled providers
                        t = bench_fn(lambda: fn(x), device) if device.type == "cuda" else {}
                        mem = peak_memory_mb(lambda: fn(x), device)
                except Exception as exc:  # noqa: BLE001 - record and go on (e.g. no C++ compiler for inductor)
                    print(f"  {prov} b{batch}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    res[prov] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                    continue
                res[prov] = {**t, "first_call_s": compile_s, "peak_mb": mem}
            if device.type != "cuda":
                cpu_interleaved({p: fns[p] for p in providers if "error" not in res[p]}, x, res,
                                rounds * 3 if batch <= 4 else rounds)
            for prov, r in res.items():
                if "ms" in r:
                    print(f"  {prov:16s} b{batch:<4d} {r['ms']:9.3f} ms (best {r['ms_min']:9.3f})  "
                          f"{batch / r['ms_min'] * 1e3:9.1f} img/s (best)", flush=True)
            # img/s from the median on GPU; on a shared CPU from the best of the interleaved rounds (``ms_min``),
            # the time least disturbed by other processes (the median is in the row too)
            key = "ms" if device.type == "cuda" else "ms_min"
            ref = {k: batch / res[k][key] * 1e3 for k in ("dense", "dense_compiled", "pruned_compiled")
                   if k in res and key in res[k]}
            for prov, r in res.items():
                row = {"arch": name, "provider": prov, "dtype": str(dtype).replace("torch.", ""), "batch": batch}
                if "ms" in r:
                    ips = batch / r[key] * 1e3
                    gf = gf_dense if prov.startswith("dense") else gf_model
                    row.update({"img_s": ips, "latency_ms": r["ms"], "ms_min": r.get("ms_min", ""),
                                "ms_p20": r["ms_p20"],
                                "ms_p80": r["ms_p80"],
                                "gflops": gf, "flops_ratio": gf_dense / gf,
                                "speedup_vs_dense": ips / ref["dense"] if "dense" in ref else "",
                                "speedup_vs_dense_compiled": ips / ref["dense_compiled"] if "dense_compiled" in ref
                                else "",
                                "speedup_vs_pruned_compiled": ips / ref["pruned_compiled"] if "pruned_compiled" in
                                ref else "",
                                "first_call_s": r["first_call_s"], "peak_mb": r["peak_mb"] if r["peak_mb"] else "",
                                "error": ""})
                else:
                    row["error"] = r["error"]
                row.update({"max_abs_err": err if prov.startswith("ours") else "", "ops": backends,
                            "threads": torch.get_num_threads(), "loadavg_1m": _loadavg(), **env})
                rows.append(row)
            if breakdown:
                parts, counts = (swin_layer_breakdown if name in SWIN_ARCHS else layer_breakdown)(deployed, x, device)
                total = sum(parts.values())
                for part, ms in parts.items():
                    layer_rows.append({"arch": name, "batch": batch, "part": part, "layers": counts.get(part, ""),
                                       "ms": ms, "share": ms / total, "dtype": row["dtype"], **env})
        del models, fns, dense, pruned, deployed
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows, layer_rows


def summary(rows: List[Dict], device: torch.device) -> str:
    """Markdown lines on the performance targets."""
    lines = ["", "## Targets", ""]
    by = {(r["arch"], r["batch"], r["provider"]): r for r in rows if r.get("img_s")}
    if device.type == "cuda":
        for arch in [a for a in ARCHS if a.startswith("spvit_deit_b")]:
            ours = by.get((arch, 256, "ours"))
            if ours:
                lines.append(f"- {arch}, bf16, batch 256: ours / compiled dense = "
                             f"{ours['speedup_vs_dense_compiled'] or float('nan'):.3g} (target >= 1.9); ours / "
                             f"compiled pruned = {ours['speedup_vs_pruned_compiled'] or float('nan'):.3g} "
                             "(target >= 1.2)")
    else:
        for (arch, batch, prov), r in sorted(by.items()):
            if prov != "ours":
                continue
            pr = by.get((arch, batch, "pruned"))
            vs_pruned = r["img_s"] / pr["img_s"] if pr else float("nan")
            sp = r["speedup_vs_dense"] or float("nan")
            lines.append(f"- {arch}, fp32, batch {batch}: ours / eager pruned = {vs_pruned:.3g} (target > 1); "
                         f"speedup over dense {sp:.3g} vs 0.8 x FLOPs ratio {0.8 * r['flops_ratio']:.3g} "
                         f"({'met' if sp >= 0.8 * r['flops_ratio'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Swin: SPViT-Swin-T / -S (docs/method.md §8.3) and a small Swin for --quick; same providers and table as DeiT
# ----------------------------------------------------------------------------------------------------------------------
def _swin_specs():
    from spvit.models.registry import shipped_entry

    return OrderedDict([
        ("spvit_swin_t", shipped_entry("spvit_swin_tiny_patch4_window7_224")),
        ("spvit_swin_s", shipped_entry("spvit_swin_small_patch4_window7_224")),
        # 32 px, patch 2, window 4, dim 32 (head dim 16): every attention choice, shifted conv and MSA blocks
        ("swin_demo_like", ("swin_demo", ["msa", "3x3", "1x1", "msa", "skip", "msa"], [32, 3, 0, 128, 10, 86])),
    ])


SWIN_ARCHS: Dict[str, tuple] = _swin_specs()
SWIN_DEMO_KWARGS = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
                        window_size=4, mlp_ratio=2.0, num_classes=10)
SWIN_GPU_ARCHS = ["spvit_swin_t", "spvit_swin_s"]
SWIN_CPU_ARCHS = ["spvit_swin_t"]
SWIN_QUICK_ARCHS = ["swin_demo_like"]


def build_swin_models(name: str, device: torch.device, dtype: torch.dtype):
    """(dense timm Swin, SwinPrunedModel, DeployedSwin) of Swin architecture ``name``: the published MSA choices and
    FFN widths (first units kept), skip layers with the original fine-tune semantics x + LN1(x) (quirk Q4, as the
    released checkpoints), non-trivial BN statistics and head mixing; eval mode, on device/dtype."""
    import timm

    import spvit
    from spvit.arch import Architecture, BlockArch
    from spvit.models.convert import model_name_of, signature_of

    base_name, choices, widths = SWIN_ARCHS[name]
    if base_name == "swin_demo":
        from timm.models.swin_transformer import SwinTransformer

        dense = SwinTransformer(**SWIN_DEMO_KWARGS).eval()
    else:
        dense = timm.create_model(base_name, pretrained=False).eval()
    arch = Architecture(model_name_of(dense), signature_of(dense),
                        [BlockArch(a, tuple(range(w))) for a, w in zip(choices, widths)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official-skip notice
        pruned = spvit.prune(dense, arch, official_skip=True)
        for m in pruned.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "head_probs"):
                m.head_probs.add_(2.0 * torch.randn_like(m.head_probs))
    pruned = pruned.eval()
    deployed = spvit.deploy(pruned, dtype=dtype, device=device)
    return dense.to(device, dtype), pruned.to(device, dtype), deployed


def swin_layer_breakdown(deployed, x: torch.Tensor, device: torch.device):
    """Milliseconds per part of a DeployedSwin (embedding, PatchMerging, attention by kind, FFN, norm + head), each
    timed alone on its real input (as :func:`layer_breakdown`)."""
    parts: Dict[str, float] = OrderedDict()

    def timed(fn) -> float:
        if device.type == "cuda":
            return bench_fn(fn, device)["ms"]
        fn()
        best = float("inf")
        for _ in range(10 if x.shape[0] <= 4 else 3):
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
        return best

    def add(key, fn):
        parts[key] = parts.get(key, 0.0) + timed(fn)

    counts: Dict[str, int] = {}
    with torch.inference_mode():
        add("embed", lambda: deployed.embed(x))
        h = deployed.embed(x)
        for stage in deployed.layers:
            if not isinstance(stage.downsample, torch.nn.Identity):
                add("patch_merging", lambda stage=stage, h=h: stage.downsample(h))
                counts["patch_merging"] = counts.get("patch_merging", 0) + 1
            h = stage.downsample(h)
            b, hh, ww, c = h.shape
            t = h.reshape(b, hh * ww, c)
            for blk in stage.blocks:
                if blk.kind != "skip":
                    add(f"attn_{blk.kind}", lambda blk=blk, t=t: blk.attn_residual(t))
                    counts[f"attn_{blk.kind}"] = counts.get(f"attn_{blk.kind}", 0) + 1
                t = blk.attn_residual(t)
                add("ffn" if blk.ffn_width else "ffn_width0", lambda blk=blk, t=t: blk.ffn_residual(t))
                t = blk.ffn_residual(t)
            h = t.reshape(b, hh, ww, c)
        add("norm_head", lambda: deployed.forward_head(deployed.norm(h)))
    return parts, counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--quick", action="store_true", help="the demo-like model only")
    p.add_argument("--archs", default=None, help=f"comma-separated subset of {','.join(ARCHS)}")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per batch (CPU; x3 for batch <= 4)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long check of every provider: the demo-like model, "
                   "batch 2, one round, no breakdown")
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda":
        dtype, archs, batches, providers = torch.bfloat16, GPU_ARCHS, GPU_BATCHES, PROVIDERS
    else:
        torch.set_num_threads(args.threads)
        dtype, archs, batches, providers = torch.float32, CPU_ARCHS, CPU_BATCHES, CPU_PROVIDERS
    archs = archs + (SWIN_GPU_ARCHS if device.type == "cuda" else SWIN_CPU_ARCHS)
    if args.quick or args.smoke:
        archs, batches = ["demo_like"] + SWIN_QUICK_ARCHS, ([64] if device.type == "cuda" else [1, 16])
    if args.smoke:
        batches, args.rounds, args.no_breakdown = [2], 1, True
    archs = args.archs.split(",") if args.archs else archs
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    providers = args.providers.split(",") if args.providers else list(providers)
    for a in archs:
        if a not in ARCHS and a not in SWIN_ARCHS:
            p.error(f"unknown architecture {a!r}; choose from {', '.join(list(ARCHS) + list(SWIN_ARCHS))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, layer_rows = run(archs, batches, device, dtype, providers, breakdown=not args.no_breakdown,
                               rounds=args.rounds, smoke=args.quick or args.smoke)
    tag = "gpu" if device.type == "cuda" else "cpu"
    path = write_rows(f"deploy_e2e_{tag}", rows, args.out, markdown=False)  # the report below is the .md
    md = os.path.join(os.path.dirname(path), f"deploy_e2e_{tag}.md")
    cols = ["arch", "provider", "dtype", "batch", "img_s", "latency_ms", "ms_min", "gflops", "flops_ratio",
            "speedup_vs_dense",
            "speedup_vs_dense_compiled", "speedup_vs_pruned_compiled", "max_abs_err", "error"]
    with open(md, "w") as f:
        env = env_info(device)
        f.write(f"# deploy_e2e ({tag})\n\n{env['device']}; torch {env['torch']}, triton {env['triton']}, timm "
                f"{env['timm']}, CUDA {env['cuda']}; {env['date']}; ops: {rows[0]['ops'] if rows else ''}; "
                f"{os.cpu_count()} CPU cores on the machine, load average (1 min) during the run "
                f"{min(r['loadavg_1m'] for r in rows) if rows else '?'}.."
                f"{max(r['loadavg_1m'] for r in rows) if rows else '?'}"
                + (f"; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if os.environ.get("OMP_WAIT_POLICY") else "")
                + "\n\n")
        f.write(markdown_table(rows, cols))
        f.write(summary(rows, device))
        if layer_rows:
            f.write("\n## Deployed model, time per part\n\n")
            f.write(markdown_table(layer_rows, ["arch", "batch", "part", "layers", "ms", "share"]))
    if layer_rows:
        write_rows(f"deploy_e2e_{tag}_layers", layer_rows, args.out, markdown=False)  # the .md above has the table
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
