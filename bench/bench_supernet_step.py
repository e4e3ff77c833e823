"""End-to-end supernet training step (forward + loss + backward + AdamW, bf16 autocast on GPU): img/s, peak memory.

Providers:
  fused           the supernet on the package's kernels (default backend: Triton on CUDA)
  eager           the supernet on the eager reference ops (``use_backend("eager")``, as SPVIT_BACKEND=eager)
  eager_compiled  torch.compile of the eager-reference supernet
  timm            the plain timm model's training step
  timm_compiled   torch.compile of the plain timm model (the floor)

Every provider gets its own model (same seed, same weights), its own optimiser and, where compiled, its own fresh
compilation. The first step (compilation, Triton JIT and autotuning, optimiser state allocation) is timed apart
(``first_call_s``, synchronised); then ``warmup`` untimed and ``rep`` timed steps. The supernet samples its gates
as in the search; the RNG is seeded identically before every provider's steps, so all providers see the same gates.
Peak memory (CUDA) is the allocator's peak over the timed steps: parameters, gradients, optimiser state and
activations. Compiled rows carry the number of captured graphs and graph breaks.

python bench/bench_supernet_step.py --out DIR [--quick] [--models deit_small_patch16_224,...] [--batch 128,256]
(default models: DeiT-Ti/S/B and Swin-T/S; Swin supernets run the windowed layer of the same fused op)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (bench_fn, compile_backend, compile_stats, default_device, env_info, error_text,  # noqa: E402
                          first_call_s, free_memory, fresh_compile, write_rows)

PROVIDERS = ("fused", "eager", "eager_compiled", "timm", "timm_compiled")
FUSED_OPS = ("gated_attn_conv", "masked_ffn")


def smoke_model(num_classes: int = 10) -> torch.nn.Module:
    """A tiny timm VisionTransformer (32 px, patch 8, width 32, depth 2) for smoke runs."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


def smoke_swin(num_classes: int = 10) -> torch.nn.Module:
    """A tiny timm SwinTransformer (16 px, patch 2, window 4, width 16: one 8x8 stage, a plain and a shifted block)
    for smoke runs."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                           num_classes=num_classes)


def timm_factory(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def fused_backend(device: torch.device) -> str:
    """Backend of the ``fused`` provider: ``auto`` (Triton on CUDA); on CPU ``triton`` under TRITON_INTERPRET=1 (the
    kernels run in the interpreter), else ``auto`` (extension or eager: the row's ``impl`` says which)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "triton"
    return "auto"


def make_step(model: torch.nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype], x: torch.Tensor,
              y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` on (x, y): autocast forward, cross-entropy (+ the supernet's FLOPs loss),
    backward, AdamW step, gradients set to None."""
    fused_opt = device.type == "cuda"
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-4, fused=fused_opt)
    inner = getattr(model, "_orig_mod", model)
    target = 0.7 * inner.dense_gflops() if hasattr(inner, "flops_loss") else None

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            if target is not None:
                loss = loss + inner.flops_loss(target, 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(label: str, factory: Callable[[], torch.nn.Module], provider: str, batch: int, device: torch.device,
            amp_dtype: Optional[torch.dtype], warmup: int, rep: int, backend: str = "inductor",
            seed: int = 0) -> Dict:
    """One row: ``provider``'s training step of the model ``factory()`` at ``batch`` (errors go in the row)."""
    import spvit
    import spvit_kernels as K

    row: Dict = {"model": label, "batch": batch, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                 "provider": provider, "impl": "", "first_call_s": None, "ms": None, "ms_p20": None, "ms_p80": None,
                 "img_s": None, "peak_mem_mb": None, "graphs": None, "graph_breaks": None, "error": ""}
    if provider not in PROVIDERS:
        row["error"] = f"unknown provider {provider!r}; expected one of {PROVIDERS}"
        return row
    step = model = None
    try:
        torch.manual_seed(seed)
        base = factory()
        if provider.startswith("timm"):
            model, be = base, None
            row["impl"] = "timm"
        else:
            model = spvit.supernet(base)
            be = fused_backend(device) if provider == "fused" else "eager"
        model = model.to(device).train()
        img = tuple(base.patch_embed.img_size)  # ViT and Swin alike
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        x = torch.randn(batch, 3, *img, generator=gen).to(device)
        y = torch.randint(0, base.num_classes, (batch,), generator=gen).to(device)
        if provider.endswith("compiled"):
            model = fresh_compile(model, backend)
        step = make_step(model, device, amp_dtype, x, y)
        ctx = K.use_backend(be) if be else contextlib.nullcontext()
        with ctx:
            if be:
                row["impl"] = ",".join(f"{op}={K.backend_of(op, device)}" for op in FUSED_OPS)
                if provider == "fused" and device.type == "cuda" and any(
                        K.backend_of(op, device) != "triton" for op in FUSED_OPS):
                    raise RuntimeError(f"the fused provider does not run the Triton kernels here ({row['impl']})")
            torch.manual_seed(seed)
            row["first_call_s"] = first_call_s(step, device)
            if provider.endswith("compiled"):
                row.update(compile_stats())
            torch.manual_seed(seed + 2)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = bench_fn(step, device, warmup=warmup, rep=rep)
            if device.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row.update({"ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "img_s": batch / t["ms"] * 1e3})
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the caller decides the exit status
        row["error"] = error_text(exc)
    finally:
        del step, model
        free_memory(device)
    return row


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (32 px model, batch 4)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224,"
                    "swin_tiny_patch4_window7_224,swin_small_patch4_window7_224")
    ap.add_argument("--batch", default="128,256")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rep", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    amp = torch.bfloat16 if device.type == "cuda" else None
    if args.quick:
        models, batches = [("smoke_vit", smoke_model), ("smoke_swin", smoke_swin)], [4]
    else:
        models = [(m, timm_factory(m)) for m in args.models.split(",")]
        batches = [int(b) for b in args.batch.split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    rep = args.rep if args.rep is not None else (2 if args.quick else 10)
    backend = compile_backend(device, smoke=args.quick)
    info = env_info(device)
    rows = []
    for label, factory in models:
        for b in batches:
            for prov in args.providers.split(","):
                t0 = time.perf_counter()
                r = measure(label, factory, prov, b, device, amp, warmup, rep, backend)
                rows.append({**r, "compile_backend": backend if prov.endswith("compiled") else "", **info})
                res = (f"error {r['error']}" if r["error"] else
                       f"{r['img_s']:.1f} img/s, first call {r['first_call_s']:.1f} s, peak {r['peak_mem_mb']} MiB")
                print(f"[supernet_step] {label} b{b} {prov}: {res} ({time.perf_counter() - t0:.0f} s)", flush=True)
    name = "supernet_step" + ("_quick" if args.quick else "") + ("_cpu" if device.type == "cpu" else "")
    path = write_rows(name, rows, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
