"""Ahead-of-time compile check of every Triton kernel for real NVIDIA targets (no GPU needed).

The CPU test-suite runs the kernels under ``TRITON_INTERPRET=1``, which accepts programs the real compiler rejects
(``tl.dot`` dimensions < 16, mixed ``tl.dot`` operand dtypes, non-power-of-2 ``tl.arange``, too much shared memory,
...). This script compiles each kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` --
the full pipeline down to a cubin by ``ptxas`` -- for the block sizes / constexpr combinations the CUDA launchers
actually use (taken from the launcher helpers themselves where they exist: ``gated_attn_conv.launch.tile_block_p``
and ``row_block_p``, ``_gemm.blocks``, ``shift_sum._blocks``, the ``deploy_conv`` autotune configs) at DeiT-Ti/S/B-like
shapes and a few other head dims, in fp32 / bf16 / fp16.

Argument specialisation mimics the JIT launcher: pointers get ``tt.divisibility=16`` (PyTorch allocations are
16-byte aligned), integer arguments equal to 1 become constexpr 1, and integers divisible by 16 get the divisibility
hint, using the values a DeiT-like launch would pass.

Per compiled kernel the table gives registers per thread, spill stores/loads and stack frame (from the ``ptxas -v``
log of the compile), and the shared memory Triton allocates (``compiled.metadata.shared``; it is checked against the
architecture's per-block opt-in limit). ``compiled.n_regs`` / ``n_spills`` only exist once a kernel is loaded on a
device, hence the ptxas log.

Usage::

    python bench/check_triton_compile.py --out DIR [--archs 90,80] [--only deploy_conv] [--quick]

writes the full table ``DIR/<name>.csv`` (one row per kernel, shape, dtype, config and architecture) and its short
form ``DIR/<name>_summary.md`` (per kernel and dtype: registers, spills, shared memory; the summaries of the
committed runs are in bench/results/)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Tuple

# Real compiler, never the interpreter; log every ptxas run (register / spill counts); fresh cache (every config is
# really compiled, and the ptxas log is produced).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="spvit_triton_aot_"))

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.common import write_rows  # noqa: E402
import importlib  # noqa: E402

dc_mod = importlib.import_module("spvit_kernels.deploy_conv")
gac = importlib.import_module("spvit_kernels.gated_attn_conv.kernels")
gac_launch = importlib.import_module("spvit_kernels.gated_attn_conv.launch")
mf = importlib.import_module("spvit_kernels.masked_ffn")
gemm = importlib.import_module("spvit_kernels._gemm")
ss = importlib.import_module("spvit_kernels.shift_sum")

# Per-block shared memory a kernel may use (opt-in maximum), bytes.
MAX_SMEM = {90: 232448, 89: 101376, 86: 101376, 80: 166912}
TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# DeiT-like layer shapes: (name, heads, head_dim, C). Ti/S/B have d = 64; the rest cover head_dim 32/96/128.
MODELS = [("deit_ti", 3, 64, 192), ("deit_s", 6, 64, 384), ("deit_b", 12, 64, 768),
          ("h12_d32", 12, 32, 384), ("h8_d96", 8, 96, 768), ("h6_d128", 6, 128, 768)]
BATCH, GH, GW, PREFIX = 64, 14, 14, 1
P = GH * GW
N_TOK = PREFIX + P


class Case:
    """One kernel instantiation: kernel, argument types/values, constexprs, launch options."""

    def __init__(self, kernel_name: str, fn, label: str, dtype: str, args: Dict[str, object],
                 constexprs: Dict[str, object], num_warps: int = 4, num_stages: int = 3, autotuned: bool = False):
        self.kernel_name = kernel_name
        self.fn = fn
        self.label = label
        self.dtype = dtype
        self.args = args  # name -> "*fp32" (pointer) or ("i32", value)
        self.constexprs = constexprs
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.autotuned = autotuned

    def source(self) -> ASTSource:
        fn = self.fn
        signature: Dict[str, str] = {}
        constexprs: Dict[str, object] = {}
        attrs: Dict[Tuple[int, ...], list] = {}
        missing = [a for a in fn.arg_names if a not in self.args and a not in self.constexprs]
        extra = [a for a in list(self.args) + list(self.constexprs) if a not in fn.arg_names]
        if missing or extra:
            raise TypeError(f"{fn.__name__}: arguments missing {missing}, unknown {extra}")
        for i, name in enumerate(fn.arg_names):
            if name in self.constexprs:
                signature[name] = "constexpr"
                constexprs[name] = self.constexprs[name]
                continue
            spec = self.args[name]
            if isinstance(spec, str):  # pointer: torch allocations are 16-byte aligned
                signature[name] = spec
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                ty, val = spec
                if val == 1:  # the JIT turns an integer 1 into a constexpr
                    signature[name] = "constexpr"
                    constexprs[name] = 1
                else:
                    signature[name] = ty
                    if val % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)

    def config_str(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        parts.append(f"w{self.num_warps}s{self.num_stages}")
        return " ".join(parts)


def i32(v: int):
    return ("i32", int(v))


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---------------------------------------------------------------------------------------------------------------------
# gated_attn_conv: every launcher in spvit_kernels/gated_attn_conv/launch.py uses the JIT defaults (4 warps, 3 stages).
# ---------------------------------------------------------------------------------------------------------------------
def gac_cases(quick: bool) -> List[Case]:
    cases: List[Case] = []
    models = MODELS[:3] if quick else MODELS
    for mname, h, d, _c in models:
        bh, bd = _pow2(h), _pow2(d)
        bp = gac_launch.tile_block_p(bh, bd)
        for dt in DTYPES:
            ty = TY[dt]
            u_args = dict(stride_ub=i32(N_TOK * h * d), stride_un=i32(h * d))
            # forward: training (both candidates + stats), eval compute_all (no stats), single live candidates
            for do3, do1, stats in ((True, True, True), (True, True, False), (True, False, False),
                                    (False, True, False)):
                cases.append(Case(
                    "gac_conv_fwd", gac._gated_attn_conv_fwd_kernel, mname, ty,
                    dict(u_ptr=f"*{ty}", m_ptr="*fp32", c_ptr="*fp32", y3_ptr="*fp32", y1_ptr="*fp32",
                         st3_ptr="*fp32", st1_ptr="*fp32", P=i32(P), GH=i32(GH), GW=i32(GW), H=i32(h), D=i32(d),
                         PREFIX=i32(PREFIX), CENTER=i32(4), **u_args),
                    dict(BLOCK_P=bp, BLOCK_H=bh, BLOCK_D=bd, DO3=do3, DO1=do1, STATS=stats)))
            # backward of the live conv candidate: dr is fp32 (from _mm_f32), u/du in the input dtype
            for kind3 in (True, False):
                cases.append(Case(
                    "gac_conv_bwd", gac._gated_attn_conv_bwd_kernel, mname, ty,
                    dict(dr_ptr="*fp32", y_ptr="*fp32", chan_ptr="*fp32", u_ptr=f"*{ty}", m_ptr="*fp32",
                         du_ptr=f"*{ty}", dm_ptr="*fp32", dc_ptr="*fp32", stride_rb=i32(N_TOK * 2 * d),
                         stride_rn=i32(2 * d), N=i32(N_TOK), P=i32(P), GH=i32(GH), GW=i32(GW), H=i32(h), D=i32(d),
                         PREFIX=i32(PREFIX), CENTER=i32(4), **u_args),
                    dict(BLOCK_P=bp, BLOCK_H=bh, BLOCK_D=bd, KIND3=kind3)))
    # elementwise kernels depend on d only
    dims = sorted({d for _, _, d, _ in models})
    for d in dims:
        bd = _pow2(d)
        bp = gac_launch.row_block_p(bd)
        for dt in DTYPES:
            ty = TY[dt]
            cases.append(Case(
                "gac_bn_relu", gac._gated_attn_conv_bn_relu_kernel, f"d{d}", ty,
                dict(y_ptr="*fp32", chan_ptr="*fp32", r_ptr=f"*{ty}", P=i32(P), N=i32(N_TOK), D=i32(d),
                     PREFIX=i32(PREFIX)),
                dict(BLOCK_P=bp, BLOCK_D=bd)))
        cases.append(Case(  # dr is a column slice of the fp32 (B, N, k*d) GEMM output
            "gac_bn_bwd_stats", gac._gated_attn_conv_bn_bwd_stats_kernel, f"d{d}", "fp32",
            dict(dr_ptr="*fp32", y_ptr="*fp32", chan_ptr="*fp32", part_ptr="*fp32", stride_rb=i32(N_TOK * 2 * d),
                 stride_rn=i32(2 * d), P=i32(P), D=i32(d), PREFIX=i32(PREFIX)),
            dict(BLOCK_P=bp, BLOCK_D=bd)))
    for dt in DTYPES:
        ty = TY[dt]
        cases.append(Case(
            "gac_dot", gac._gated_attn_conv_dot_kernel, "n=B*N*C", ty,
            dict(a_ptr=f"*{ty}", b_ptr=f"*{ty}", part_ptr="*fp32", n=i32(BATCH * N_TOK * 384)),
            dict(BLOCK=4096)))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# masked_ffn / pruned_ffn: launchers use _gemm.blocks(cuda device, dtype).
# ---------------------------------------------------------------------------------------------------------------------
def ffn_cases(quick: bool) -> List[Case]:
    cases: List[Case] = []
    cuda = torch.device("cuda")
    m_rows = BATCH * N_TOK
    shapes = [("deit_s", 384, 1536), ("deit_b", 768, 3072)]
    if not quick:
        shapes.append(("pruned_s", 384, 1118))  # awkward pruned hidden width (pruned_ffn)
    precisions = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False), (torch.float16, False)]
    for sname, c, f in shapes:
        pruned = sname.startswith("pruned")
        f_pad = triton.cdiv(f, 64) * 64 if pruned else f  # pruned_ffn writes h with rows padded to 64
        for dt, tf32 in precisions:
            ty = TY[dt]
            cfg = gemm.blocks(cuda, dt)
            tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                         GROUP_M=cfg["GROUP_M"])
            bwd_cfg = gemm.blocks(cuda, dt, backward=True)
            # the pinned configs (SPVIT_AUTOTUNE=0), then, unless quick, every autotune config
            bwd_variants = [(dict(BLOCK_M=bwd_cfg["BLOCK_M"], BLOCK_F=bwd_cfg["BLOCK_N"], BLOCK_K=bwd_cfg["BLOCK_K"],
                                  GROUP_M=bwd_cfg["GROUP_M"]), bwd_cfg["num_warps"], bwd_cfg["num_stages"], False)]
            fwd_variants = [(tiles, cfg["num_warps"], cfg["num_stages"], False)]
            if not quick:
                fwd_variants += [(dict(a.kwargs), a.num_warps, a.num_stages, True) for a in gemm.FWD_CONFIGS]
                bwd_variants += [(dict(a.kwargs), a.num_warps, a.num_stages, True) for a in mf.BWD_CONFIGS]
            label = f"{sname}" + ("" if dt != torch.float32 else (" tf32" if tf32 else " ieee"))
            # fc1: bias + GELU (+ gate mask and saved pre-activation in search mode; neither when pruned)
            fc1_variants = [(1, not pruned, True)] if quick else \
                [(1, not pruned, True), (1, not pruned, False), (2, not pruned, True)]
            for (tiles, warps, stages, tuned), (act, has_mask, store_z) in (
                    (v, f) for v in fwd_variants for f in fc1_variants):
                if pruned:
                    store_z = False
                cases.append(Case(
                    "ffn_fwd(fc1)", gemm._linear_act_kernel, label, ty,
                    dict(x_ptr=f"*{ty}", w_ptr=f"*{ty}", b_ptr=f"*{ty}", mask_ptr="*fp32", out_ptr=f"*{ty}",
                         z_ptr=f"*{ty}", M=i32(m_rows), N=i32(f), K=i32(c), stride_xm=i32(c), stride_xk=i32(1),
                         stride_wn=i32(c), stride_wk=i32(1), stride_om=i32(f_pad), stride_on=i32(1)),
                    dict(ACT=act, HAS_BIAS=True, HAS_MASK=has_mask, STORE_Z=store_z,
                         PRECISION="tf32" if tf32 else "ieee", INTERPRET_BF16=False, **tiles),
                    num_warps=warps, num_stages=stages, autotuned=tuned))
            # fc2 on the Triton GEMM (masked_ffn_with_fc2(fc2="triton"), pruned_ffn default): no act, no mask
            for tiles, warps, stages, tuned in fwd_variants:
                cases.append(Case(
                    "ffn_fwd(fc2)", gemm._linear_act_kernel, label, ty,
                    dict(x_ptr=f"*{ty}", w_ptr=f"*{ty}", b_ptr=f"*{ty}", mask_ptr=f"*{ty}", out_ptr=f"*{ty}",
                         z_ptr=f"*{ty}", M=i32(m_rows), N=i32(c), K=i32(f), stride_xm=i32(f_pad), stride_xk=i32(1),
                         stride_wn=i32(f), stride_wk=i32(1), stride_om=i32(c), stride_on=i32(1)),
                    dict(ACT=0, HAS_BIAS=True, HAS_MASK=False, STORE_Z=False, PRECISION="tf32" if tf32 else "ieee",
                         INTERPRET_BF16=False, **tiles),
                    num_warps=warps, num_stages=stages, autotuned=tuned))
            if pruned:
                continue
            acts = (1,) if quick else (1, 2)
            for (tiles, warps, stages, tuned), act in ((v, a) for v in bwd_variants for a in acts):
                cases.append(Case(
                    "ffn_bwd", mf._masked_ffn_bwd_kernel, label, ty,
                    dict(dy_ptr=f"*{ty}", w2_ptr=f"*{ty}", z_ptr=f"*{ty}", mask_ptr="*fp32", dz_ptr=f"*{ty}",
                         h_ptr=f"*{ty}", part_ptr="*fp32", M=i32(m_rows), F=i32(f), C=i32(c)),
                    dict(ACT=act, PRECISION="tf32" if tf32 else "ieee", INTERPRET_BF16=False, **tiles),
                    num_warps=warps, num_stages=stages, autotuned=tuned))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# shift_sum (Triton provider): launchers use shift_sum._blocks(p, d) and the JIT defaults (4 warps, 3 stages).
# ---------------------------------------------------------------------------------------------------------------------
def shift_sum_cases(quick: bool) -> List[Case]:
    cases: List[Case] = []
    dims = (64,) if quick else (32, 64, 96, 128)
    dtypes = DTYPES if quick else DTYPES + (torch.float64,)
    for d in dims:
        block_p, block_d = ss._blocks(P, d)
        for dt in dtypes:
            ty = TY[dt]
            part_ty = "fp64" if dt == torch.float64 else "fp32"
            for t in (9, 1):
                # deploy path: bias + ReLU; double backward runs the forward without bias and ReLU
                for has_bias, relu in ((True, True), (False, False)):
                    if quick and not relu:
                        continue
                    cases.append(Case(
                        "shift_sum_fwd", ss._shift_sum_fwd_kernel, f"d{d} T{t}", ty,
                        dict(planes_ptr=f"*{ty}", bias_ptr=f"*{ty}", out_ptr=f"*{ty}", H=i32(GH), W=i32(GW),
                             D=i32(d)),
                        dict(T=t, HAS_BIAS=has_bias, RELU=relu, IS_FP64=dt == torch.float64, BLOCK_P=block_p,
                             BLOCK_D=block_d)))
                for relu in ((True,) if quick else (True, False)):
                    cases.append(Case(
                        "shift_sum_bwd", ss._shift_sum_bwd_kernel, f"d{d} T{t}", ty,
                        dict(grad_ptr=f"*{ty}", out_ptr=f"*{ty}", grad_planes_ptr=f"*{ty}",
                             partial_ptr=f"*{part_ty}", H=i32(GH), W=i32(GW), D=i32(d)),
                        dict(T=t, RELU=relu, BLOCK_P=block_p, BLOCK_D=block_d)))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# deploy_conv: the GPU path is the autotuned kernel; every autotune config is compiled (any may be picked).
# ---------------------------------------------------------------------------------------------------------------------
def deploy_conv_cases(quick: bool) -> List[Case]:
    cases: List[Case] = []
    tuned = dc_mod._deploy_conv_fwd_tuned
    fn = tuned.fn
    shapes = [("deit_s", 384, 64)] if quick else [("deit_s", 384, 64), ("deit_b", 768, 64), ("c384_d32", 384, 32),
                                                    ("c768_d128", 768, 128), ("c768_d256", 768, 256)]
    precisions = [(torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                  (torch.float32, "ieee")]
    for sname, c, d in shapes:
        block_d = max(16, _pow2(d))  # as deploy_conv()
        for dt, prec in precisions:
            ty = TY[dt]
            if quick and dt == torch.float16:
                continue
            for t in (9, 1):
                for cfg in tuned.configs:
                    cases.append(Case(
                        "deploy_conv_fwd", fn, f"{sname} T{t}" + (f" {prec}" if dt == torch.float32 else ""), ty,
                        dict(x_ptr=f"*{ty}", wp_ptr=f"*{ty}", bf_ptr="*fp32", wo_ptr=f"*{ty}", bo_ptr="*fp32",
                             out_ptr=f"*{ty}", NB=i32(BATCH), H=i32(GH), W=i32(GW), C=i32(c), D=i32(d),
                             PREFIX=i32(PREFIX),
                             stride_xb=i32(N_TOK * c), stride_xn=i32(c), stride_ob=i32(N_TOK * c),
                             stride_on=i32(c), B_BUCKET=i32(BATCH)),
                        dict(T=t, HAS_BOUT=True, DOT_PRECISION=prec, UPCAST=False, BLOCK_D=block_d,
                             **cfg.kwargs),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, autotuned=True))
    return cases


GROUPS = {"gated_attn_conv": gac_cases, "masked_ffn": ffn_cases, "shift_sum": shift_sum_cases,
          "deploy_conv": deploy_conv_cases}

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(log: str) -> Dict[str, Optional[int]]:
    out: Dict[str, Optional[int]] = {}
    for key, rx in _PTXAS_RE.items():
        vals = [int(v) for v in rx.findall(log)]
        out[key] = max(vals) if vals else None
    return out


def _compile(case: Case, cc: int) -> Dict[str, object]:
    """Compile one case for sm_<cc>; returns status, ptxas resource usage, shared memory, error, compile time."""
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        src = case.source()
        with contextlib.redirect_stdout(buf):  # ptxas -v log (TRITON_DUMP_PTXAS_LOG) and failure dumps
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        smem = int(compiled.metadata.shared)
        info = _parse_ptxas(buf.getvalue())
        status, err = "OK", ""
        if smem > MAX_SMEM.get(cc, 0):
            if case.autotuned:  # the autotuner catches OutOfResources and drops the config on such a device
                status, err = "OOR", f"shared memory {smem} B > {MAX_SMEM[cc]} B: autotune drops this config here"
            else:
                status, err = "FAIL", f"shared memory {smem} B > {MAX_SMEM[cc]} B per block on sm_{cc}"
        res = dict(status=status, regs=info["regs"], spill_st=info["spill_st"], spill_ld=info["spill_ld"],
                   stack=info["stack"], smem=smem, error=err)
    except Exception as exc:  # noqa: BLE001 - report every failure as a row
        msg = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        first = msg[0] if msg else ""
        # ptxas failures: the first line is generic, the useful one is the first "error" line of its log
        detail = next((ln for ln in msg if "error" in ln.lower() and ln is not first), "")
        text = f"{type(exc).__name__}: {first}" + (f" | {detail.strip()}" if detail else "")
        res = dict(status="FAIL", regs=None, spill_st=None, spill_ld=None, stack=None, smem=None,
                   error=text.replace("|", "/")[:400])
        if os.environ.get("CHECK_VERBOSE"):
            traceback.print_exc()
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    return res


_CASES: List[Case] = []  # read by the forked workers (cases hold JITFunctions, which do not pickle)


def _work(job: Tuple[int, int]) -> Tuple[int, int, Dict[str, object]]:
    idx, cc = job
    return idx, cc, _compile(_CASES[idx], cc)


def _key(case: Case, cc: int) -> str:
    """Identity of the binary: identical keys (e.g. shapes differing only in runtime ints) compile once."""
    return f"{case.source().hash()}-{case.num_warps}-{case.num_stages}-{cc}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True,
                    help="folder of the full table (<name>.csv) and its summary (<name>_summary.md)")
    ap.add_argument("--archs", default="90,80", help="compute capabilities, e.g. 90,80 (default)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {sorted(GROUPS)}")
    ap.add_argument("--quick", action="store_true", help="fewer shapes/variants (smoke run)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--name", default="triton_compile_sm90", help="result file name (without extension)")
    args = ap.parse_args(argv)

    archs = [int(a) for a in args.archs.split(",") if a]
    groups = args.only.split(",") if args.only else list(GROUPS)
    for g in groups:
        _CASES.extend(GROUPS[g](args.quick))
    jobs, first_of, keys = [], {}, {}
    for cc in archs:
        for i, case in enumerate(_CASES):
            k = _key(case, cc)
            keys[(i, cc)] = k
            if k not in first_of:
                first_of[k] = (i, cc)
                jobs.append((i, cc))
    print(f"triton {triton.__version__}: {len(_CASES)} kernel instantiations x archs {archs} = "
          f"{len(_CASES) * len(archs)} rows, {len(jobs)} distinct binaries, {args.jobs} processes; "
          f"cache {os.environ['TRITON_CACHE_DIR']}", flush=True)
    results: Dict[Tuple[int, int], Dict[str, object]] = {}
    t0 = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            it = pool.imap_unordered(_work, jobs)
            for n, (i, cc, res) in enumerate(it, 1):
                results[(i, cc)] = res
                _progress(n, len(jobs), _CASES[i], cc, res)
    else:
        for n, (i, cc) in enumerate(jobs, 1):
            res = _compile(_CASES[i], cc)
            results[(i, cc)] = res
            _progress(n, len(jobs), _CASES[i], cc, res)
    print(f"compiled {len(jobs)} binaries in {time.perf_counter() - t0:.0f}s", flush=True)

    rows = []
    for cc in archs:
        for i, case in enumerate(_CASES):
            src_i, src_cc = first_of[keys[(i, cc)]]
            res = dict(results[(src_i, src_cc)])
            same = "" if (src_i, src_cc) == (i, cc) else f"same binary as {_CASES[src_i].label}"
            if same:
                res["compile_s"] = 0.0
            rows.append(dict(kernel=case.kernel_name, shape=case.label, dtype=case.dtype, arch=f"sm_{cc}",
                             config=case.config_str(), **res, note=same))
    n_ok = sum(r["status"] == "OK" for r in rows)
    n_oor = sum(r["status"] == "OOR" for r in rows)
    print(f"\n{n_ok}/{len(rows)} rows compile OK, {n_oor} out of resources (autotune-skipped), "
          f"{len(rows) - n_ok - n_oor} FAIL", flush=True)
    for r in rows:
        if r["status"] != "OK":
            print(f"{r['status']} {r['arch']} {r['kernel']} {r['shape']} {r['dtype']} {r['config']}: {r['error']}")
    spilled = [r for r in rows if r["spill_st"]]
    print(f"{len(spilled)} rows spill registers")
    env = {"triton": triton.__version__, "torch": torch.__version__,
           "ptxas": os.path.relpath(str(triton.knobs.nvidia.ptxas.path), os.path.dirname(triton.__file__))}
    path = write_rows(args.name, [dict(r, **env) for r in rows], args.out, markdown=False)
    summary = os.path.join(args.out, f"{args.name}_summary.md")
    with open(summary, "w") as f:
        f.write(summary_md(rows, env))
    print(f"wrote {path} (the full table) and {summary}")
    return 0 if n_ok + n_oor == len(rows) else 1


def summary_md(rows: List[Dict[str, object]], env: Dict[str, str]) -> str:
    """The short form of the table: per architecture, kernel and dtype, the configs compiled (OK / out of resources /
    failed), registers per thread (min-max), the largest shared memory, and the configs that spill (the worst named)."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["kernel"], r["dtype"]), []).append(r)

    def num(v) -> int:
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return 0
    lines = [f"# Triton compile check: summary (triton {env.get('triton')}, torch {env.get('torch')}, "
             f"ptxas {env.get('ptxas')})", "",
             "Per architecture, kernel and dtype over every shape and config compiled. The full table (one row per "
             "shape and config) is written by `python bench/check_triton_compile.py --out DIR` (`DIR/<name>.csv`).",
             "", "| arch | kernel | dtype | rows | OK / OOR / FAIL | registers | max smem KiB | spilling rows | "
             "worst spill (st bytes, config, shape) |", "|---|---|---|---|---|---|---|---|---|"]
    for (arch, kernel, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "OK"]
        oor = sum(r["status"] == "OOR" for r in rs)
        regs = [num(r["regs"]) for r in ok] or [0]
        smem = max((num(r["smem"]) for r in ok), default=0) / 1024
        spill = [r for r in ok if num(r["spill_st"])]
        worst = max(spill, key=lambda r: num(r["spill_st"])) if spill else None
        lines.append(f"| {arch} | {kernel} | {dtype} | {len(rs)} | {len(ok)} / {oor} / {len(rs) - len(ok) - oor} | "
                     f"{min(regs)}-{max(regs)} | {smem:.0f} | {len(spill)} | "
                     + (f"{num(worst['spill_st'])}, `{worst['config']}`, {worst['shape']} |" if worst else "- |"))
    return "\n".join(lines) + "\n"


def _progress(n: int, total: int, case: Case, cc: int, res: Dict[str, object]) -> None:
    spill = "" if not res["spill_st"] else f" SPILL st={res['spill_st']} ld={res['spill_ld']}"
    print(f"[{n}/{total}] {res['status']:4s} sm_{cc} {case.kernel_name:16s} {case.label:18s} {case.dtype:4s} "
          f"regs={res['regs']} smem={res['smem']}{spill} {res['compile_s']}s  {case.config_str()}"
          + (f"\n       {res['error']}" if res["error"] else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
