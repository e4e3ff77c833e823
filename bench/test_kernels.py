"""Per-op benchmarks: every case of bench/cases.py x provider x mode, grouped by op, shape and mode.

``pytest bench/test_kernels.py --benchmark-only`` (see bench/conftest.py for the options). Each row's extra_info:
achieved TFLOP/s and GB/s against the op's work model (``bench.cases.work``), the resource that binds it and the
fraction of that peak (measured in the same run), the first call's time, peak CUDA memory, the implementation that
ran, and the forward output's largest difference from the eager reference on the same inputs.
"""
import pytest
import torch

from bench import cases
from bench.conftest import measured_peaks, timed_run

pytestmark = pytest.mark.kernels


def test_kernel(benchmark, kcase, bench_cfg):
    case, provider, mode = kcase
    dev = bench_cfg.device
    benchmark.group = f"{case.group}-{mode}"
    try:
        fwd, leaves = cases.build(case, provider, dev, smoke=bench_cfg.smoke)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    train = bool(leaves)
    benchmark.extra_info.update({"op": case.op, "shape": case.shape, "batch": case.batch, "dtype": case.dtype,
                                 "mode": mode, "provider": provider, **{k: str(v) for k, v in case.dims}})

    if mode == "fwd":
        # the output of the first call, compared with the eager reference's on the same inputs
        with torch.inference_mode(not train):
            out = fwd()
            ref_fwd, _ = cases.build(case, "eager", dev, smoke=bench_cfg.smoke)
            ref = ref_fwd()
        err = (out.float() - ref.float()).abs().max().item()
        benchmark.extra_info["max_abs_err_vs_eager"] = err
        assert torch.isfinite(out).all(), f"{provider} gave non-finite values"
        del out, ref, ref_fwd

        def target():
            with torch.inference_mode(not train):
                return fwd()  # a training forward records its graph (dropped with the output)
        setup = None
    else:
        def clear():
            for leaf in leaves:
                leaf.grad = None

        if mode == "bwd":
            def setup():
                clear()
                out = fwd()
                return out, torch.ones_like(out)

            def target(out, grad):
                out.backward(grad)
        else:
            setup = clear

            def target():
                out = fwd()
                out.backward(torch.ones_like(out))
    timed_run(benchmark, bench_cfg, target, setup)
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.median
    flops, nbytes = cases.work(case, mode)
    peaks = measured_peaks(bench_cfg)
    tflops = flops / seconds / 1e12
    gbs = nbytes / seconds / 1e9 if nbytes else None
    ridge = peaks["peak_tflops"] * 1e12 / (peaks["peak_gbs"] * 1e9)
    compute = nbytes is None or flops / nbytes > ridge
    benchmark.extra_info.update({
        "tflops": tflops, "gbs": gbs, "bound": "compute" if compute else "memory",
        "frac_of_peak": tflops / peaks["peak_tflops"] if compute else gbs / peaks["peak_gbs"], **peaks})
