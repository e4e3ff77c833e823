"""pytest-benchmark configuration of the benchmark suite (``pytest bench/ --benchmark-only``).

Options (each also read from an environment variable, so that CI can set it):

* ``--bench-smoke`` (``SPVIT_BENCH_SMOKE=1``): the tiny cases of :mod:`bench.cases`, one round each, every provider
  (the Triton kernels in the interpreter on a CPU, ``torch.compile`` with dynamo's eager backend): checks the harness,
  measures nothing. Use it with ``--benchmark-disable`` (each case runs once, untimed).
* ``--bench-device cpu|cuda`` (``SPVIT_BENCH_DEVICE``; default: CUDA when available).
* ``--bench-providers triton,ext,eager,compiled`` (``SPVIT_BENCH_PROVIDERS``; default: all on CUDA, ``ext,eager`` on
  a CPU; for the end-to-end cases ``compiled`` selects the compiled providers).
* ``--bench-rounds N`` / ``--bench-warmup N``: timed and untimed rounds per case (default 20 / 5 on CUDA, 5 / 1 on a
  CPU).
* ``--bench-budget-s S``: cases not started within S seconds fail ("not run"), so a cut run never reads as complete.

Selections: ``-m headline`` (what the headline run needs), ``-m lease`` (a GPU check of a few minutes), ``-k`` on
the ids (``-k "deploy_conv and deit_b"``, ``-k "eager or triton"``).

Timing: on CUDA each round is one call followed by ``torch.cuda.synchronize`` (the host timer then measures the
device's work), with a 256 MiB buffer overwritten in the round's setup (not timed) so that no call is fed from the
previous call's L2. The first call (compilation, Triton JIT and autotuning) runs before the timed rounds and is
recorded apart as ``first_call_s``.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from typing import Callable, Dict, Optional

import pytest


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def pytest_addoption(parser):
    group = parser.getgroup("spvit benchmarks")
    group.addoption("--bench-smoke", action="store_true", default=_env_flag("SPVIT_BENCH_SMOKE"),
                    help="tiny shapes, every provider, one round: checks the harness (env SPVIT_BENCH_SMOKE=1)")
    group.addoption("--bench-device", default=os.environ.get("SPVIT_BENCH_DEVICE") or None,
                    choices=("cpu", "cuda"), help="device (default: cuda when available)")
    group.addoption("--bench-providers", default=os.environ.get("SPVIT_BENCH_PROVIDERS") or None,
                    help="comma list of triton,ext,eager,compiled (default: all on CUDA, ext,eager on a CPU)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per case")
    group.addoption("--bench-warmup", type=int, default=None, help="untimed rounds per case after the first call")
    group.addoption("--bench-budget-s", type=float, default=None,
                    help="cases not started within this many seconds of the session's start fail (not run)")


def pytest_configure(config):
    for name, what in (("headline", "the cases of the headline run"), ("lease", "a GPU check of a few minutes"),
                       ("kernels", "per-op benchmarks"), ("e2e", "end-to-end benchmarks")):
        config.addinivalue_line("markers", f"{name}: {what}")
    if config.getoption("--bench-smoke") and config.getoption("--bench-device") != "cuda":
        # before triton is imported: the Triton providers run in the interpreter (a harness check only)
        os.environ.setdefault("TRITON_INTERPRET", "1")


_START = time.monotonic()


def pytest_runtest_setup(item):
    budget = item.config.getoption("--bench-budget-s")
    used = time.monotonic() - _START
    if budget is not None and used > budget:
        pytest.fail(f"not run: the time budget of {budget:.0f} s was used up ({used:.0f} s elapsed)", pytrace=False)


class BenchConfig:
    """What the options resolve to (one per session: the ``bench_cfg`` fixture)."""

    def __init__(self, config):
        import torch

        name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        if name == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--bench-device cuda but no CUDA device is available")
        self.device = torch.device(name)
        self.smoke = bool(config.getoption("--bench-smoke"))
        from bench import cases

        self.tier = cases.tier_of(self.device, self.smoke)
        wanted = config.getoption("--bench-providers")
        self.providers = tuple(wanted.split(",")) if wanted else cases.default_providers(self.device, self.smoke)
        unknown = set(self.providers) - set(cases.PROVIDERS)
        if unknown:
            raise pytest.UsageError(f"unknown providers {sorted(unknown)}; expected some of {cases.PROVIDERS}")
        cuda = self.device.type == "cuda"
        rounds, warmup = (1, 0) if self.smoke else ((20, 5) if cuda else (5, 1))
        self.rounds = config.getoption("--bench-rounds") or rounds
        self.warmup = config.getoption("--bench-warmup") if config.getoption("--bench-warmup") is not None \
            else warmup
        if self.device.type == "cpu" and not self.smoke:
            torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
        self._flush = None

    def flush_l2(self) -> None:
        """CUDA: overwrite a 256 MiB buffer (evicts the previous call's data from L2) and wait for it."""
        if self.device.type != "cuda":
            return
        import torch

        if self._flush is None:
            self._flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=self.device)
        self._flush.zero_()
        torch.cuda.synchronize(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


_CFG: Dict[int, BenchConfig] = {}


def get_cfg(config) -> BenchConfig:
    if id(config) not in _CFG:
        _CFG[id(config)] = BenchConfig(config)
    return _CFG[id(config)]


@pytest.fixture(scope="session")
def bench_cfg(request) -> BenchConfig:
    return get_cfg(request.config)


def pytest_generate_tests(metafunc):
    """Parametrise ``kcase`` (op case, provider, mode) and ``ecase`` (end-to-end case, provider) from bench.cases."""
    from bench import cases

    if "kcase" not in metafunc.fixturenames and "ecase" not in metafunc.fixturenames:
        return
    cfg = get_cfg(metafunc.config)
    params = []
    if "kcase" in metafunc.fixturenames:
        for case in cases.kernel_cases(cfg.tier):
            marks = [getattr(pytest.mark, t) for t in sorted(case.tags)]
            for mode in cases.OP_MODES[case.op]:
                for prov in cases.OP_PROVIDERS[case.op]:
                    if prov.split("_")[0] in cfg.providers:
                        params.append(pytest.param((case, prov, mode), id=f"{case.id}-{mode}-{prov}", marks=marks))
        metafunc.parametrize("kcase", params)
    else:
        kinds = ("step",) if "step" in metafunc.function.__name__ else ("infer",)
        allp = cases.STEP_PROVIDERS if kinds == ("step",) else cases.INFER_PROVIDERS
        for case in cases.e2e_cases(cfg.tier, kinds):
            marks = [getattr(pytest.mark, t) for t in sorted(case.tags)]
            for prov in allp:
                compiled = prov.endswith("compiled")
                if compiled and "compiled" not in cfg.providers:
                    continue
                if prov == "fused" and not ({"triton", "ext"} & set(cfg.providers)) and not cfg.smoke:
                    continue
                params.append(pytest.param((case, prov), id=f"{case.id}-{prov}", marks=marks))
        metafunc.parametrize("ecase", params)


def timed_run(benchmark, cfg: BenchConfig, target: Callable, setup: Optional[Callable] = None) -> Dict[str, float]:
    """Time ``target`` with ``benchmark.pedantic``: the first call apart (``first_call_s``), then ``cfg.warmup`` untimed
    and ``cfg.rounds`` timed rounds of one call, each after ``setup`` (its result is ``target``'s arguments) and, on
    CUDA, an L2 flush; every round ends with a device synchronisation. With ``--benchmark-disable``: one call.

    Returns the extra figures measured here (``first_call_s``, ``peak_mem_mb`` on CUDA), also put in extra_info.
    """
    import torch

    def prepared():
        args = setup() if setup else None
        cfg.flush_l2()
        return (args, {}) if args is not None else ((), {})

    def call(*args):
        out = target(*args)
        cfg.sync()
        return out

    extra: Dict[str, float] = {}
    if benchmark.disabled:  # pedantic makes one untimed call
        benchmark.pedantic(call, setup=prepared, rounds=1, iterations=1)
        return extra
    args, _ = prepared()
    t0 = time.perf_counter()
    call(*args)
    extra["first_call_s"] = time.perf_counter() - t0
    if cfg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(cfg.device)
    benchmark.pedantic(call, setup=prepared, rounds=cfg.rounds, warmup_rounds=cfg.warmup, iterations=1)
    if cfg.device.type == "cuda":
        extra["peak_mem_mb"] = torch.cuda.max_memory_allocated(cfg.device) / 2**20
    benchmark.extra_info.update(extra)
    return extra


# ------------------------------------------------------------------------------------------------------------ peaks
_PEAKS: Dict[str, Dict[str, float]] = {}


def measured_peaks(cfg: BenchConfig) -> Dict[str, float]:
    """The device's peaks measured in this run (cached): a large GEMM (bf16 8192^3 on CUDA, fp32 1024^3 on a CPU) and
    a device-to-device copy (1 GiB on CUDA, 256 MiB on a CPU); the per-case fractions of peak are of these. Smoke
    runs: 256^3 and 16 MiB."""
    import torch

    key = str(cfg.device)
    if key in _PEAKS:
        return _PEAKS[key]
    cuda = cfg.device.type == "cuda"
    if cfg.smoke:
        n, dtype, nbytes, reps = 256, torch.float32, 2**24, 3
    else:
        n, dtype, nbytes, reps = (8192, torch.bfloat16, 2**30, 20) if cuda else (1024, torch.float32, 2**28, 5)
    a = torch.randn(n, n, device=cfg.device, dtype=dtype)
    src = torch.ones(nbytes, dtype=torch.uint8, device=cfg.device)
    dst = torch.empty_like(src)

    def best(fn):
        fn()
        times = []
        for _ in range(reps):
            cfg.sync()
            t0 = time.perf_counter()
            fn()
            cfg.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    t_mm = best(lambda: torch.mm(a, a))
    t_cp = best(lambda: dst.copy_(src))
    _PEAKS[key] = {"peak_tflops": 2.0 * n ** 3 / t_mm / 1e12, "peak_gbs": 2.0 * nbytes / t_cp / 1e9,
                   "peak_gemm": f"{n}^3 {str(dtype).replace('torch.', '')}"}
    return _PEAKS[key]


# ----------------------------------------------------------------------------------------------------- machine info
def _nvidia_smi(fields: str) -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        res = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""


def library_versions() -> Dict[str, str]:
    """Versions of the libraries the timings depend on ("none" when not installed)."""
    import importlib

    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "timm", "numpy", "onnxruntime"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except ImportError:
            out[name] = "none"
    import torch

    out["cuda"] = str(torch.version.cuda)
    return out


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU, driver, clocks, library versions, threads and the benchmark settings in every saved run."""
    import torch

    cfg = get_cfg(config)
    info = {"libraries": library_versions(), "torch_threads": torch.get_num_threads(), "tier": cfg.tier,
            "smoke": cfg.smoke, "providers": list(cfg.providers), "rounds": cfg.rounds, "warmup": cfg.warmup,
            "bench_device": str(cfg.device), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if cfg.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(cfg.device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(cfg.device)))
        smi = _nvidia_smi("driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit")
        keys = ("driver", "clock_sm_mhz", "clock_max_sm_mhz", "clock_mem_mhz", "clock_max_mem_mhz", "power_limit")
        info.update(dict(zip(keys, [v.strip() for v in smi.split(",")])) if smi else {"driver": "unknown"})
    machine_info["spvit"] = info
