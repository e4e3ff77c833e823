"""Hardware-aware search (spvit/latency/): latency tables, the differentiable latency model, aligned FFN widths,
the CLI. Synthetic tables where measuring is not the point; small ViTs everywhere."""
import json
import math
import os
import random

import pytest
import timm
import torch

from spvit import cli, latency as L
from spvit.arch import Architecture, BlockArch
from spvit.choices import ATTN_CHOICES
from spvit.flops import arch_macs
from spvit.latency import timer
from spvit.models import supernet
from spvit.models.convert import signature_of

from . import helpers

KW = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5)


def small_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KW)


def synthetic_table(sig, name="vit_tiny_patch16_224", step=8, seed=0, **over) -> L.LatencyTable:
    """A table with random (but plausible) entries: attention skip < 1x1 < 3x3 < MSA, FFN increasing with jitter."""
    g = random.Random(seed)
    groups = []
    for b, hidden in enumerate(sig.block_mlp_hidden):
        widths = sorted(set(list(range(0, hidden, step)) + [hidden]))
        attn = {"skip": 0.01, "1x1": 0.2 + g.random() * 0.1, "3x3": 0.5 + g.random() * 0.2, "msa": 1.0 + g.random()}
        ffn = [0.02 + 0.01 * w + 0.05 * g.random() * (w > 0) for w in widths]
        groups.append(L.BlockGroup([b], attn, widths, ffn, {}))
    sd = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(sig).items()}
    fixed = {"embed": 0.3, "head": 0.1}
    if sig.family == "swin":
        fixed.update({f"merge{s}": 0.05 * s for s in range(1, len(sig.depths))})
    d = dict(model_name=name, family=sig.family, signature=sd, device={"name": "test", "class": "cpu", "threads": 1},
             dtype="fp32", batch=4, fixed_ms=fixed, groups=groups, meta={})
    d.update(over)
    return L.LatencyTable(**d)


def random_logits(sn, gen):
    with torch.no_grad():
        for a, m in zip(sn.attns, sn.mlps):
            a.kernel_thresholds.copy_(torch.randn(3, generator=gen) * 2)
            m.ffn_thresholds.copy_(torch.randn(m.ffn_thresholds.shape, generator=gen) * 2)


# ---------------------------------------------------------------------------------------------------------------- loss
def test_loss_equals_table_prediction_at_hard_gates():
    sn = supernet(small_vit())
    check_loss_at_hard_gates(sn, synthetic_table(sn.signature))


def check_loss_at_hard_gates(sn, table):
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        random_logits(sn, gen)
        arch = sn.architecture()
        pred = table.predict(arch)["ms"]
        # independent reference: the table's entries summed by hand from the read-out architecture
        ref = sum(table.fixed_ms.values())
        for i, b in enumerate(arch.blocks):
            grp = table.group(i)
            j = grp.ffn_widths.index(max(w for w in grp.ffn_widths if w <= b.ffn_width))
            if grp.ffn_widths[j] == b.ffn_width:
                f = grp.ffn_ms[j]
            else:
                x0, x1 = grp.ffn_widths[j], grp.ffn_widths[j + 1]
                f = grp.ffn_ms[j] + (grp.ffn_ms[j + 1] - grp.ffn_ms[j]) * (b.ffn_width - x0) / (x1 - x0)
            ref += grp.attn_ms[b.attn] + f
        assert pred == pytest.approx(ref, rel=1e-12)
        obj = L.LatencyObjective(table, sn, target_ms=0.5 * table.dense_ms())
        assert float(obj.predicted_ms().detach()) == pytest.approx(ref, rel=1e-5)
        lam = 3.0
        want = lam * (obj.dense_gflops * (obj.target_ms - ref) / table.dense_ms()) ** 2
        assert float(obj.loss(lam).detach()) == pytest.approx(want, rel=1e-4)


def test_loss_gradient_matches_finite_differences_fp64():
    """The indicator's value is a step (straight-through), so finite differences are taken of the smooth function
    whose value and derivative at the current logits are those of the indicators (§2.4):
    h(θ) = 1[θ0 > 0] + σ(σ(θ) − ½) − σ(σ(θ0) − ½), composed with the table's interpolation written out here."""
    sn = supernet(small_vit()).double()
    assert [n for n, _ in sn.named_parameters() if "thresholds" in n][:2] == [
        "vit.blocks.0.attn.kernel_thresholds", "vit.blocks.0.mlp.ffn_thresholds"]
    check_gradient_fp64(sn, synthetic_table(sn.signature, step=5))


def check_gradient_fp64(sn, table):
    """fp64 gradient of the latency loss vs central finite differences of its smooth surrogate (see the ViT test);
    the gate logits of ``sn.arch_parameters()`` alternate attention / FFN per block."""
    random_logits(sn, torch.Generator().manual_seed(2))
    with torch.no_grad():  # keep every kept count off the grid knots (the curve has a kink there)
        for m in sn.mlps:
            t = m.ffn_thresholds
            while int((t > 0).sum()) % 5 == 0:
                t[int(torch.argmin(t.abs()))] *= -1
    obj = L.LatencyObjective(table, sn, target_ms=0.6 * table.dense_ms())
    lam = 2.0 / obj.dense_gflops ** 2  # a loss of order 1 (the tiny model has few GFLOPs)
    params = sn.arch_parameters()
    grads = torch.autograd.grad(obj.loss(lam), params)
    theta0 = [p.detach().clone() for p in params]

    def h(theta, t0):
        s = lambda x: torch.sigmoid(torch.sigmoid(x) - 0.5)  # noqa: E731
        return (t0 > 0).double() + s(theta) - s(t0)

    def smooth_loss(thetas):
        total = sum(table.fixed_ms.values())
        for i in range(sn.signature.depth):
            g1, g3, gm = h(thetas[2 * i], theta0[2 * i])
            e1, e3, em = g1, g1 * g3, g1 * g3 * gm
            a = table.group(i).attn_ms
            k = h(thetas[2 * i + 1], theta0[2 * i + 1]).sum()
            xs, ys = table.group(i).ffn_widths, table.group(i).ffn_ms
            j = max(q for q in range(len(xs) - 1) if xs[q] <= float(k))
            f = ys[j] + (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]) * (k - xs[j])
            total = total + a["skip"] + e1 * (a["1x1"] - a["skip"]) + e3 * (a["3x3"] - a["1x1"]) + \
                em * (a["msa"] - a["3x3"]) + f
        return lam * (obj.dense_gflops * (obj.target_ms - total) / table.dense_ms()) ** 2

    assert float(smooth_loss(theta0)) == pytest.approx(float(obj.loss(lam).detach()), rel=1e-12)
    eps = 1e-6
    checked = 0
    for pi, g in enumerate(grads):
        for idx in random.Random(pi).sample(range(g.numel()), min(6, g.numel())):
            th = [t.clone() for t in theta0]
            th[pi].view(-1)[idx] += eps
            up = float(smooth_loss(th))
            th[pi].view(-1)[idx] -= 2 * eps
            down = float(smooth_loss(th))
            fd = (up - down) / (2 * eps)
            assert float(g.view(-1)[idx]) == pytest.approx(fd, rel=1e-6, abs=1e-9)
            checked += abs(fd) > 1e-6
    assert checked > 10


def test_interp_matches_numpy_and_slopes():
    np = pytest.importorskip("numpy")
    xs, ys = [0, 4, 10, 16], [0.1, 0.9, 1.3, 2.5]
    for k in [0, 1.5, 4, 7.2, 10, 15.9, 16]:
        assert L.interp(xs, ys, k) == pytest.approx(float(np.interp(k, xs, ys)))
        kt = torch.tensor(float(k), dtype=torch.float64, requires_grad=True)
        v = L.interp(xs, ys, kt)
        assert float(v.detach()) == pytest.approx(float(np.interp(k, xs, ys)))
        (g,) = torch.autograd.grad(v, kt)
        seg = min(max(i for i in range(3) if xs[i] <= k), 2)
        assert float(g) == pytest.approx((ys[seg + 1] - ys[seg]) / (xs[seg + 1] - xs[seg]))


def test_targets_and_impossible_targets():
    sig = signature_of(small_vit())
    table = synthetic_table(sig)
    assert L.resolve_target(table, speedup=2.0) == pytest.approx(table.dense_ms() / 2)
    assert L.resolve_target(table, latency_ms=1.0) == 1.0
    with pytest.raises(L.LatencyTableError, match="cannot be met"):
        L.resolve_target(table, speedup=0.5)
    with pytest.raises(L.LatencyTableError, match="cannot be met"):
        L.resolve_target(table, speedup=1e6)
    with pytest.raises(L.LatencyTableError, match="between"):
        L.resolve_target(table, latency_ms=table.dense_ms() * 2)
    with pytest.raises(L.LatencyTableError, match="exactly one"):
        L.resolve_target(table, speedup=2.0, latency_ms=1.0)


# --------------------------------------------------------------------------------------------------------- the table
def test_table_round_trip_and_mismatch_errors(tmp_path):
    sig = signature_of(small_vit())
    table = synthetic_table(sig)
    path = str(tmp_path / "lut.json")
    table.save(path)
    back = L.LatencyTable.load(path)
    assert back.to_dict() == table.to_dict()
    assert back.dense_ms() == table.dense_ms()
    with pytest.raises(FileExistsError, match="--force"):
        table.save(path)
    table.save(path, force=True)
    # model
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**KW, "embed_dim": 48, "num_heads": 3})
    with pytest.raises(L.LatencyTableError, match="embed_dim"):
        back.check_model(signature_of(other))
    back.check_model(sig)
    # device class and dtype
    back.check_device("cpu", torch.float32)
    cuda_table = L.LatencyTable.from_dict({**table.to_dict(), "device": {"name": "x", "class": "cuda sm_90"}})
    with pytest.raises(L.LatencyTableError, match="device class"):
        cuda_table.check_device("cpu", torch.float32)
    with pytest.raises(L.LatencyTableError, match="dtype fp32"):
        back.check_device("cpu", torch.bfloat16)
    with pytest.raises(L.LatencyTableError, match="batch 4"):
        back.check_device("cpu", "fp32", batch=8)
    # not a table / malformed / corrupt
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(L.LatencyTableError, match="not valid JSON"):
        L.LatencyTable.load(str(tmp_path / "bad.json"))
    (tmp_path / "arch.json").write_text(json.dumps({"format": "spvit-architecture"}))
    with pytest.raises(L.LatencyTableError, match="not an spvit latency table"):
        L.LatencyTable.load(str(tmp_path / "arch.json"))
    d = table.to_dict()
    del d["groups"][0]["attn_ms"]["3x3"]
    with pytest.raises(L.LatencyTableError, match="attention entry"):
        L.LatencyTable.from_dict(d)
    with pytest.raises(FileNotFoundError):
        L.LatencyTable.load(str(tmp_path / "missing.json"))


def test_table_family_must_match_its_signature(tmp_path):
    """The number of blocks comes from the table's family's signature class: a table whose family is unknown, or
    whose signature is not one of its family, is refused when read (not later, by a model it cannot fit)."""
    d = synthetic_table(signature_of(small_vit())).to_dict()
    for family, msg in (("foo", "unknown model family 'foo'"), ("swin", "not that of a swin model")):
        path = tmp_path / f"{family}.json"
        path.write_text(json.dumps({**d, "family": family}))
        with pytest.raises(L.LatencyTableError, match=msg):
            L.LatencyTable.load(str(path))
    assert L.LatencyTable.from_dict({k: v for k, v in d.items() if k != "family"}).family == "vit"  # older tables


def test_profile_measures_deployed_pieces():
    m = small_vit()
    table = L.profile(m, batch=2, threads=1, min_reps=1, max_reps=2, budget_s=0.0, show=False)
    sig = signature_of(m)
    assert len(table.groups) == 1 and table.groups[0].blocks == list(range(sig.depth))  # same shapes: measured once
    g = table.groups[0]
    assert g.ffn_widths[0] == 0 and g.ffn_widths[-1] == sig.mlp_hidden
    assert set(g.attn_ms) == set(ATTN_CHOICES) and all(v >= 0 for v in g.attn_ms.values())
    assert table.device["class"] == "cpu" and table.dtype == "fp32" and table.batch == 2
    for k in ("torch", "triton", "dense_measured_ms", "clock", "stat"):
        assert k in table.meta
    assert table.dense_ms() > table.min_ms() > 0
    table.check_model(sig)


# ------------------------------------------------------------------------------------------------ CPU allocator
MALLOC_DRIVER = """
import ctypes, json, sys, torch
from spvit import latency as L
state = L.set_steady_malloc() if sys.argv[1] == "steady" else L.malloc_state()
class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
torch.ones(1 << 10)  # torch's own first allocations out of the way
before = libc.mallinfo2()
x = torch.ones(20 << 18)  # 20 MiB of float32: a demo-size ViT's FFN activation at batch 256
live = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(json.dumps({"state": state, "mmapped": live.hblkhd - before.hblkhd, "heap_grew": live.arena - before.arena,
                  "heap_kept": freed.arena - before.arena}))
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_steady_malloc_keeps_large_blocks_on_the_heap():
    """glibc by default maps a fresh process's 20 MiB block with mmap (and unmaps it on free: its pages fault again
    on the next batch); with the steady thresholds it comes from the heap and stays there once freed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(mode):
        r = subprocess.run([sys.executable, "-c", MALLOC_DRIVER, mode], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    mib = 1 << 20
    default, steady = run("default"), run("steady")
    assert "not set" in default["state"] and "steady" in steady["state"]
    assert default["mmapped"] >= 20 * mib and default["heap_grew"] < mib, default  # default: the block is mmapped
    assert steady["mmapped"] < mib and steady["heap_grew"] >= 16 * mib, steady  # steady: from the heap
    assert steady["heap_kept"] >= 16 * mib, steady  # (free room reused) and not trimmed when freed
    env["MALLOC_MMAP_THRESHOLD_"] = "1000000"  # a setting of the user's is left alone, and said
    assert "from the environment" in run("steady")["state"]


def test_table_records_allocator_and_compare_warns_on_mismatch(monkeypatch):
    from spvit.deploy import deploy
    from spvit.models import prune

    vit = small_vit()
    sig = signature_of(vit)
    table = L.profile(vit, batch=2, threads=1, min_reps=1, max_reps=2, budget_s=0.0, show=False)
    assert table.meta["cpu_malloc"] == L.malloc_state() and "CPU allocator" in table.summary()
    arch = Architecture("vit_tiny_patch16_224", sig, [BlockArch("msa", tuple(range(64)))] * sig.depth)
    dep = deploy(prune(vit, arch))
    table.meta["cpu_malloc"] = "glibc 2.99, steady: mmap threshold 32 MiB, trim threshold 1024 MiB"
    monkeypatch.setattr(timer, "_malloc_state", None)  # as in a process that never fixed the allocator
    with pytest.warns(UserWarning, match="allocator"):
        L.compare(table, dep, steady_malloc=False, min_reps=1, max_reps=1, budget_s=0.0)
    monkeypatch.setattr(timer, "_malloc_state", "glibc 2.36, steady: mmap threshold 32 MiB, trim threshold 1024 MiB")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.compare(table, dep, min_reps=1, max_reps=1, budget_s=0.0)  # same regime: no warning


# ------------------------------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("full,align", [(128, 64), (100, 64), (96, 32), (10, 4)])
def test_aligned_count_awkward_widths(full, align):
    cases = {0: 0, 1: align, align - 1: align, align: align, align + 1: align, full: full}
    for kept, want in cases.items():
        if kept > full:
            continue
        got = L.aligned_count(kept, full, align)
        assert got == min(want, full), (kept, got)
        assert got == 0 or got == full or got % align == 0
    # brute force: the nearest allowed width (positive multiples up to full, and full), ties to the larger
    for kept in range(1, full + 1):
        allowed = list(range(align, full + 1, align)) + [full]
        best = min(allowed, key=lambda m: (abs(m - kept), -m))
        assert L.aligned_count(kept, full, align) == best, kept
    assert L.aligned_count(37, 64, 0) == 37 and L.aligned_count(37, 64, 1) == 37
    with pytest.raises(ValueError):
        L.aligned_count(65, 64, 8)


def test_aligned_keep_takes_largest_logits():
    logits = torch.tensor([0.5, -0.1, 2.0, -3.0, 0.2, -0.05, 1.0, -2.0])
    assert L.aligned_keep(logits, 1) == (0, 2, 4, 6)
    assert L.aligned_keep(logits, 3) == (0, 2, 6)  # kept 4 -> 3 units: the three largest logits
    assert L.aligned_keep(logits, 6) == (0, 1, 2, 4, 5, 6)  # 4 -> 6: adds the two closest to being kept
    assert L.aligned_keep(torch.full((8,), -1.0), 4) == ()


def test_align_architecture_flops_and_latency():
    sn = supernet(small_vit())
    table = synthetic_table(sn.signature, step=8)
    random_logits(sn, torch.Generator().manual_seed(3))
    arch = L.align_architecture(sn, 8, table)
    raw = sn.architecture()
    for b, r, m in zip(arch.blocks, raw.blocks, sn.mlps):
        assert b.attn == r.attn
        assert b.ffn_width == L.aligned_count(r.ffn_width, m.full_hidden, 8)
    assert arch.meta["gflops"] == pytest.approx(arch_macs(arch) / 1e9)
    assert arch.meta["predicted_ms"] == pytest.approx(table.predict(arch)["ms"])
    assert arch.meta["ffn_align"] == 8


# --------------------------------------------------------------------------------------------------------------- CLI
def test_cli_profile_tiny(tmp_path, capsys):
    out = str(tmp_path / "lut.json")
    argv = ["profile", "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(KW), "--batch", "2",
            "--threads", "1", "--min-reps", "1", "--budget", "0", "--no-progress", "--out", out]
    assert cli.main(argv) == 0
    assert "measured once" in capsys.readouterr().out
    table = L.LatencyTable.load(out)
    assert table.batch == 2 and table.groups[0].ffn_widths[-1] == 64
    before = open(out).read()
    assert cli.main(argv) == 2  # never overwritten without --force
    assert "--force" in capsys.readouterr().err and open(out).read() == before
    assert cli.main(argv + ["--clock", "cpu", "--force", "--threads", "2"]) == 2
    assert "one thread" in capsys.readouterr().err


def test_search_one_epoch_with_latency_table(tmp_path, capsys):
    from spvit.models.registry import DEMO_MODEL

    mk = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
          "mlp_ratio": 2.0}
    vit = timm.create_model(DEMO_MODEL, pretrained=False, num_classes=10, **mk)
    table = synthetic_table(signature_of(vit), name=DEMO_MODEL)
    lut = str(tmp_path / "lut.json")
    table.save(lut)
    base = ["search", "--model", DEMO_MODEL, "--model-kwargs", json.dumps(mk), "--pretrained", "none", "--data",
            "digits", "--num-classes", "10", "--epochs", "1", "--batch-size", "32", "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--mixup", "0", "--cutmix", "0", "--no-repeated-aug",
            "--latency-table", lut]
    assert cli.main(base + ["--target-speedup", "50", "--out", str(tmp_path / "bad")]) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    assert cli.main(base + ["--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --target-speedup" in capsys.readouterr().err
    from spvit.config import SearchConfig

    cfg = SearchConfig.from_dict({"model": DEMO_MODEL, "model_kwargs": mk, "pretrained": "none", "data": "digits",
                                  "num_classes": 10, "epochs": 1, "batch_size": 32, "num_workers": 0,
                                  "device": "cpu", "progress": False, "mixup": 0.0, "cutmix": 0.0,
                                  "repeated_aug": False, "train_limit": 64, "val_limit": 64, "latency_table": lut,
                                  "target_speedup": 1.5, "ffn_align": 8, "out": str(tmp_path / "run"),
                                  "tensorboard": False})
    from spvit import search

    res = search.run(cfg)
    arch = Architecture.load(res["arch"])
    assert arch.meta["predicted_ms"] == pytest.approx(table.predict(arch)["ms"])
    assert arch.meta["target_ms"] == pytest.approx(table.dense_ms() / 1.5)
    assert arch.meta["gflops"] == pytest.approx(arch_macs(arch) / 1e9)
    assert all(w in (0, 64) or w % 8 == 0 for w in arch.ffn_widths)
    rows = open(tmp_path / "run" / "metrics.csv").read()
    assert "latency_loss" in rows and "pred_ms" in rows


def test_cli_bench_predicted_vs_measured(tmp_path, capsys):
    from spvit.deploy import deploy
    from spvit.models import prune

    vit = small_vit()
    sig = signature_of(vit)
    arch = Architecture("vit_tiny_patch16_224", sig, [BlockArch("msa", tuple(range(64))), BlockArch("1x1", (0, 5)),
                                                     BlockArch("skip", ())])
    path = str(tmp_path / "deployed.pth")
    deploy(prune(vit, arch)).save(path)
    lut = str(tmp_path / "lut.json")
    table = L.profile(vit, batch=2, threads=1, min_reps=1, max_reps=2, budget_s=0.0, show=False)
    table.save(lut)
    assert cli.main(["bench", "--checkpoint", path, "--latency-table", lut, "--device", "cpu", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "predicted ms" in out and "measured ms" in out and "speedup: predicted" in out
    pred = table.predict(arch)["ms"]
    assert f"{pred:14.3f}" in out  # the table's prediction of this architecture
    assert cli.main(["bench", "--checkpoint", path, "--latency-table", lut, "--device", "cpu", "--dtype", "bf16"]) == 2
    assert "dtype fp32" in capsys.readouterr().err
    assert cli.main(["bench", "--checkpoint", path, "--latency-table", lut, "--device", "cpu", "--batch-size",
                     "7"]) == 2
    assert "batch 2" in capsys.readouterr().err
    other = synthetic_table(signature_of(timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                                           **{**KW, "depth": 2})))
    other.save(str(tmp_path / "other.json"))
    assert cli.main(["bench", "--checkpoint", path, "--latency-table", str(tmp_path / "other.json"), "--device",
                     "cpu"]) == 2
    assert "depth" in capsys.readouterr().err


DDP_DRIVER = """
import json, os, sys
from spvit import distributed, latency as L
dist = distributed.init_distributed("cpu")
path = sys.argv[1] if dist.rank == 0 else "/nonexistent/only-rank-0-reads.json"
try:
    res = L.load_table(path, dist).to_dict()
except L.LatencyTableError as exc:
    res = {"error": str(exc)}
json.dump(res, open(os.path.join(sys.argv[2], f"rank{dist.rank}.json"), "w"))
import torch.distributed as tdist
tdist.destroy_process_group()
"""


def test_table_read_on_rank0_and_broadcast(tmp_path):
    import subprocess
    import sys

    from .pipeline_helpers import free_port, repo_root

    table = synthetic_table(signature_of(small_vit()))
    lut = str(tmp_path / "lut.json")
    table.save(lut)
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for path, ok in ((lut, True), (str(tmp_path / "missing.json"), False)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver), path, str(tmp_path)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        r = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
        if ok:
            assert r[0] == r[1] == json.loads(json.dumps(table.to_dict()))
        else:
            assert "not found" in r[0]["error"] and r[0] == r[1]


# ------------------------------------------------------------------------------------------------------------ Swin
SWIN_KW = dict(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), mlp_ratio=4.0,
               num_classes=5)
SWIN_NAME = "swin_tiny_patch4_window7_224"


def tiny_swin(**over):
    """Two stages: stage 0 on an 8x8 map in 2x2 windows of 4 (even blocks plain, odd blocks shifted by 2); stage 1
    on a 4x4 map, one window, never shifted."""
    return helpers.tiny_swin(timm_name=SWIN_NAME, **{**SWIN_KW, **over})


def test_swin_profile_groups_and_round_trip(tmp_path):
    from spvit.models.convert import swin_signature_of

    m = tiny_swin()
    sig = swin_signature_of(m)
    table = L.profile(m, batch=2, threads=1, min_reps=1, max_reps=2, budget_s=0.0, show=False, context=2)
    assert table.family == "swin" and table.depth == 4
    # same stage and same shift share one set of measurements; the shifted block of stage 0 has its own
    assert [(g.blocks, g.shape["stage"], g.shape["shift"]) for g in table.groups] == [
        ([0], 0, [0, 0]), ([1], 0, [2, 2]), ([2, 3], 1, [0, 0])]
    assert "measured once, shared" in table.groups[2].shape["note"]
    for g, hidden in zip(table.groups, (64, 64, 128)):
        assert g.ffn_widths[0] == 0 and g.ffn_widths[-1] == hidden and len(g.ffn_widths) == 17  # step hidden / 16
        assert set(g.attn_ms) == set(ATTN_CHOICES) and all(v >= 0 for v in g.attn_ms.values())
    assert set(table.fixed_ms) == {"embed", "merge1", "head"}
    assert table.dense_ms() > table.min_ms() > 0 and table.meta["ffn_step"] == [4, 4, 8]
    table.check_model(sig)
    path = str(tmp_path / "swin_lut.json")
    table.save(path)
    back = L.LatencyTable.load(path)
    assert back.to_dict() == table.to_dict()
    back.check_model(sig, SWIN_NAME)  # tuples of the signature vs lists read back from JSON
    arch = Architecture(SWIN_NAME, sig, [BlockArch("msa", tuple(range(64))), BlockArch("3x3", (1, 5, 9)),
                                         BlockArch("skip", ()), BlockArch("1x1", tuple(range(40)))])
    ref = sum(table.fixed_ms.values())
    ref += table.groups[0].attn_ms["msa"] + table.groups[0].ffn_ms[-1]
    g1 = table.groups[1]  # width 3 lies between the grid's 0 and 4
    ref += g1.attn_ms["3x3"] + g1.ffn_ms[0] + (g1.ffn_ms[1] - g1.ffn_ms[0]) * 3 / 4
    g2 = table.groups[2]
    ref += g2.attn_ms["skip"] + g2.ffn_ms[0] + g2.attn_ms["1x1"] + g2.ffn_ms[5]  # width 40 = 5 * 8, a knot
    assert back.predict(arch)["ms"] == pytest.approx(ref, rel=1e-12)
    assert "blocks 2-3 [stage 1, no shift]" in back.summary()


def test_swin_table_mismatch_errors():
    from spvit.models.convert import swin_signature_of

    sw = tiny_swin()
    sn = supernet(sw)
    swin_table = synthetic_table(sn.signature, name=SWIN_NAME, step=8)
    vit_table = synthetic_table(signature_of(small_vit()))
    with pytest.raises(L.LatencyTableError, match="vit model .* swin model"):
        L.LatencyObjective(vit_table, sn, 1.0)
    with pytest.raises(L.LatencyTableError, match="swin model .* vit model"):
        L.LatencyObjective(swin_table, supernet(small_vit()), 1.0)
    other = swin_signature_of(tiny_swin(depths=(2, 4), num_heads=(1, 2)))
    with pytest.raises(L.LatencyTableError, match="depths"):
        swin_table.check_model(other)
    with pytest.raises(TypeError, match="dense timm model"):
        L.profile(sn, min_reps=1, max_reps=1, budget_s=0.0, show=False)
    d = swin_table.to_dict()
    d["groups"] = d["groups"][:-1]  # block 3 has no entry
    with pytest.raises(L.LatencyTableError, match="cover blocks 0..3"):
        L.LatencyTable.from_dict(d)


def test_swin_loss_equals_table_prediction_at_hard_gates():
    sn = supernet(tiny_swin())
    check_loss_at_hard_gates(sn, synthetic_table(sn.signature, name=SWIN_NAME, step=8))


def test_swin_loss_gradient_matches_finite_differences_fp64():
    sn = supernet(tiny_swin()).double()
    names = [n for n, _ in sn.named_parameters() if "thresholds" in n]
    assert names[:2] == ["swin.layers.0.blocks.0.attn.kernel_thresholds_full",
                         "swin.layers.0.blocks.0.mlp.ffn_thresholds"] and len(names) == 8
    check_gradient_fp64(sn, synthetic_table(sn.signature, name=SWIN_NAME, step=5))


def test_swin_align_architecture_nested_stages(tmp_path):
    sn = supernet(tiny_swin())
    table = synthetic_table(sn.signature, name=SWIN_NAME, step=8)
    random_logits(sn, torch.Generator().manual_seed(4))
    arch = L.align_architecture(sn, 16, table)
    raw = sn.architecture()
    for b, r, m, full in zip(arch.blocks, raw.blocks, sn.mlps, (64, 64, 128, 128)):
        assert m.full_hidden == full and b.attn == r.attn
        assert b.ffn_width == L.aligned_count(r.ffn_width, full, 16)
        assert b.ffn_width in (0, full) or b.ffn_width % 16 == 0
        assert set(b.ffn_keep) <= set(range(full))
    assert arch.meta["gflops"] == pytest.approx(arch_macs(arch) / 1e9)
    assert arch.meta["predicted_ms"] == pytest.approx(table.predict(arch)["ms"])
    path = str(tmp_path / "arch.json")
    arch.save(path)
    back = Architecture.load(path)
    assert [len(s) for s in back.stages] == [2, 2] and back.ffn_widths == arch.ffn_widths


def test_cli_profile_tiny_swin(tmp_path, capsys):
    out = str(tmp_path / "lut.json")
    kw = {**SWIN_KW, "depths": list(SWIN_KW["depths"]), "num_heads": list(SWIN_KW["num_heads"])}
    argv = ["profile", "--model", SWIN_NAME, "--model-kwargs", json.dumps(kw), "--batch", "1", "--threads", "1",
            "--min-reps", "1", "--budget", "0", "--context", "1", "--ffn-step", "32", "--no-progress", "--out", out]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "stage 0, shift 2x2" in text and "merge1" in text
    table = L.LatencyTable.load(out)
    assert table.model_name == SWIN_NAME and table.family == "swin"
    assert [g.ffn_widths for g in table.groups] == [[0, 32, 64], [0, 32, 64], [0, 32, 64, 96, 128]]


def test_cli_bench_swin_predicted_vs_measured(tmp_path, capsys):
    from spvit.deploy import deploy
    from spvit.models import prune
    from spvit.models.convert import swin_signature_of

    sw = tiny_swin()
    sig = swin_signature_of(sw)
    arch = Architecture(SWIN_NAME, sig, [BlockArch("msa", tuple(range(64))), BlockArch("3x3", (1, 5, 9)),
                                         BlockArch("skip", ()), BlockArch("1x1", tuple(range(40)))])
    path = str(tmp_path / "deployed.pth")
    deploy(prune(sw, arch)).save(path)
    lut = str(tmp_path / "lut.json")
    table = L.profile(sw, batch=2, threads=1, min_reps=1, max_reps=2, budget_s=0.0, show=False, context=1,
                      model_name=SWIN_NAME)
    table.save(lut)
    assert cli.main(["bench", "--checkpoint", path, "--latency-table", lut, "--device", "cpu", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{table.predict(arch)['ms']:14.3f}" in out and f"{table.dense_ms():14.3f}" in out
    assert "speedup: predicted" in out
    vit_lut = str(tmp_path / "vit.json")
    synthetic_table(signature_of(small_vit())).save(vit_lut)
    assert cli.main(["bench", "--checkpoint", path, "--latency-table", vit_lut, "--device", "cpu"]) == 2
    assert "vit model" in capsys.readouterr().err


def test_search_one_epoch_swin_with_latency_table(tmp_path):
    from spvit import search
    from spvit.config import SearchConfig
    from spvit.models.convert import swin_signature_of

    mk = {"img_size": 16, "patch_size": 2, "in_chans": 1, "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2],
          "window_size": 4, "mlp_ratio": 2.0}
    sig = swin_signature_of(timm.create_model(SWIN_NAME, pretrained=False, num_classes=10, **mk))
    table = synthetic_table(sig, name=SWIN_NAME, step=8)
    lut = str(tmp_path / "lut.json")
    table.save(lut)
    cfg = SearchConfig.from_dict({"model": SWIN_NAME, "model_kwargs": mk, "pretrained": "none", "data": "digits",
                                  "input_size": 16, "num_classes": 10, "epochs": 1, "batch_size": 16,
                                  "num_workers": 0, "device": "cpu", "progress": False, "mixup": 0.0, "cutmix": 0.0,
                                  "repeated_aug": False, "train_limit": 32, "val_limit": 16, "latency_table": lut,
                                  "target_speedup": 1.5, "ffn_align": 16, "out": str(tmp_path / "run"),
                                  "tensorboard": False})
    res = search.run(cfg)
    arch = Architecture.load(res["arch"])
    assert arch.family == "swin" and [len(s) for s in arch.stages] == [2, 2]
    assert arch.meta["predicted_ms"] == pytest.approx(table.predict(arch)["ms"])
    assert arch.meta["target_ms"] == pytest.approx(table.dense_ms() / 1.5)
    assert arch.meta["gflops"] == pytest.approx(arch_macs(arch) / 1e9)
    for w, full in zip(arch.ffn_widths, sig.block_mlp_hidden):
        assert w in (0, full) or w % 16 == 0
    rows = open(tmp_path / "run" / "metrics.csv").read()
    assert "latency_loss" in rows and "pred_ms" in rows


# ------------------------------------------------------------------------------------------------- CPU and CUDA
def check_profile_and_compare(family, device, dtype):
    """Profile a tiny model on ``device`` / ``dtype``, check the table's device record, predict and measure a mixed
    architecture and the dense model, and refuse the table for another device class or dtype."""
    from spvit.deploy import deploy
    from spvit.models import prune

    device = torch.device(device)
    m = (small_vit() if family == "vit" else tiny_swin()).eval()
    sig = signature_of(m)
    table = L.profile(m, device=device, dtype=L.dtype_name(dtype), batch=8, min_reps=2, max_reps=4, budget_s=0.0,
                      show=False, context=2)
    assert table.device["class"] == L.device_class(device) and table.dtype == L.dtype_name(dtype)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        assert table.device["class"] == f"cuda sm_{major}{minor}"
        assert "cpu_malloc" not in table.meta  # the CPU allocator is not touched for a GPU table
    else:
        assert table.device["class"] == "cpu" and "steady" in table.meta["cpu_malloc"]
    assert set(table.device["backends"]) == {"deploy_conv", "pruned_ffn"}
    assert all(math.isfinite(v) and v > 0 for v in table.fixed_ms.values())
    for g in table.groups:
        assert all(math.isfinite(v) and v > 0 for k, v in g.attn_ms.items() if k != "skip")
        assert all(math.isfinite(v) and v >= 0 for v in g.ffn_ms)
    kinds = ["msa", "3x3", "1x1", "skip"]
    name = SWIN_NAME if family == "swin" else "vit_tiny_patch16_224"
    arch = Architecture(name, sig, [BlockArch(kinds[i % 4], tuple(range(0, h, 2)))
                                    for i, h in enumerate(sig.block_mlp_hidden)])
    dense_arch = Architecture(name, sig, [BlockArch("msa", tuple(range(h))) for h in sig.block_mlp_hidden])
    dep = deploy(prune(m, arch), dtype=dtype, device=device)
    dense = deploy(prune(m, dense_arch), dtype=dtype, device=device)
    r = L.compare(table, dep, dense, rounds=2, min_reps=2, max_reps=4, budget_s=0.0)
    for k in ("predicted_ms", "measured_ms", "dense_predicted_ms", "dense_measured_ms", "predicted_speedup",
              "measured_speedup"):
        assert math.isfinite(r[k]) and r[k] > 0, (k, r)
    assert r["predicted_ms"] == pytest.approx(table.predict(arch)["ms"])
    other_class = "cpu" if device.type == "cuda" else "cuda sm_90"
    other = L.LatencyTable.from_dict({**table.to_dict(), "device": {**table.device, "class": other_class}})
    with pytest.raises(L.LatencyTableError, match="device class"):
        other.check_device(device, dtype)
    with pytest.raises(L.LatencyTableError, match="device class"):
        L.compare(other, dep)
    with pytest.raises(L.LatencyTableError, match="dtype"):
        table.check_device(device, torch.float16)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_profile_and_compare_on_cpu_fp32(family):
    check_profile_and_compare(family, "cpu", torch.float32)


# Run by the GPU check (bench/gpu_check.sh, step "tests"); skipped without a CUDA GPU.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_profile_and_compare_on_cuda_bf16(family):
    check_profile_and_compare(family, "cuda", torch.bfloat16)


# ------------------------------------------------------------------------------------------------ package layout
LATENCY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spvit", "latency")
LIGHT = ("timer", "table", "objective", "align", "validate")  # what the search needs: no deployment code


def _module_imports(name: str):
    """(module-level, in-function) imports of ``spvit.latency.<name>`` as absolute module names: for ``from X import
    a, b`` both X and X.a, X.b (the names may be submodules)."""
    import ast

    path = os.path.join(LATENCY_DIR, name + ".py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    pkg = ["spvit", "latency"]
    top_level = set(map(id, tree.body))
    outer, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            mods = {base} | {f"{base}.{a.name}" for a in node.names}
        else:
            continue
        (outer if id(node) in top_level else inner).update(mods)
    return outer, inner


def test_latency_package_split_by_job():
    """Each module of spvit.latency says its job, stays under 600 lines and imports the package's own modules at
    module level only; the table, objective, alignment, validation and timer reach no deployment or model code (the
    search needs none), and family-specific decisions (``is_swin``, comparisons with a family name) live in
    ``family.py`` alone."""
    import ast

    names = sorted(f[:-3] for f in os.listdir(LATENCY_DIR) if f.endswith(".py"))
    assert {"family", "profiling", "pieces", *LIGHT} <= set(names)
    edges = {}
    for name in names:
        text = open(os.path.join(LATENCY_DIR, name + ".py"), encoding="utf-8").read()
        tree = ast.parse(text)
        assert ast.get_docstring(tree), f"{name}.py has no module docstring"
        assert len(text.splitlines()) <= 600, name
        outer, inner = _module_imports(name)
        assert not {m for m in inner if m.startswith("spvit")}, (name, inner)
        edges[name] = outer
        if name != "family":
            assert "is_swin" not in text, name
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                    assert not {"vit", "swin"} & set(consts), (name, ast.unparse(node))
    for name in LIGHT:
        seen, todo = set(), [name]
        while todo:
            n = todo.pop()
            for m in edges[n]:
                if m.startswith("spvit.latency."):
                    sub = m.split(".")[2]
                    if sub in edges and sub not in seen:
                        seen.add(sub)
                        todo.append(sub)
                else:
                    assert not m.startswith(("spvit.deploy", "spvit.models", "spvit.engine")), (name, n, m)
        assert not seen & {"profiling", "family", "pieces", "vit_pieces", "swin_pieces"}, (name, seen)
