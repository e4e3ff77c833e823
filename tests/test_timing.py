"""The one timer (spvit.timing.time_fn) on a fake clock: counts, the budget, self-timed pieces and the statistics."""
import random
import statistics

import pytest
import torch

from spvit import timing

CPU = torch.device("cpu")


class FakeClock:
    """A clock that advances only when the timed function says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", c)
    return c


def _reference(ms):
    s = sorted(ms)
    q = statistics.quantiles(s, n=10, method="inclusive")
    return {"ms": statistics.median(s), "ms_min": s[0], "ms_p20": q[1], "ms_p80": q[7], "reps": len(s)}


def test_fixed_reps_statistics_match_an_independent_computation(clock):
    rng = random.Random(7)
    durations = [rng.uniform(0.001, 0.01) for _ in range(3 + 11)]  # 3 warm-up calls, then 11 timed
    calls = iter(durations)

    def fn():
        clock.t += next(calls)

    got = timing.time_fn(fn, CPU, warmup=3, rep=11)
    want = _reference([d * 1e3 for d in durations[3:]])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9), k


def test_a_budget_keeps_timing_until_spent_within_the_limits(clock):
    def fn():
        clock.t += 0.01

    assert timing.time_fn(fn, CPU, warmup=0, rep=2, budget_s=0.095)["reps"] == 10  # 10 x 10 ms >= 95 ms
    assert timing.time_fn(fn, CPU, warmup=0, rep=2, budget_s=0.095, max_reps=4)["reps"] == 4
    assert timing.time_fn(fn, CPU, warmup=0, rep=20, budget_s=0.095)["reps"] == 20


def test_a_self_timed_piece_counts_its_own_seconds_and_the_budget_the_whole_call(clock):
    def piece(now):
        t0 = now()
        clock.t += 0.002  # the piece
        dt = now() - t0
        clock.t += 0.008  # its context, not counted in the result
        return dt

    piece.self_timed = True
    r = timing.time_fn(piece, CPU, warmup=1, rep=1, budget_s=0.05)
    assert r["reps"] == 5 and r["ms"] == pytest.approx(2.0) and r["ms_min"] == pytest.approx(2.0)


def test_bad_counts_and_clocks_are_refused():
    with pytest.raises(ValueError, match="rep >= 1"):
        timing.time_fn(lambda: None, CPU, rep=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        timing.time_fn(lambda: None, CPU, warmup=-1)
    with pytest.raises(ValueError, match="clock must be"):
        timing.time_fn(lambda: None, CPU, clock="gpu")
    with pytest.raises(ValueError, match="CPU work only"):
        timing.time_fn(lambda: None, torch.device("cuda"), clock="cpu")


def test_the_benchmark_scripts_time_with_it(clock):
    from bench.common import bench_fn

    calls = iter([0.004, 0.001, 0.003, 0.002])

    def fn():
        clock.t += next(calls)

    r = bench_fn(fn, CPU, warmup=1, rep=3)
    assert r["reps"] == 3 and r["ms"] == pytest.approx(2.0) and r["ms_min"] == pytest.approx(1.0)
