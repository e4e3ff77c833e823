"""The benchmark cases: one table per op and per end-to-end job, shared by every user of the benchmarks.

The pytest-benchmark suite (``bench/test_kernels.py``, ``bench/test_e2e.py``), the headline selection
(``bench/headline.py``) and any other script that times the ops build their cases and inputs here, so that a shape,
a batch size or the construction of an input is written once.

Tiers (:func:`tier_of`): ``gpu`` (the real shapes: DeiT-Ti/S/B layers and the windowed layers of Swin-T/S, batch
64 and 256, bf16 plus one fp32 row per op; the deployed ops at batch 1 too), ``cpu`` (DeiT-Ti/S layers at small
batches, fp32: what a 2-core CPU can time in minutes) and ``smoke`` (tiny shapes: checks the harness, measures
nothing). Every case carries tags: ``headline`` (the rows the headline run needs: DeiT-B at batch 256 on a GPU) and
``lease`` (the short selection for a GPU check of a few minutes).

Use outside pytest::

    from bench import cases
    for case in cases.kernel_cases("cpu", tags={"headline"}):
        fn, leaves = cases.build(case, "eager", torch.device("cpu"))
        out = fn()

``select(name, tier)`` returns a named subset (``headline``, ``lease``, ``all``) of every table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch

TIERS = ("gpu", "cpu", "smoke")
OPS = ("gated_attn_conv", "masked_ffn", "pruned_ffn", "deploy_conv", "shift_sum")
PROVIDERS = ("triton", "ext", "eager", "compiled")  # triton_fc2_*: variants of the FFN kernels, run with triton
OP_PROVIDERS: Dict[str, Tuple[str, ...]] = {
    "gated_attn_conv": ("triton", "eager", "compiled"),
    "masked_ffn": ("triton", "triton_fc2_triton", "eager", "compiled"),
    "pruned_ffn": ("triton", "triton_fc2_cublas", "eager", "compiled"),
    "deploy_conv": ("triton", "ext", "eager", "compiled"),
    "shift_sum": ("triton", "ext", "eager", "compiled"),
}
# training ops have a backward (forward, backward alone, forward + backward); deployment ops are inference only
OP_MODES: Dict[str, Tuple[str, ...]] = {
    "gated_attn_conv": ("fwd", "bwd", "fwd+bwd"),
    "masked_ffn": ("fwd", "bwd", "fwd+bwd"),
    "shift_sum": ("fwd", "bwd", "fwd+bwd"),
    "pruned_ffn": ("fwd",),
    "deploy_conv": ("fwd",),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GATES = {"msa": (1.0, 1.0, 1.0), "3x3": (1.0, 1.0, 0.0), "1x1": (1.0, 0.0, 0.0)}

# layer shapes: ViT (C, heads, FFN width) with d = 64, N = 197 (14x14 + class token)
VIT = {"deit_ti": (192, 3, 768), "deit_s": (384, 6, 1536), "deit_b": (768, 12, 3072)}
# Swin-T and Swin-S share their layer shapes (they differ in depth): (C, heads, windows per image, bias groups G)
# stage 1: 56x56 tokens in 64 windows of 7x7, relative position bias only; stage 3: 14x14 in 4 windows, shifted
SWIN = {"swin_ts-s1": (96, 3, 64, 1), "swin_ts-s3": (384, 12, 4, 4)}
# published kept FFN widths of the deployed models (one per model; the aligned 1536 for comparison)
PRUNED_F = {"deit_ti": 489, "deit_s": 1118, "deit_b": 2234}


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape, batch and dtype.

    Attributes:
        op: the op (one of :data:`OPS`).
        shape: the model layer it stands for (``deit_s``, ``swin_ts-s3``, ``tiny``, ...).
        batch: images (windowed layers: rows = images x windows).
        dtype: ``bf16``, ``fp16`` or ``fp32``.
        dims: op-specific sizes (see :func:`make_inputs`).
        tags: named selections the case belongs to (``headline``, ``lease``).
    """

    op: str
    shape: str
    batch: int
    dtype: str
    dims: Tuple[Tuple[str, object], ...]
    tags: FrozenSet[str] = frozenset()

    @property
    def d(self) -> Dict[str, object]:
        return dict(self.dims)

    @property
    def id(self) -> str:
        extra = self.d.get("variant")
        return f"{self.op}-{self.shape}{'-' + str(extra) if extra else ''}-b{self.batch}-{self.dtype}"

    @property
    def group(self) -> str:
        """The pytest-benchmark group: op and shape (providers of one group are compared with each other)."""
        return self.id


def _case(op: str, shape: str, batch: int, dtype: str, tags: Iterable[str] = (), **dims) -> Case:
    return Case(op, shape, batch, dtype, tuple(sorted(dims.items())), frozenset(tags))


# ------------------------------------------------------------------------------------------------------------ tables
def _attn_cases(tier: str) -> List[Case]:
    out = []
    if tier == "smoke":
        out.append(_case("gated_attn_conv", "tiny", 2, "fp32", C=32, h=2, hd=16, grid=(4, 4), prefix=1, G=0,
                         alpha=0.01, variant="3x3"))
        out.append(_case("gated_attn_conv", "tiny_window", 2, "fp32", C=32, h=2, hd=16, grid=(3, 3), prefix=0, G=2,
                         alpha=100.0, windows=2, variant="msa"))
        return out
    models = ("deit_ti", "deit_s") if tier == "cpu" else tuple(VIT)
    batches = (8,) if tier == "cpu" else (64, 256)
    dt = "fp32" if tier == "cpu" else "bf16"
    for m in models:
        c, h, _ = VIT[m]
        for b in batches:
            for choice in ("msa", "3x3", "1x1"):
                tags = {"headline"} if (m == "deit_b" and b == 256) or (tier == "cpu" and m == "deit_s") else set()
                if tags and choice in ("msa", "3x3"):
                    tags.add("lease")
                out.append(_case("gated_attn_conv", m, b, dt, tags, C=c, h=h, hd=64, grid=(14, 14), prefix=1, G=0,
                                 alpha=0.01, variant=choice))
    if tier == "gpu":
        for s, (c, h, win, g) in SWIN.items():
            for choice in ("msa", "3x3"):
                out.append(_case("gated_attn_conv", s, 128, "bf16", C=c, h=h, hd=c // h, grid=(7, 7), prefix=0, G=g,
                                 alpha=100.0, windows=win, variant=choice))
        out.append(_case("gated_attn_conv", "deit_s", 64, "fp32", C=384, h=6, hd=64, grid=(14, 14), prefix=1, G=0,
                         alpha=0.01, variant="3x3"))
    return out


def _ffn_cases(op: str, tier: str) -> List[Case]:
    out = []
    pruned = op == "pruned_ffn"
    if tier == "smoke":
        return [_case(op, "tiny", 2, "fp32", N=17, C=32, F=37 if pruned else 64)]
    models = ("deit_ti", "deit_s") if tier == "cpu" else tuple(VIT)
    batches = (1, 8) if tier == "cpu" and pruned else (8,) if tier == "cpu" else \
        ((1, 64, 256) if pruned else (64, 256))
    dt = "fp32" if tier == "cpu" else "bf16"
    for m in models:
        c, _, f = VIT[m]
        for b in batches:
            head = (m == "deit_b" and b == 256) or (tier == "cpu" and m == "deit_s" and b == 8)
            tags = {"headline", "lease"} if head else set()
            out.append(_case(op, m, b, dt, tags, N=197, C=c, F=PRUNED_F[m] if pruned else f))
    if tier == "gpu":
        if pruned:
            out.append(_case(op, "deit_b-aligned", 256, "bf16", N=197, C=768, F=1536))
        else:
            for s, (c, _, win, _) in SWIN.items():  # the windowed FFN sees images x 49 x windows tokens
                out.append(_case(op, s, 128, "bf16", N=49 * win, C=c, F=4 * c))
        out.append(_case(op, "deit_s", 64, "fp32", N=197, C=384, F=PRUNED_F["deit_s"] if pruned else 1536))
    return out


def _conv_cases(op: str, tier: str) -> List[Case]:
    out = []
    if tier == "smoke":
        return [_case(op, "tiny", 2, "fp32", grid=(4, 4), C=32, hd=16, T=t, variant=f"T{t}") for t in (9, 1)]
    models = ("deit_s",) if tier == "cpu" else ("deit_s", "deit_b")
    batches = (1, 16) if tier == "cpu" else (1, 64, 256)
    dt = "fp32" if tier == "cpu" else "bf16"
    for m in models if op == "deploy_conv" else models[:1]:  # shift_sum does not depend on C
        c = VIT[m][0]
        for t in (9, 1):
            for b in batches:
                head = b == batches[-1] and (m == "deit_b" or tier == "cpu" or op == "shift_sum")
                tags = {"headline", "lease"} if head and t == 9 else {"headline"} if head else set()
                out.append(_case(op, m if op == "deploy_conv" else "grid14", b, dt, tags, grid=(14, 14), C=c, hd=64,
                                 T=t, variant=f"T{t}"))
    if tier == "gpu":
        out.append(_case(op, "deit_s" if op == "deploy_conv" else "grid14", 64, "fp32", grid=(14, 14), C=384, hd=64,
                         T=9, variant="T9"))
    return out


def kernel_cases(tier: str, ops: Optional[Sequence[str]] = None, tags: Optional[Iterable[str]] = None) -> List[Case]:
    """The op cases of ``tier`` (optionally only ``ops``, only cases carrying one of ``tags``)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    table = {"gated_attn_conv": _attn_cases(tier), "masked_ffn": _ffn_cases("masked_ffn", tier),
             "pruned_ffn": _ffn_cases("pruned_ffn", tier), "deploy_conv": _conv_cases("deploy_conv", tier),
             "shift_sum": _conv_cases("shift_sum", tier)}
    out = [c for op in (ops or OPS) for c in table[op]]
    if tags is not None:
        want = set(tags)
        out = [c for c in out if tier == "smoke" or c.tags & want]
    return out


def tier_of(device: torch.device, smoke: bool = False) -> str:
    """``smoke`` when asked, else ``gpu`` on CUDA and ``cpu`` otherwise."""
    return "smoke" if smoke else ("gpu" if device.type == "cuda" else "cpu")


# --------------------------------------------------------------------------------------------------------- providers
class Unavailable(Exception):
    """A provider that this machine cannot run (the benchmark is skipped, with this reason)."""


def default_providers(device: torch.device, smoke: bool = False) -> Tuple[str, ...]:
    """Providers timed by default: every one on CUDA; on CPU the extension and eager (compiled: inductor's C++ code
    takes minutes to build; ask for it with ``--bench-providers``); in a smoke run also the Triton interpreter and
    ``torch.compile`` with dynamo's eager backend (capture only)."""
    if device.type == "cuda" or smoke:
        return PROVIDERS
    return ("ext", "eager")


def compile_backend(device: torch.device, smoke: bool = False) -> str:
    """``inductor``, except ``eager`` (dynamo capture without code generation) in CPU smoke runs."""
    return "eager" if smoke and device.type == "cpu" else "inductor"


def provider_fn(op: str, provider: str, device: torch.device, smoke: bool = False) -> Callable:
    """The implementation of ``op`` that ``provider`` names (signature of ``spvit_kernels.reference.<op>``).

    Raises:
        Unavailable: the provider has no implementation of ``op`` here (not built, no interpreter, ...).
    """
    import spvit_kernels as K
    from spvit_kernels import reference

    if provider not in OP_PROVIDERS[op]:
        raise Unavailable(f"{op} has no {provider} implementation")
    if provider == "eager":
        return getattr(reference, op)
    if provider == "compiled":
        torch._dynamo.reset()  # every case compiles afresh: nothing compiled for another shape is reused
        return torch.compile(getattr(reference, op), backend=compile_backend(device, smoke), dynamic=False)
    if provider.startswith("triton") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise Unavailable("Triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)")
    if provider.startswith("triton_fc2_"):  # the FFN kernels with the other fc2 (to settle the default)
        import importlib

        mod = importlib.import_module(f"spvit_kernels.{op}")
        with_fc2 = getattr(mod, f"{op}_with_fc2")
        fc2 = provider[len("triton_fc2_"):]
        return lambda *args: with_fc2(*args, fc2=fc2)
    with K.use_backend(provider):
        impl = K.backend_of(op, device)
        if impl != provider:
            raise Unavailable(f"the {provider} implementation of {op} is not available here (resolves to {impl})")
        from spvit_kernels import backend

        return backend.resolve(op, device)


# ------------------------------------------------------------------------------------------------------------ inputs
def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Tuple[Callable[[Callable], torch.Tensor],
                                                                          List[torch.Tensor]]:
    """Fresh random inputs of ``case`` on ``device``: returns ``(apply, leaves)`` where ``apply(fn)`` calls an
    implementation ``fn`` (reference signature) on them and ``leaves`` are the tensors that get gradients (empty for
    inference ops)."""
    from spvit_kernels.reference import BNState

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[case.dtype]
    dims = case.d
    train = OP_MODES[case.op] != ("fwd",)

    def rnd(*shape, scale=1.0, dtype=None, grad=train):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype or dt)
        return t.requires_grad_() if grad else t

    b = case.batch
    if case.op == "gated_attn_conv":
        c, h, hd, grid, prefix = dims["C"], dims["h"], dims["hd"], dims["grid"], dims["prefix"]
        rows = b * dims.get("windows", 1)
        n = prefix + grid[0] * grid[1]
        inner = h * hd
        x = rnd(rows, n, c)
        params = [rnd(2 * inner, c, scale=c ** -0.5), rnd(2 * inner, scale=0.1), rnd(inner, c, scale=c ** -0.5),
                  rnd(inner, scale=0.1), rnd(c, inner, scale=inner ** -0.5), rnd(c, scale=0.1),
                  (1 + 0.02 * torch.randn(h, 9, generator=g)).to(device).requires_grad_()]
        bns = [BNState(torch.ones(hd, device=device, requires_grad=True),
                       torch.zeros(hd, device=device, requires_grad=True),
                       torch.zeros(hd, device=device), torch.ones(hd, device=device)) for _ in range(2)]
        gates = torch.tensor(GATES[dims["variant"]], device=device, requires_grad=True)
        bias = None
        if dims["G"]:
            bias = 0.5 * torch.randn(dims["G"], h, n, n, generator=g)
            if dims["G"] > 1:  # a shift mask: -100 between token groups
                lab = torch.randint(0, 2, (dims["G"], n), generator=g)
                bias = bias + (lab[:, None, :, None] != lab[:, None, None, :]).float() * -100.0
            bias = bias.to(device=device, dtype=dt).requires_grad_()
        leaves = [x, *params, gates] + [bn.weight for bn in bns] + [bn.bias for bn in bns] + \
            ([bias] if bias is not None else [])

        def apply(fn):
            return fn(x, *params[:6], params[6], bns[0], bns[1], gates, num_heads=h, alpha=dims["alpha"], grid=grid,
                      training=True, num_prefix_tokens=prefix, attn_bias=bias)
        return apply, leaves
    if case.op in ("masked_ffn", "pruned_ffn"):
        n, c, f = dims["N"], dims["C"], dims["F"]
        args = [rnd(b, n, c), rnd(f, c, scale=c ** -0.5), rnd(f, scale=0.1), rnd(c, f, scale=f ** -0.5),
                rnd(c, scale=0.1)]
        if case.op == "masked_ffn":  # about half the units masked
            args.append((torch.rand(f, generator=g) < 0.5).float().to(device).requires_grad_())
        return (lambda fn: fn(*args)), [a for a in args if a.requires_grad]
    if case.op == "deploy_conv":
        grid, c, hd, t = dims["grid"], dims["C"], dims["hd"], dims["T"]
        args = [rnd(b, 1 + grid[0] * grid[1], c), rnd(t * hd, c, scale=c ** -0.5), rnd(hd, scale=0.1),
                rnd(c, hd, scale=hd ** -0.5), rnd(c, scale=0.1)]
        return (lambda fn: fn(*args, grid, 1)), []
    if case.op == "shift_sum":
        grid, hd, t = dims["grid"], dims["hd"], dims["T"]
        planes, bias = rnd(b, grid[0] * grid[1], t, hd), rnd(hd)
        return (lambda fn: fn(planes, bias, grid, True)), [planes, bias]
    raise ValueError(f"unknown op {case.op!r}")


def build(case: Case, provider: str, device: torch.device, smoke: bool = False, seed: int = 0
          ) -> Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]:
    """``(forward, leaves)``: a no-argument call of ``provider``'s implementation on fresh inputs of ``case``."""
    fn = provider_fn(case.op, provider, device, smoke)
    apply, leaves = make_inputs(case, device, seed)
    return (lambda: apply(fn)), leaves


# -------------------------------------------------------------------------------------------------------- work model
def work(case: Case, mode: str) -> Tuple[float, Optional[float]]:
    """(FLOPs, bytes) of one call (multiply-add = 2 FLOPs; main tensors only; bytes None where unmodelled)."""
    dims, b = case.d, case.batch
    elem = torch.finfo(DTYPES[case.dtype]).bits // 8
    if case.op == "gated_attn_conv":
        c, h, hd, grid, prefix = dims["C"], dims["h"], dims["hd"], dims["grid"], dims["prefix"]
        rows = b * dims.get("windows", 1)
        p = grid[0] * grid[1]
        n = p + prefix
        inner = h * hd
        proj, attn, outp = 3 * rows * n * c * inner, 2 * rows * h * n * n * hd, rows * n * inner * c
        mix = 10 * rows * p * inner
        conv = rows * n * hd * c if dims["variant"] != "msa" else 0
        fwd = (2 * (proj + attn + outp + mix + conv),
               elem * (rows * n * c + 6 * rows * n * inner + 2 * rows * n * inner + 2 * rows * n * c)
               + 8 * rows * p * hd)
        if dims["variant"] == "msa":
            bwd = (2 * (2 * (proj + attn + outp) + attn // 2 + rows * n * c * 2 * hd),
                   elem * (3 * rows * n * c + 12 * rows * n * inner + 2 * rows * n * inner))
        else:
            bwd = (2 * (3 * rows * n * c * hd + 2 * mix + 2 * rows * n * c * inner),
                   elem * (3 * rows * n * c + 3 * rows * n * inner) + 16 * rows * p * hd)
    elif case.op in ("masked_ffn", "pruned_ffn"):
        n, c, f = dims["N"], dims["C"], dims["F"]
        one = 2.0 * b * n * c * f
        nbytes = elem * (2 * b * n * c + 2 * c * f + f + c)
        fwd, bwd = (2 * one, nbytes), (4 * one, elem * (4 * b * n * c + 4 * c * f + b * n * f))
    elif case.op == "deploy_conv":
        grid, c, hd, t = dims["grid"], dims["C"], dims["hd"], dims["T"]
        p = grid[0] * grid[1]
        fwd = (2.0 * b * p * (t * hd * c + hd * c), elem * (2 * b * (p + 1) * c + (t * hd + hd) * c + hd + c))
        bwd = fwd
    else:  # shift_sum: memory-bound
        grid, hd, t = dims["grid"], dims["hd"], dims["T"]
        p = grid[0] * grid[1]
        fwd = (float(b * p * t * hd), float(elem * (b * p * t * hd + b * p * hd + hd)))
        bwd = (float(b * p * t * hd), float(elem * (2 * b * p * hd + b * p * t * hd) + 4 * hd))
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return fwd[0] + bwd[0], (fwd[1] + bwd[1]) if fwd[1] is not None and bwd[1] is not None else None


# --------------------------------------------------------------------------------------------------------- end to end
@dataclasses.dataclass(frozen=True)
class E2ECase:
    """One model job: ``kind`` ``step`` (supernet training step) or ``infer`` (deployed inference)."""

    kind: str
    model: str
    batch: int
    dtype: str
    tags: FrozenSet[str] = frozenset()

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.model}-b{self.batch}-{self.dtype}"

    @property
    def group(self) -> str:
        return self.id


STEP_PROVIDERS = ("fused", "eager", "eager_compiled", "timm_compiled")
INFER_PROVIDERS = ("deployed", "deployed_compiled", "pruned", "pruned_compiled", "dense", "dense_compiled")
STEP_MODELS = {"deit_ti": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224",
               "deit_b": "deit_base_patch16_224", "swin_t": "swin_tiny_patch4_window7_224",
               "swin_s": "swin_small_patch4_window7_224"}
# deployed architectures: names of bench/bench_deploy_e2e.py's tables (published SPViT models, tiny demo-like ones)
INFER_ARCHS = ("spvit_deit_ti", "spvit_deit_s", "spvit_deit_b_l008_t60", "spvit_swin_t", "spvit_swin_s")


def e2e_cases(tier: str, kinds: Sequence[str] = ("step", "infer"), tags: Optional[Iterable[str]] = None
              ) -> List[E2ECase]:
    """The end-to-end cases of ``tier``: the supernet training step (bf16 autocast on a GPU) and deployed inference."""
    out: List[E2ECase] = []
    if tier == "smoke":
        # the windowed layer is in the op cases; Swin models are in the gpu tier (a smoke run stays short)
        out += [E2ECase("step", "smoke_vit", 2, "fp32"), E2ECase("infer", "demo_like", 2, "fp32")]
    elif tier == "cpu":
        out += [E2ECase("step", "deit_ti", 8, "fp32", frozenset({"headline", "lease"}))]
        out += [E2ECase("infer", a, b, "fp32", frozenset({"headline", "lease"} if a == "spvit_deit_s" else set()))
                for a in ("spvit_deit_ti", "spvit_deit_s") for b in (1, 16)]
    else:
        for m in STEP_MODELS:
            for b in (128, 256):
                t = {"headline"} if b == 256 and m in ("deit_s", "deit_b") else set()
                if b == 256 and m == "deit_s":
                    t.add("lease")
                out.append(E2ECase("step", m, b, "bf16", frozenset(t)))
        for a in INFER_ARCHS:
            for b in (1, 64, 256):
                t = {"headline"} if b == 256 and a in ("spvit_deit_s", "spvit_deit_b_l008_t60") else set()
                if b == 256 and a == "spvit_deit_b_l008_t60":
                    t.add("lease")
                out.append(E2ECase("infer", a, b, "bf16", frozenset(t)))
    out = [c for c in out if c.kind in kinds]
    if tags is not None and tier != "smoke":
        out = [c for c in out if c.tags & set(tags)]
    return out


def select(name: str, tier: str) -> Tuple[List[Case], List[E2ECase]]:
    """A named subset of every table: ``all``, ``headline`` or ``lease`` (op cases, end-to-end cases)."""
    if name == "all":
        return kernel_cases(tier), e2e_cases(tier)
    if name in ("headline", "lease"):
        return kernel_cases(tier, tags={name}), e2e_cases(tier, tags={name})
    raise ValueError(f"unknown selection {name!r}; expected all, headline or lease")


def smoke_vit(num_classes: int = 10) -> torch.nn.Module:
    """A tiny timm VisionTransformer (32 px, patch 8, width 32, depth 1)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=num_classes)


def base_model(name: str) -> torch.nn.Module:
    """The dense timm model of a step case (random weights)."""
    if name == "smoke_vit":
        return smoke_vit()
    import timm

    return timm.create_model(STEP_MODELS[name], pretrained=False)


def fused_backend(device: torch.device) -> str:
    """Backend of the ``fused`` step: ``auto`` (Triton on CUDA); on CPU ``triton`` under TRITON_INTERPRET=1, else
    ``auto`` (extension or eager)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "triton"
    return "auto"


def make_step(case: E2ECase, provider: str, device: torch.device, smoke: bool = False, seed: int = 0
              ) -> Tuple[Callable[[], torch.Tensor], contextlib.AbstractContextManager]:
    """``(step, backend_context)``: one training step (autocast forward, cross-entropy + the supernet's FLOPs loss,
    backward, AdamW, gradients set to None) of ``provider`` on a fixed random batch; run it inside the context."""
    import spvit
    import spvit_kernels as K

    if provider not in STEP_PROVIDERS:
        raise ValueError(f"unknown step provider {provider!r}; expected one of {STEP_PROVIDERS}")
    torch.manual_seed(seed)
    base = base_model(case.model)
    if provider.startswith("timm"):
        model, ctx = base, contextlib.nullcontext()
    else:
        model = spvit.supernet(base)
        ctx = K.use_backend(fused_backend(device) if provider == "fused" else "eager")
    model = model.to(device).train()
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(case.batch, 3, *tuple(base.patch_embed.img_size), generator=gen).to(device)
    y = torch.randint(0, base.num_classes, (case.batch,), generator=gen).to(device)
    inner = model
    if provider.endswith("compiled"):
        torch._dynamo.reset()
        model = torch.compile(model, backend=compile_backend(device, smoke), dynamic=False)
    opt = torch.optim.AdamW(list(inner.parameters()), lr=1e-4, fused=device.type == "cuda")
    amp = DTYPES[case.dtype] if case.dtype != "fp32" else None
    target = 0.7 * inner.dense_gflops() if hasattr(inner, "flops_loss") else None

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            if target is not None:
                loss = loss + inner.flops_loss(target, 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, ctx


def make_inference(case: E2ECase, device: torch.device):
    """``(models, x, gflops)``: the dense, pruned and deployed models of ``case.model`` (eval mode, on device and
    dtype), an input batch, and GFLOPs per image of the pruned and dense models."""
    import spvit
    from bench.bench_deploy_e2e import build_models

    torch.manual_seed(0)
    dense, pruned, deployed = build_models(case.model, device, DTYPES[case.dtype])
    sig = deployed.signature
    x = torch.randn(case.batch, sig.in_chans, *sig.img_size, device=device, dtype=DTYPES[case.dtype])
    return {"dense": dense, "pruned": pruned, "deployed": deployed}, x, \
        {"pruned": spvit.gflops(pruned), "dense": spvit.gflops(dense)}
