"""End-to-end supernet training step (fwd + bwd + optimiser, bf16 autocast on GPU): img/s and peak memory.

Providers:
  fused      the supernet with the default backend (Triton kernels on CUDA)
  eager      the supernet on the eager reference ops (SPVIT_BACKEND=eager)
  compiled   torch.compile of the eager-reference supernet
  timm       the plain timm model's training step (the floor), and timm_compiled

python bench/bench_supernet_step.py --out bench/results [--quick] [--models deit_small_patch16_224,...] [--batch 128,256]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import bench_fn, default_device, env_info, peak_memory_mb, write_rows  # noqa: E402


def _make_step(model, device, amp_dtype, arch_params=None):
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-4)

    def step(x, y):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            if hasattr(model, "flops_loss"):
                loss = loss + model.flops_loss(0.7 * model.dense_gflops(), 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run(model_name: str, batch: int, device: torch.device, providers, quick: bool):
    import timm

    import spvit
    import spvit_kernels as K

    kw = dict(img_size=32, num_classes=10) if quick else {}
    base = timm.create_model(model_name, pretrained=False, **kw).to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    img = base.patch_embed.img_size
    x = torch.randn(batch, 3, *img, device=device)
    y = torch.randint(0, base.num_classes, (batch,), device=device)
    rows = []
    for prov in providers:
        if prov.startswith("timm"):
            model = timm.create_model(model_name, pretrained=False, **kw).to(device).train()
            backend = "eager"
        else:
            model = spvit.supernet(base).to(device).train()
            backend = "auto" if prov == "fused" else "eager"
        if prov.endswith("compiled"):
            if device.type == "cpu" and quick:
                continue
            model = torch.compile(model)
        step = _make_step(model, device, amp)
        try:
            with K.use_backend(backend):
                res = bench_fn(lambda: step(x, y), device, warmup=2, rep=3 if quick else 10)
                mem = peak_memory_mb(lambda: step(x, y), device)
        except Exception as exc:  # record the failure instead of hiding it
            rows.append({"model": model_name, "batch": batch, "provider": prov, "error": repr(exc)[:200]})
            continue
        rows.append({"model": model_name, "batch": batch, "provider": prov, "backend": backend,
                     "ms": res["ms"], "img_s": batch / res["ms"] * 1e3, "peak_mem_mb": mem})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration")
    ap.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224")
    ap.add_argument("--batch", default="128,256")
    ap.add_argument("--providers", default="fused,eager,compiled,timm,timm_compiled")
    args = ap.parse_args(argv)
    device = default_device()
    if args.quick:
        models, batches = ["deit_tiny_patch16_224"], [4]
    else:
        models, batches = args.models.split(","), [int(b) for b in args.batch.split(",")]
    providers = args.providers.split(",")
    if device.type == "cpu":
        providers = [p for p in providers if p != "fused" or os.environ.get("TRITON_INTERPRET") == "1"]
    info = env_info(device)
    rows = []
    for m in models:
        for b in batches:
            for r in run(m, b, device, providers, args.quick):
                rows.append({**r, **info})
                print({k: r[k] for k in r if k in ("model", "batch", "provider", "img_s", "peak_mem_mb", "error")})
    name = "supernet_step" + ("_quick" if args.quick else "") + ("_cpu" if device.type == "cpu" else "")
    path = write_rows(name, rows, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
