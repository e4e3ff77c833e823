"""The search-mode FFN backward compiles for sm_90 (bf16, DeiT-S shape) without register spills: the pinned config
and every autotune config, compiled ahead of time by bench/check_triton_compile.py's machinery (no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import bench.check_triton_compile as ctc
from bench.check_triton_compile import Case, i32, gemm, mf, _compile
import torch
ty, m_rows, c, f = "bf16", 64 * 197, 384, 1536
pinned = gemm.blocks(torch.device("cuda"), torch.bfloat16, backward=True)
variants = [(dict(BLOCK_M=pinned["BLOCK_M"], BLOCK_F=pinned["BLOCK_N"], BLOCK_K=pinned["BLOCK_K"],
                  GROUP_M=pinned["GROUP_M"]), pinned["num_warps"], pinned["num_stages"])]
variants += [(dict(a.kwargs), a.num_warps, a.num_stages) for a in mf.BWD_CONFIGS]
rows, seen = [], set()
for tiles, warps, stages in variants:
    if (tuple(sorted(tiles.items())), warps, stages) in seen:
        continue
    seen.add((tuple(sorted(tiles.items())), warps, stages))
    case = Case("ffn_bwd", mf._masked_ffn_bwd_kernel, "deit_s", ty,
                dict(dy_ptr=f"*{ty}", w2_ptr=f"*{ty}", z_ptr=f"*{ty}", mask_ptr="*fp32", dz_ptr=f"*{ty}",
                     h_ptr=f"*{ty}", part_ptr="*fp32", M=i32(m_rows), F=i32(f), C=i32(c)),
                dict(ACT=1, PRECISION="tf32", INTERPRET_BF16=False, **tiles), num_warps=warps, num_stages=stages)
    res = _compile(case, 90)
    rows.append(dict(config=case.config_str(), **{k: res[k] for k in ("status", "regs", "spill_st", "error")}))
print(json.dumps(rows))
"""


def test_masked_ffn_bf16_backward_does_not_spill_on_sm90(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    if all(r["status"] == "FAIL" and "ptxas" in (r["error"] or "").lower() for r in rows):
        pytest.skip(f"no working ptxas here: {rows[0]['error']}")
    for r in rows:
        assert r["status"] == "OK" and r["spill_st"] in (0, None) and r["regs"] is not None, r
