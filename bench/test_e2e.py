"""End-to-end benchmarks: the supernet training step and deployed inference (cases in bench/cases.py).

* ``test_step``: one SPViT search step (forward, cross-entropy + FLOPs loss, backward, AdamW; bf16 autocast on a
  GPU): ``fused`` (the package's kernels), ``eager`` (the eager reference ops), ``eager_compiled`` (torch.compile of
  the eager-reference supernet), ``timm_compiled`` (the plain timm model compiled: the floor).
* ``test_infer``: a published SPViT architecture: ``deployed`` (spvit.deploy), ``pruned`` (the eager PrunedModel),
  ``dense`` (the timm model), each also compiled (``*_compiled``).

extra_info: img/s (batch over the median round), peak CUDA memory, the first call's time (compilation, JIT,
autotuning), GFLOPs per image and, for the deployed rows, the largest difference from the pruned model's output.
"""
import pytest
import torch

from bench import cases
from bench.conftest import timed_run

pytestmark = pytest.mark.e2e


def _img_s(benchmark, batch):
    if not benchmark.disabled:
        benchmark.extra_info["img_s"] = batch / benchmark.stats.stats.median


def test_step(benchmark, ecase, bench_cfg):
    case, provider = ecase
    dev = bench_cfg.device
    benchmark.group = case.group
    benchmark.extra_info.update({"kind": "step", "model": case.model, "batch": case.batch, "dtype": case.dtype,
                                 "provider": provider})
    step, ctx = cases.make_step(case, provider, dev, smoke=bench_cfg.smoke)
    with ctx:
        if provider == "fused":
            import spvit_kernels as K

            impl = {op: K.backend_of(op, dev) for op in ("gated_attn_conv", "masked_ffn")}
            benchmark.extra_info["impl"] = ",".join(f"{k}={v}" for k, v in impl.items())
            if dev.type == "cuda":
                assert set(impl.values()) == {"triton"}, f"the fused step does not run the Triton kernels: {impl}"
        timed_run(benchmark, bench_cfg, step)
        loss = step()
    assert torch.isfinite(loss), "the training step gave a non-finite loss"
    _img_s(benchmark, case.batch)


_MODELS = {}


def _models(case, dev):
    """The case's models, built once for all its providers (the previous case's are dropped first)."""
    if case.id not in _MODELS:
        _MODELS.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        _MODELS[case.id] = cases.make_inference(case, dev)
    return _MODELS[case.id]


def test_infer(benchmark, ecase, bench_cfg):
    case, provider = ecase
    dev = bench_cfg.device
    benchmark.group = case.group
    models, x, gflops = _models(case, dev)
    kind = provider.replace("_compiled", "")
    model = models[kind]
    benchmark.extra_info.update({"kind": "infer", "model": case.model, "batch": case.batch, "dtype": case.dtype,
                                 "provider": provider, "gflops": gflops["dense" if kind == "dense" else "pruned"],
                                 "flops_ratio": gflops["dense"] / gflops["pruned"]})
    if provider.endswith("compiled"):
        torch._dynamo.reset()
        model = torch.compile(model, backend=cases.compile_backend(dev, bench_cfg.smoke), dynamic=False)

    def target():
        with torch.inference_mode():
            return model(x)
    timed_run(benchmark, bench_cfg, target)
    out = target()
    assert torch.isfinite(out).all()
    if kind == "deployed":
        with torch.inference_mode():
            err = (out.float() - models["pruned"](x).float()).abs().max().item()
        benchmark.extra_info["max_abs_err_vs_pruned"] = err
        if case.dtype == "fp32":
            assert err < 1e-3, f"the deployed model differs from the pruned one by {err}"
    _img_s(benchmark, case.batch)
