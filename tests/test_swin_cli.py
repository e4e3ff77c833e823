"""Swin through the runners and the `spvit` command: shipped configs, the Swin training recipe, a tiny search,
fine-tune and eval on the digits set."""
import json
import os

import pytest
import torch
import yaml

import spvit
from spvit import cli, optim
from spvit.distributed import DistInfo
from .pipeline_helpers import repo_root

# a tiny Swin on the 16x16 digits: 8x8 patch grid, window 4 (stage 1: 4 windows, shifted odd block), 2 stages
TINY_SWIN = {"img_size": 16, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depths": [2, 2], "num_heads": [1, 2],
             "window_size": 4, "mlp_ratio": 2.0}
SWIN_CONFIGS = sorted(n[:-5] for n in os.listdir(os.path.join(repo_root(), "configs")) if n.startswith("swin_"))


def _tiny_flags():
    """Flags that shrink a shipped Swin config to a run of seconds (the shipped config gives the rest)."""
    return ["--model-kwargs", json.dumps(TINY_SWIN), "--pretrained", "none", "--data", "digits", "--device", "cpu",
            "--batch-size", "16", "--epochs", "1", "--num-workers", "0", "--no-progress", "--input-size", "16",
            "--mixup", "0", "--cutmix", "0"]


def _shipped_plus_limits(tmp_path, name):
    """The shipped config ``name`` with the data limits of a quick run added (no flag exists for them)."""
    y = yaml.safe_load(open(os.path.join(repo_root(), "configs", name + ".yaml")))
    y.update(train_limit=32, val_limit=16, tensorboard=False)
    p = tmp_path / (name + ".yaml")
    p.write_text(yaml.safe_dump(y))
    return str(p)


def _tiny_dense_gflops():
    import timm
    return spvit.gflops(timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **TINY_SWIN))


@pytest.mark.parametrize("name", SWIN_CONFIGS)
def test_swin_configs_resolve_to_the_original_recipe(name):
    from spvit.config import FinetuneConfig, SearchConfig

    search = "search" in name
    args = cli.build_parser().parse_args(["search" if search else "finetune", "--config", name])
    c = cli.resolve_config(SearchConfig if search else FinetuneConfig, args)
    size = name.split("_")[1]
    assert c.model == {"tn": "swin_tiny", "sm": "swin_small", "bs": "swin_base"}[size] + "_patch4_window7_224"
    assert c.drop_path == {"tn": 0.2, "sm": 0.3, "bs": 0.5}[size]
    assert c.lr == 5e-5 and c.weight_decay == 0.05 and c.clip_grad == 5.0 and c.warmup_epochs == 0
    assert c.scale_lr and c.scale_all_lrs and c.sched_per_step and not c.repeated_aug
    assert c.mixup == 0.8 and c.cutmix == 1.0 and c.smoothing == 0.1 and c.aa == "rand-m9-mstd0.5-inc1"
    batch = 92 if name == "swin_bs_l01_t100_search" else 128
    assert c.batch_size == batch and c.input_size == 224
    if search:
        lam, target = {"tn": (2.8, 3.2), "sm": (0.4, 5.5), "bs": (0.1, 10.0)}[size]
        assert (c.loss_lambda, c.target_gflops, c.theta, c.alpha) == (lam, target, 1.5, 100.0)
        assert c.epochs == 21 and c.sched_epochs == 300 and c.arc_sched_epochs == 150
        assert c.min_lr == c.lr and c.arc_lr == c.arc_min_lr == 5e-4
    else:
        assert c.min_lr == 5e-6 and c.epochs == (200 if "dist" in name else 130)
        assert c.distillation == ("hard" if "dist" in name else "none")


def test_swin_recipe_lr_scaling_and_decay_groups():
    from spvit.config import SearchConfig

    dist = DistInfo(rank=0, world=8)
    cfg = SearchConfig(batch_size=92, scale_all_lrs=True)
    assert optim.effective_lr(cfg, dist) == pytest.approx(5e-5 * 736 / 512)
    assert optim.other_lr_scale(cfg, dist) == pytest.approx(736 / 512)
    assert optim.other_lr_scale(SearchConfig(batch_size=128), dist) == 1.0  # DeiT: arc lr, floors not scaled
    from tests.test_swin import tiny_swin
    sn = spvit.supernet(tiny_swin())
    groups = optim.decay_groups(sn, 0.05)
    decayed = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in sn.named_parameters() if id(p) in decayed}
    assert not any("relative_position_bias_table" in n or "thresholds" in n for n in names)
    assert "swin.layers.0.blocks.0.attn.head_probs" in names and "swin.layers.0.blocks.0.attn.qk.weight" in names


def test_swin_search_finetune_eval_from_the_shipped_configs(tmp_path, capsys):
    flags = _tiny_flags()
    dense = _tiny_dense_gflops()
    out = tmp_path / "s"
    search_conf = _shipped_plus_limits(tmp_path, "swin_tn_l28_t32_search")
    ft_conf = _shipped_plus_limits(tmp_path, "swin_tn_l28_t32_ft")
    rc = cli.main(["search", "--config", search_conf, *flags, "--out", str(out), "--target-gflops",
                   str(0.7 * dense), "--loss-lambda", str(30 / dense ** 2)])
    assert rc == 0, capsys.readouterr().err
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["alpha"] == 100.0 and saved["clip_grad"] == 5.0 and saved["drop_path"] == 0.2
    arch = spvit.Architecture.load(str(out / "arch.json"))
    assert arch.family == "swin" and [len(s) for s in arch.stages] == [2, 2]
    assert "stages" in json.load(open(out / "arch.json"))
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert any(k.endswith("kernel_thresholds_full") for k in ck["model"])
    ft = tmp_path / "ft"
    rc = cli.main(["finetune", "--config", ft_conf, *flags, "--arch", str(out / "arch.json"), "--out",
                   str(ft)])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(ft / "best.pth"), "--data", "digits", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["gflops"] == pytest.approx(spvit.gflops(arch)) and 0 <= r["acc1"] <= 100
    assert cli.main(["bench", "--checkpoint", str(ft / "best.pth"), "--iters", "2", "--batch-size", "4",
                     "--device", "cpu"]) == 0
    # carrying the searched weights (--init <search checkpoint>)
    rc = cli.main(["finetune", "--config", ft_conf, *flags, "--arch", str(out / "arch.json"), "--out",
                   str(tmp_path / "ft2"), "--init", str(out / "checkpoint.pth"), "--epochs", "1"])
    assert rc == 0, capsys.readouterr().err


SEARCH_DRIVER = """
import json, os, sys, torch
from spvit import search
cfg = json.loads(sys.argv[1])
res = search.run(cfg)
torch.save(res["supernet"].state_dict(), os.path.join(cfg["out"], f"rank{int(os.environ.get('RANK', '0'))}.pt"))
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_swin_search_under_ddp_keeps_per_rank_bn_statistics(tmp_path):
    """torchrun, 2 processes (gloo): parameters identical on both ranks; the conv BNs' running statistics are per
    rank, since the Swin recipe does not broadcast buffers (docs/method.md §7.6)."""
    import subprocess
    import sys

    from spvit import search
    from .pipeline_helpers import free_port, tiny_cfg

    dense = _tiny_dense_gflops()
    cfg = tiny_cfg(search.DEFAULTS, tmp_path / "ddp", model="swin_tiny_patch4_window7_224",
                   model_kwargs=dict(TINY_SWIN), batch_size=8, epochs=1, train_limit=64, val_limit=32,
                   target_gflops=0.7 * dense, loss_lambda=30 / dense ** 2, arc_lr=0.05, min_lr=1e-5,
                   clip_grad=5.0, scale_all_lrs=True)
    driver = tmp_path / "driver.py"
    driver.write_text(SEARCH_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver), json.dumps(cfg)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    import timm
    sn = spvit.supernet(timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **TINY_SWIN))
    params = [n for n, _ in sn.named_parameters()]
    assert set(params) < set(r0)
    for k in params:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in parameter {k}"
    bn = [k for k in r0 if k.endswith("bn_3x3.running_mean")]
    assert bn and any(not torch.equal(r0[k], r1[k]) for k in bn)
    assert os.path.exists(tmp_path / "ddp" / "arch.json")


def test_per_iteration_schedule_follows_the_iteration_cosine():
    """``sched_per_step``: iteration i of the run uses the cosine value at max(i - 1, 0), in iterations (§7.6)."""
    import math

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    s = optim.Schedule(opt, 1e-3, 1e-5, t_initial=3, warmup_t=1, warmup_lr=1e-6, per_step=True)
    n = 4  # iterations per epoch: warm-up 4 iterations, cosine over 12
    for epoch in range(4):
        for step in range(n):
            t = max(epoch * n + step - 1, 0)
            want = (1e-6 + t * (1e-3 - 1e-6) / 4 if t < 4 else
                    1e-5 if t >= 12 else 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 12)))
            assert s.lr_at(epoch, step, n) == pytest.approx(want)
    per_epoch = optim.Schedule(opt, 1e-3, 1e-5, t_initial=3)
    assert [per_epoch.lr_at(2, k, n) for k in range(n)] == [per_epoch.lr(2)] * n  # DeiT: constant within an epoch


def test_swin_finetune_steps_the_schedule_every_iteration(tmp_path):
    """A 2-epoch fine-tune with the Swin config: the optimiser ends at the lr of the run's last iteration."""
    import math
    import timm

    from spvit import finetune
    from .pipeline_helpers import tiny_cfg

    base = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **TINY_SWIN)
    sn = spvit.supernet(base)
    arch = sn.architecture()
    path = tmp_path / "arch.json"
    arch.save(str(path))
    cfg = tiny_cfg(finetune.DEFAULTS, tmp_path / "ft", model="swin_tiny_patch4_window7_224",
                   model_kwargs=dict(TINY_SWIN), arch=str(path), init="none", epochs=2, train_limit=64, val_limit=16,
                   batch_size=16, lr=1e-3, min_lr=1e-5, sched_per_step=True)
    res = finetune.run(cfg)
    n = 64 // 16
    ck = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)
    opt_lr = ck["optimizers"][0]["param_groups"][0]["lr"]
    t = 2 * n - 2  # the last iteration (index 2n - 1) uses the value at 2n - 2
    assert opt_lr == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / (2 * n))))
    assert res["val_acc1"] is not None
