"""DDP under torchrun, 2 processes, gloo on CPU: identical weights on both ranks, and the same result as one process
over the same data (global batch kept: 2 x 8 = 1 x 16)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from spvit import finetune, search
from .pipeline_helpers import free_port, repo_root, tiny_cfg, tiny_search_cfg

DRIVER = """
import json, os, sys, torch
from spvit import finetune
cfg = json.loads(sys.argv[1])
res = finetune.run(cfg)
rank = int(os.environ.get("RANK", "0"))
torch.save(res["model"].state_dict(), os.path.join(cfg["out"], f"rank{rank}.pt"))
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _arch_without_convs(tmp_path):
    """An architecture with MSA and skip layers and pruned FFNs (conv BN statistics are per rank, as in the
    original, so they would make DDP and one process differ by design)."""
    import spvit

    s = search.run(tiny_search_cfg(tmp_path / "s", epochs=1))
    arch = spvit.Architecture.load(s["arch"])
    blocks = [spvit.BlockArch(a, tuple(range(0, 64, 2 if i else 3))) for i, a in enumerate(["msa", "skip"])]
    arch = spvit.Architecture(arch.model_name, arch.signature, blocks)
    path = str(tmp_path / "arch.json")
    arch.save(path)
    return path


def test_ddp_two_ranks_match_single_process(tmp_path):
    arch = _arch_without_convs(tmp_path)
    common = dict(arch=arch, init="none", epochs=2, digits_augment=False, train_limit=96, val_limit=64,
                  smoothing=0.1)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ddp_cfg = tiny_cfg(finetune.DEFAULTS, tmp_path / "ddp", batch_size=8, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver), json.dumps(ddp_cfg)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"

    single_cfg = tiny_cfg(finetune.DEFAULTS, tmp_path / "single", batch_size=16, **common)
    p = subprocess.run([sys.executable, str(driver), json.dumps(single_cfg)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s0 = torch.load(tmp_path / "single" / "rank0.pt")
    moved = 0
    init = finetune.build_pruned(__import__("spvit").Architecture.load(arch), "spvit_demo_vit", 10, None, 0.0,
                                 ddp_cfg["model_kwargs"], "none")
    for k in r0:
        a, b = r0[k], s0[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias cannot change any output (it adds the same q.b_k to every logit of a softmax row), so its
            # gradient is zero up to rounding, and AdamW turns that rounding noise into +-lr steps that differ
            # between any two summation orders. Compare the query and value biases only.
            dim = a.numel() // 3
            a, b = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([b[:dim], b[2 * dim:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"DDP vs single process differ in {k}")
        moved += not torch.equal(s0[k], init.state_dict()[k]) if k in init.state_dict() else 0
    assert moved > 0  # training did change the weights
    # the evaluation summed over both ranks equals the single-process one
    import csv

    a = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    b = list(csv.DictReader(open(tmp_path / "single" / "metrics.csv")))
    assert [float(r["val_acc1"]) for r in a] == pytest.approx([float(r["val_acc1"]) for r in b])
