"""The headline benchmark: what a GPU owner runs first (``python bench/run_all.py --suite headline --out DIR``).

Sections (``headline_<section>.{csv,json,md}``, rewritten after each item, so a run cut short keeps what it did; the
order of the work is peaks, supernet step DeiT-B, inference SPViT-DeiT-B, supernet step DeiT-S, inference
SPViT-DeiT-S, kernels: the rows the performance targets need come first):

* ``peaks``: the device's peaks measured in this run: a large GEMM (bf16 8192^3 on CUDA) and a device-to-device
  copy (1 GiB on CUDA); the per-kernel fractions below are of these.
* ``supernet_step``: one SPViT search training step (forward, CE + FLOPs loss, backward, AdamW) of DeiT-B and
  DeiT-S at batch 256, 224 px, bf16 autocast: ``fused`` (our kernels), ``eager`` (the eager reference ops),
  ``eager_compiled`` (torch.compile of the eager reference), ``timm_compiled`` (the plain timm model compiled: the
  floor). img/s and peak memory.
* ``inference``: the published SPViT-DeiT-B (l008_t60) and SPViT-DeiT-S, batch 256, bf16: ``deployed``
  (spvit.deploy), ``deployed_compiled``, ``pruned`` (the eager PrunedModel), ``pruned_compiled``, ``dense_compiled``
  (the dense timm model compiled). img/s.
* ``kernels``: every op forward (and backward where it has one) at DeiT-B shapes, batch 256, bf16, for each
  implementation (Triton, extension, eager reference): time, achieved TFLOP/s and GB/s against the op's FLOP and
  byte model, and the fraction of the measured peak of the resource that binds it.

Work on a GPU: 10 torch.compile (inductor) compilations, 4 of a training step (eager-reference supernet and timm
model, DeiT-S and DeiT-B) and 6 of an inference forward; no autotuning mode; Triton JIT of the package's kernels
once per shape (the kernels section comes last and finds most of them compiled, at the same DeiT-B shapes).
Timed calls: 8 training providers x (1 first + 3 warm-up + 10 timed steps), 10 inference providers x (1 + 5 + 20),
30 kernel rows x (1 + 5 + 20).

``smoke`` (e.g. ``--device cpu --smoke``): the same sections on tiny models and shapes, 1 warm-up and 2 timed
calls, fp32, and the ``eager`` torch.compile backend on CPU (dynamo capture without inductor codegen): a check of
the harness, not a measurement.

A ``budget_s`` bounds the run: an item not yet started when it is used up is recorded as an error row ("not run"),
so an incomplete run never reads as a complete one. Any error row makes :func:`run` report failure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_supernet_step as sn_bench  # noqa: E402
from bench.common import (bench_backward, bench_fn, compile_backend, compile_stats, env_info, error_rows,  # noqa: E402
                          error_text, first_call_s, free_memory, fresh_compile, markdown_table, measure_peaks,
                          write_rows)

SECTIONS = ("peaks", "supernet_step", "inference", "kernels")
SN_PROVIDERS = ("fused", "eager", "eager_compiled", "timm_compiled")
INFER_PROVIDERS = ("deployed", "deployed_compiled", "pruned", "pruned_compiled", "dense_compiled")


@dataclasses.dataclass
class Config:
    """What the headline run measures and how (see :func:`make_config`)."""

    device: torch.device
    smoke: bool
    amp: Optional[torch.dtype]  # autocast dtype of the training step (None: fp32)
    dtype: torch.dtype  # inference and kernel dtype
    batch: int
    sn_models: List[Tuple[str, Callable[[], torch.nn.Module]]]
    archs: List[Tuple[str, Callable[[], torch.nn.Module], Sequence[str], Sequence[int]]]
    kernel_shape: Dict[str, object]
    step_warmup: int
    step_rep: int
    warmup: int
    rep: int
    compile_backend: str
    budget_s: Optional[float]
    started: float = dataclasses.field(default_factory=time.monotonic)

    def over_budget(self) -> Optional[str]:
        """An error text when the time budget is used up (None while time is left)."""
        if self.budget_s is None:
            return None
        used = time.monotonic() - self.started
        if used > self.budget_s:
            return f"not run: the time budget of {self.budget_s:.0f} s was used up ({used:.0f} s elapsed)"
        return None


def _smoke_vit(depth: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10)

    return build


def make_config(device: torch.device, smoke: bool = False, budget_s: Optional[float] = None,
                amp: Optional[str] = "auto") -> Config:
    """The headline configuration for ``device`` (``smoke``: tiny shapes and few calls).

    Args:
        device: where to run.
        smoke: tiny models and shapes, 1 warm-up and 2 timed calls (a harness check).
        budget_s: time budget in seconds (None: unbounded).
        amp: autocast dtype of the training step: "bf16", "fp16", "none" or "auto" (bf16 on CUDA; none in CPU smoke
            runs).
    """
    from spvit.models.registry import SHIPPED

    amp_map = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp == "auto" or amp is None:
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    elif amp in amp_map:
        amp_dtype = amp_map[amp]
    else:
        raise ValueError(f"amp must be one of auto, bf16, fp16, none; got {amp!r}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if smoke:
        return Config(
            device=device, smoke=True, amp=amp_dtype, dtype=dtype, batch=2,
            sn_models=[("smoke_vit", _smoke_vit(1))],
            archs=[("smoke_spvit", _smoke_vit(2), ["3x3", "msa"], [100, 37])],
            kernel_shape=dict(label="smoke", B=2, grid=(4, 4), C=32, heads=2, d=16, F=64, F_pruned=37),
            step_warmup=1, step_rep=2, warmup=1, rep=2, compile_backend=compile_backend(device, smoke=True),
            budget_s=budget_s)
    archs = []
    for label, name in (("spvit_deit_b_l008_t60", "spvit_deit_base_patch16_224"),
                        ("spvit_deit_s", "spvit_deit_small_patch16_224")):
        base_name, choices, widths = SHIPPED[name]
        archs.append((label, sn_bench.timm_factory(base_name), choices, widths))
    return Config(
        device=device, smoke=False, amp=amp_dtype, dtype=dtype, batch=256,
        sn_models=[("deit_base_patch16_224", sn_bench.timm_factory("deit_base_patch16_224")),
                   ("deit_small_patch16_224", sn_bench.timm_factory("deit_small_patch16_224"))],
        archs=archs,
        kernel_shape=dict(label="deit_b", B=256, grid=(14, 14), C=768, heads=12, d=64, F=3072, F_pruned=1118),
        step_warmup=3, step_rep=10, warmup=5, rep=20, compile_backend=compile_backend(device, smoke=False),
        budget_s=budget_s)


# ------------------------------------------------------------------------------------------------------------ sections
def section_peaks(cfg: Config) -> List[Dict]:
    p = measure_peaks(cfg.device, smoke=cfg.smoke)
    return [{"what": f"GEMM {p['gemm_n']}^3 {p['gemm_dtype']}", "ms": p["gemm_ms"], "TFLOP/s": p["peak_tflops"],
             "GB/s": None, "error": ""},
            {"what": f"device-to-device copy {p['copy_mib']:.0f} MiB", "ms": p["copy_ms"], "TFLOP/s": None,
             "GB/s": p["peak_gbs"], "error": ""}]


def section_supernet_step(cfg: Config, only: Optional[int] = None) -> List[Dict]:
    """Rows of the training-step providers for every model of ``cfg.sn_models`` (or only the one at index ``only``)."""
    rows = []
    for label, factory in cfg.sn_models if only is None else cfg.sn_models[only:only + 1]:
        for prov in SN_PROVIDERS:
            t0 = time.perf_counter()
            late = cfg.over_budget()
            if late:
                row = {"model": label, "batch": cfg.batch, "provider": prov, "error": late}
            else:
                row = sn_bench.measure(label, factory, prov, cfg.batch, cfg.device, cfg.amp, cfg.step_warmup,
                                       cfg.step_rep, backend=cfg.compile_backend)
            row["wall_s"] = time.perf_counter() - t0
            _print_row("supernet_step", row, ("model", "provider"))
            rows.append(row)
    return rows


def _infer_row(label: str, prov: str, fn: Callable, x: torch.Tensor, cfg: Config, gflops: float) -> Dict:
    row: Dict = {"arch": label, "batch": x.shape[0], "dtype": str(cfg.dtype).replace("torch.", ""), "provider": prov,
                 "first_call_s": None, "ms": None, "ms_p20": None, "ms_p80": None, "img_s": None, "gflops": gflops,
                 "peak_mem_mb": None, "graphs": None, "graph_breaks": None, "error": ""}
    dev = cfg.device
    with torch.inference_mode():
        row["first_call_s"] = first_call_s(lambda: fn(x), dev)
        if prov.endswith("compiled"):
            row.update(compile_stats())
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = bench_fn(lambda: fn(x), dev, warmup=cfg.warmup, rep=cfg.rep)
        if dev.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    row.update({"ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "img_s": x.shape[0] / t["ms"] * 1e3})
    return row


def section_inference(cfg: Config, only: Optional[int] = None) -> List[Dict]:
    """Rows of the inference providers for every architecture of ``cfg.archs`` (or only the one at index ``only``)."""
    import spvit
    import spvit_kernels as K
    from bench.bench_deploy_e2e import build_from_spec

    rows = []
    dev = cfg.device
    for label, factory, choices, widths in cfg.archs if only is None else cfg.archs[only:only + 1]:
        late = cfg.over_budget()
        if late:
            rows += [{"arch": label, "provider": p, "error": late} for p in INFER_PROVIDERS]
            continue
        try:
            torch.manual_seed(0)
            dense, pruned, deployed = build_from_spec(factory(), choices, widths, dev, cfg.dtype)
            gf_model, gf_dense = spvit.gflops(pruned), spvit.gflops(dense)
            sig = deployed.signature
            x = torch.randn(cfg.batch, sig.in_chans, *sig.img_size, device=dev, dtype=cfg.dtype)
            impl = ",".join(f"{op}={K.backend_of(op, dev)}" for op in ("deploy_conv", "pruned_ffn"))
        except Exception as exc:  # noqa: BLE001 - recorded; the run's status is failed
            rows += [{"arch": label, "provider": p, "error": f"building the models: {error_text(exc)}"}
                     for p in INFER_PROVIDERS]
            continue
        targets = {"deployed": deployed, "pruned": pruned, "dense": dense}
        item_rows = []
        for prov in INFER_PROVIDERS:
            t0 = time.perf_counter()
            late = cfg.over_budget()
            if late:
                row = {"arch": label, "provider": prov, "error": late}
            else:
                try:
                    model = targets[prov.replace("_compiled", "")]
                    fn = fresh_compile(model, cfg.compile_backend) if prov.endswith("_compiled") else model
                    row = _infer_row(label, prov, fn, x, cfg, gf_dense if prov.startswith("dense") else gf_model)
                except Exception as exc:  # noqa: BLE001
                    row = {"arch": label, "provider": prov, "error": error_text(exc)}
                finally:
                    fn = None
                    free_memory(dev)
            row.update({"impl": impl if prov.startswith("deployed") else "", "flops_ratio": gf_dense / gf_model,
                        "wall_s": time.perf_counter() - t0})
            _print_row("inference", row, ("arch", "provider"))
            item_rows.append(row)
        # after the timings (so that the deployed model's first call above holds its Triton JIT and autotuning):
        # the deployed model must compute what the pruned model computes
        try:
            with torch.inference_mode():
                err = (deployed(x).float() - pruned(x).float()).abs().max().item()
        except Exception as exc:  # noqa: BLE001
            err, why = None, f"deployed vs pruned check failed: {error_text(exc)}"
        else:
            why = "" if math.isfinite(err) else f"deployed output differs from the pruned model's (max error {err})"
        for row in item_rows:
            if row["provider"].startswith("deployed"):
                row["max_abs_err_vs_pruned"] = err
                if why and not row.get("error"):
                    row["error"] = why
        rows += item_rows
        del targets, dense, pruned, deployed, x
        free_memory(dev)
    torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------------------------------- kernels
@dataclasses.dataclass
class KernelCase:
    """One op at one shape and mode, with its work model and the implementations to time."""

    op: str
    case: str
    mode: str  # forward | backward
    train: bool  # forward recorded for autograd (search / fine-tune ops) rather than under inference_mode
    backends: Tuple[str, ...]
    make: Callable[[], Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]]  # -> (forward call, leaves)
    flops: float
    nbytes: Optional[float]


def _kernel_cases(cfg: Config) -> List[KernelCase]:
    from bench.bench_deploy_conv import roofline as deploy_conv_model
    from bench.bench_gated_attn_conv import GATES, _model as attn_model
    from bench.bench_masked_ffn import gemm_flops as masked_flops
    from bench.bench_shift_sum import _bytes as shift_bytes
    from spvit_kernels import ops
    from spvit_kernels.reference import BNState

    s = cfg.kernel_shape
    dev, dt = cfg.device, cfg.dtype
    b, grid, c, h, d = s["B"], s["grid"], s["C"], s["heads"], s["d"]
    p = grid[0] * grid[1]
    n = p + 1
    elem = torch.finfo(dt).bits // 8
    label = s["label"]

    def rnd(*shape, scale=1.0, grad=False, dtype=None):
        t = (torch.randn(*shape, device=dev) * scale).to(dtype or dt)
        return t.requires_grad_() if grad else t

    cases: List[KernelCase] = []
    # gated_attn_conv: search mode, training, gates that need a gradient (every candidate evaluated)
    for choice in ("msa", "3x3", "1x1"):
        for mode in ("forward", "backward"):
            def make(choice=choice):
                grad = True  # the training forward records the graph (and saves what the backward needs)
                hd = h * d
                x = rnd(b, n, c, grad=grad)
                params = [rnd(2 * hd, c, scale=c ** -0.5, grad=grad), rnd(2 * hd, scale=0.1, grad=grad),
                          rnd(hd, c, scale=c ** -0.5, grad=grad), rnd(hd, scale=0.1, grad=grad),
                          rnd(c, hd, scale=c ** -0.5, grad=grad), rnd(c, scale=0.1, grad=grad),
                          (1 + 0.02 * torch.randn(h, 9, device=dev)).requires_grad_(grad)]
                bns = [BNState(torch.ones(d, device=dev, requires_grad=grad), torch.zeros(d, device=dev,
                               requires_grad=grad), torch.zeros(d, device=dev), torch.ones(d, device=dev))
                       for _ in range(2)]
                gates = torch.tensor(GATES[choice], device=dev, requires_grad=True)
                leaves = [x, *params, gates] + ([bn.weight for bn in bns] + [bn.bias for bn in bns] if grad else [])

                def call():
                    return ops.gated_attn_conv(x, *params[:6], params[6], bns[0], bns[1], gates, num_heads=h,
                                               alpha=0.01, grid=grid, training=True, num_prefix_tokens=1)
                return call, [t for t in leaves if t.requires_grad]
            flops, nbytes = attn_model(b, n, c, h, d, 1, choice, mode, elem)
            cases.append(KernelCase("gated_attn_conv", f"{label} {choice}", mode, True, ("triton", "eager"), make,
                                    flops, nbytes))
    # masked_ffn: search-mode FFN, half the units masked
    f = s["F"]
    for mode in ("forward", "backward"):
        def make():
            grad = True
            args = [rnd(b, n, c, grad=grad), rnd(f, c, scale=c ** -0.5, grad=grad), rnd(f, scale=0.1, grad=grad),
                    rnd(c, f, scale=f ** -0.5, grad=grad), rnd(c, scale=0.1, grad=grad),
                    (torch.rand(f, device=dev) < 0.5).float().requires_grad_(grad)]
            return (lambda: ops.masked_ffn(*args)), [a for a in args if a.requires_grad]
        cases.append(KernelCase("masked_ffn", f"{label} F={f}", mode, True, ("triton", "eager"), make,
                                masked_flops(b, n, c, f, mode), None))
    # pruned_ffn: deployed compact FFN (inference)
    fp = s["F_pruned"]

    def make_pruned():
        args = [rnd(b, n, c), rnd(fp, c, scale=c ** -0.5), rnd(fp, scale=0.1), rnd(c, fp, scale=fp ** -0.5),
                rnd(c, scale=0.1)]
        return (lambda: ops.pruned_ffn(*args)), []
    cases.append(KernelCase("pruned_ffn", f"{label} F={fp}", "forward", False, ("triton", "eager"), make_pruned,
                            4.0 * b * n * c * fp, elem * (2 * b * n * c + 2 * c * fp + fp + c)))
    # deploy_conv: deployed 3x3 and 1x1 layers (inference)
    for t in (9, 1):
        def make_dc(t=t):
            args = [rnd(b, n, c), rnd(t * d, c, scale=c ** -0.5), rnd(d, scale=0.1), rnd(c, d, scale=d ** -0.5),
                    rnd(c, scale=0.1)]
            return (lambda: ops.deploy_conv(*args, grid, 1)), []
        rl = deploy_conv_model(b, c, t, elem, grid=grid, d=d)
        cases.append(KernelCase("deploy_conv", f"{label} T={t}", "forward", False, ("triton", "ext", "eager"), make_dc,
                                2e9 * rl["gmac"], 1e6 * rl["min_MB"]))
    # shift_sum: the folded depthwise step (memory-bound)
    for mode in ("forward", "backward"):
        def make_ss():
            planes, bias = rnd(b, p, 9, d, grad=True), rnd(d, grad=True)
            return (lambda: ops.shift_sum(planes, bias, grid, True)), [a for a in (planes, bias) if a.requires_grad]
        cases.append(KernelCase("shift_sum", f"{label} T=9", mode, True, ("ext", "triton", "eager"), make_ss,
                                float(b * p * 9 * d), float(shift_bytes("fwd" if mode == "forward" else "bwd", b, p, 9,
                                                                        d, elem))))
    return cases


def _kernel_row(case: KernelCase, backend: str, cfg: Config, peaks: Dict[str, float]) -> Dict:
    import spvit_kernels as K

    dev = cfg.device
    row: Dict = {"op": case.op, "case": case.case, "mode": case.mode, "provider": backend, "impl": "",
                 "dtype": str(cfg.dtype).replace("torch.", ""), "first_call_s": None, "ms": None, "ms_p20": None,
                 "ms_p80": None, "TFLOP/s": None, "GB/s": None, "bound": "", "frac_of_peak": None, "note": "",
                 "error": ""}
    if backend == "triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        row["note"] = "skipped: Triton on CPU tensors needs TRITON_INTERPRET=1"
        return row
    with K.use_backend(backend):
        impl = K.backend_of(case.op, dev)
        row["impl"] = impl
        if impl != backend:
            why = f"{backend} implementation of {case.op} not available here (resolves to {impl})"
            if dev.type == "cuda" or backend == "eager":
                row["error"] = why
            else:  # Triton on CPU without the interpreter, or a CPU-only build without the extension
                row["note"] = "skipped: " + why
            return row
        call, leaves = case.make()
        if case.mode == "forward":
            def fwd():
                if case.train:  # the training forward: the graph is recorded, then dropped with the output
                    return call()
                with torch.inference_mode():
                    return call()
            row["first_call_s"] = first_call_s(fwd, dev)
            t = bench_fn(fwd, dev, warmup=cfg.warmup, rep=cfg.rep, flush_l2=True)
        else:
            def make_out():
                for leaf in leaves:
                    leaf.grad = None
                return call()

            def once():
                out = make_out()
                out.backward(torch.ones_like(out))
            row["first_call_s"] = first_call_s(once, dev)
            t = bench_backward(make_out, dev, warmup=cfg.warmup, rep=cfg.rep, flush_l2=True)
    sec = t["ms"] * 1e-3
    tflops = case.flops / sec / 1e12
    gbs = case.nbytes / sec / 1e9 if case.nbytes else None
    ridge = peaks["peak_tflops"] * 1e12 / (peaks["peak_gbs"] * 1e9)
    compute_bound = case.nbytes is None or case.flops / case.nbytes > ridge
    row.update({"ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "TFLOP/s": tflops, "GB/s": gbs,
                "bound": "compute" if compute_bound else "memory",
                "frac_of_peak": tflops / peaks["peak_tflops"] if compute_bound else gbs / peaks["peak_gbs"]})
    return row


def section_kernels(cfg: Config) -> List[Dict]:
    peaks = measure_peaks(cfg.device, smoke=cfg.smoke)
    rows = []
    torch.manual_seed(0)
    for case in _kernel_cases(cfg):
        for backend in case.backends:
            t0 = time.perf_counter()
            late = cfg.over_budget()
            if late:
                row = {"op": case.op, "case": case.case, "mode": case.mode, "provider": backend, "error": late}
            else:
                try:
                    row = _kernel_row(case, backend, cfg, peaks)
                except Exception as exc:  # noqa: BLE001
                    row = {"op": case.op, "case": case.case, "mode": case.mode, "provider": backend,
                           "error": error_text(exc)}
                finally:
                    free_memory(cfg.device)
            row["wall_s"] = time.perf_counter() - t0
            _print_row("kernels", row, ("op", "case", "mode", "provider"))
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------- reporting
def _print_row(section: str, row: Dict, keys: Sequence[str]) -> None:
    head = " ".join(str(row.get(k, "")) for k in keys)
    if row.get("error"):
        msg = f"ERROR {row['error']}"
    elif row.get("note"):
        msg = row["note"]
    else:
        parts = []
        for k, fmt in (("img_s", "{:.1f} img/s"), ("ms", "{:.3f} ms"), ("TFLOP/s", "{:.1f} TFLOP/s"),
                       ("GB/s", "{:.0f} GB/s"), ("frac_of_peak", "{:.0%} of peak"), ("peak_mem_mb", "peak {:.0f} MiB"),
                       ("first_call_s", "first call {:.1f} s")):
            if row.get(k) is not None:
                parts.append(fmt.format(row[k]))
        msg = ", ".join(parts)
    print(f"[headline:{section}] {head}: {msg}", flush=True)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def targets(results: Dict[str, List[Dict]]) -> List[Dict]:
    """The performance targets checked against this run's rows (met / not met / not measured)."""
    out: List[Dict] = []

    def add(what: str, value: Optional[float], op: str, bound: float) -> None:
        if value is None:
            status = "not measured"
        else:
            status = "met" if (value >= bound if op == ">=" else value <= bound) else "NOT met"
        out.append({"target": what, "value": value, "bound": f"{op} {bound}", "status": status})

    sn = {(r.get("model"), r.get("provider")): r for r in results.get("supernet_step", []) if not r.get("error")}
    for model in dict.fromkeys(m for m, _ in sn):
        fused = sn.get((model, "fused"), {})
        eager = sn.get((model, "eager"), {})
        comp = sn.get((model, "eager_compiled"), {})
        floor = sn.get((model, "timm_compiled"), {})
        add(f"{model} step: fused / eager img/s", _ratio(fused.get("img_s"), eager.get("img_s")), ">=", 2.0)
        add(f"{model} step: fused / compiled eager img/s", _ratio(fused.get("img_s"), comp.get("img_s")), ">=", 1.3)
        add(f"{model} step: fused / eager peak memory", _ratio(fused.get("peak_mem_mb"), eager.get("peak_mem_mb")),
            "<=", 1.0)
        add(f"{model} step: fused time / compiled timm time", _ratio(floor.get("img_s"), fused.get("img_s")), "<=",
            1.35)
    inf = {(r.get("arch"), r.get("provider")): r for r in results.get("inference", []) if not r.get("error")}
    for arch in dict.fromkeys(a for a, _ in inf):
        for prov in ("deployed", "deployed_compiled"):
            ips = inf.get((arch, prov), {}).get("img_s")
            add(f"{arch}: {prov} / compiled dense img/s", _ratio(ips, inf.get((arch, "dense_compiled"), {})
                                                                 .get("img_s")), ">=", 1.9)
            add(f"{arch}: {prov} / compiled pruned img/s", _ratio(ips, inf.get((arch, "pruned_compiled"), {})
                                                                  .get("img_s")), ">=", 1.2)
    return out


MD_COLS = {
    "peaks": ["what", "ms", "TFLOP/s", "GB/s", "error"],
    "supernet_step": ["model", "batch", "amp", "provider", "impl", "img_s", "ms", "peak_mem_mb", "first_call_s",
                      "graphs", "graph_breaks", "error"],
    "inference": ["arch", "batch", "dtype", "provider", "img_s", "ms", "gflops", "flops_ratio", "peak_mem_mb",
                  "first_call_s", "graphs", "graph_breaks", "max_abs_err_vs_pruned", "error"],
    "kernels": ["op", "case", "mode", "provider", "impl", "ms", "TFLOP/s", "GB/s", "bound", "frac_of_peak",
                "first_call_s", "note", "error"],
}


def write_summary(results: Dict[str, List[Dict]], cfg: Config, out: str, section_s: Dict[str, float]) -> str:
    """``headline.md`` (every table, the targets) and ``headline.json`` (rows, targets, environment) in ``out``."""
    env = env_info(cfg.device)
    tg = targets(results)
    errors = sum(len(error_rows(r)) for r in results.values())
    lines = [f"# Headline benchmark{' (smoke run: not a measurement)' if cfg.smoke else ''}", "",
             f"{env['device']}; driver {env['driver'] or 'n/a'}; torch {env['torch']}, triton {env['triton']}, "
             f"timm {env['timm']}, CUDA {env['cuda']}; {env['date']} (run {env['run_id']}); batch {cfg.batch}, "
             f"amp {cfg.amp}, dtype {cfg.dtype}, torch.compile backend {cfg.compile_backend}.", "",
             f"Status: {'FAILED' if errors else 'ok'} ({errors} error rows); section wall times: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in section_s.items()), ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", markdown_table(rows, [c for c in MD_COLS.get(name, []) if any(c in r for r in rows)]
                                                   or None)]
    lines += ["## Targets", "", markdown_table(tg) if tg else "(nothing measured)\n"]
    path = os.path.join(out, "headline.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    with open(os.path.join(out, "headline.json"), "w") as fh:
        json.dump({"env": env, "smoke": cfg.smoke, "section_s": section_s, "error_rows": errors, "targets": tg,
                   "results": results}, fh, indent=1, default=str)
    return path


def plan(cfg: Config, sections: Sequence[str]) -> List[Tuple[str, Optional[int]]]:
    """Order of the work: (section, model index or None). The DeiT-B items (first in ``cfg``) of the supernet step and
    of inference come before the DeiT-S ones, so that a run cut short by its budget has the most important rows."""
    items: List[Tuple[str, Optional[int]]] = []
    if "peaks" in sections:
        items.append(("peaks", None))
    for i in range(max(len(cfg.sn_models), len(cfg.archs))):
        if "supernet_step" in sections and i < len(cfg.sn_models):
            items.append(("supernet_step", i))
        if "inference" in sections and i < len(cfg.archs):
            items.append(("inference", i))
    if "kernels" in sections:
        items.append(("kernels", None))
    return items


def run(cfg: Config, out: str, sections: Optional[Sequence[str]] = None) -> Tuple[Dict[str, List[Dict]], int]:
    """Run the headline sections into ``out`` (in the order of :func:`plan`; each section's files are rewritten after
    each of its items); returns (rows per section, number of error rows)."""
    sections = list(sections or SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown headline sections {unknown}; expected some of {SECTIONS}")
    os.makedirs(out, exist_ok=True)
    env = env_info(cfg.device)
    fns = {"peaks": section_peaks, "supernet_step": section_supernet_step, "inference": section_inference,
           "kernels": section_kernels}
    results: Dict[str, List[Dict]] = {}
    section_s: Dict[str, float] = {}
    for name, index in plan(cfg, sections):
        t0 = time.perf_counter()
        what = name if index is None else f"{name} [{index}]"
        print(f"[headline] {what} ...", flush=True)
        try:
            rows = fns[name](cfg) if index is None else fns[name](cfg, only=index)
        except Exception as exc:  # noqa: BLE001 - a section that breaks is one error row; the others still run
            rows = [{"error": f"section {what} failed: {error_text(exc)}"}]
            print(f"[headline:{name}] ERROR {rows[0]['error']}", flush=True)
        section_s[name] = section_s.get(name, 0.0) + time.perf_counter() - t0
        results.setdefault(name, []).extend({**r, **env} for r in rows)
        _write_section(name, results[name], out)
        print(f"[headline] {what}: {len(rows)} rows, {len(error_rows(rows))} errors, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        write_summary(results, cfg, out, section_s)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    return results, sum(len(error_rows(r)) for r in results.values())


def _write_section(name: str, rows: List[Dict], out: str) -> None:
    """headline_<name>.{csv,json,md} with this run's rows so far (earlier runs' CSV rows are kept)."""
    write_rows(f"headline_{name}", rows, out, cols=MD_COLS.get(name), title=f"headline: {name}",
               replace_run=rows[0]["run_id"] if rows else None)
