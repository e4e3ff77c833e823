"""Calls the extension's kernels on the cases a memory checker must see (run under ``compute-sanitizer``).

Cases: the vectorised path (head dim a multiple of the 16-byte vector, aligned pointers) and the scalar path (odd
head dim), a misaligned view (planes starting one element into their storage), odd grids (5x7, 1x3), fp32 and bf16,
forward and backward of ``shift_sum`` and the deployed conv (``deploy_conv_ext``). Each result is checked against the
eager reference (so a kernel that writes nothing, or the wrong place, fails here too); one line per case.

    python -m bench.lease.sanitize_ops [--device cuda|cpu] [--only-backward]

Exit status 0 when every case matched its reference, 1 otherwise, 2 when the extension is not there.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _cases():
    # (name, batch, grid, taps, head dim, dtype, misaligned)
    out = []
    for dt in (torch.float32, torch.bfloat16):
        tag = "fp32" if dt == torch.float32 else "bf16"
        out += [(f"vec-{tag}", 2, (4, 4), 9, 64, dt, False),
                (f"scalar-{tag}", 2, (5, 7), 9, 21, dt, False),
                (f"misaligned-{tag}", 2, (4, 5), 9, 32, dt, True),
                (f"odd-grid-{tag}", 3, (1, 3), 9, 16, dt, False),
                (f"taps1-{tag}", 2, (3, 5), 1, 24, dt, False)]
    return out


def _planes(batch, grid, taps, d, dt, misaligned, device):
    n = batch * grid[0] * grid[1] * taps * d
    if misaligned:  # a view that starts one element into its storage: not 16-byte aligned
        flat = torch.randn(n + 1, device=device).to(dt)[1:]
        return flat.view(batch, grid[0] * grid[1], taps, d)
    return torch.randn(batch, grid[0] * grid[1], taps, d, device=device).to(dt)


def run(device: torch.device, only_backward: bool = False) -> int:
    from spvit_kernels import _ext, reference
    from spvit_kernels.deploy_conv import deploy_conv_ext
    from spvit_kernels.shift_sum import shift_sum_ext

    if not _ext.has_op("shift_sum"):
        print(f"the extension is not loaded: {_ext.error()}")
        return 2
    failed = 0
    for name, batch, grid, taps, d, dt, mis in _cases():
        tol = dict(atol=1e-4, rtol=1e-4) if dt == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        try:
            planes = _planes(batch, grid, taps, d, dt, mis, device).requires_grad_()
            bias = torch.randn(d, device=device).to(dt).requires_grad_()
            out = shift_sum_ext(planes, bias, grid, True)
            ref_planes = planes.detach().double().requires_grad_()
            ref_bias = bias.detach().double().requires_grad_()
            ref = reference.shift_sum(ref_planes, ref_bias, grid, True)
            if not only_backward:
                torch.testing.assert_close(out.double(), ref, **tol)
            dy = torch.randn_like(out)
            gp, gb = torch.autograd.grad(out, (planes, bias), dy)
            rp, rb = torch.autograd.grad(ref, (ref_planes, ref_bias), dy.double())
            torch.testing.assert_close(gp.double(), rp, **tol)
            torch.testing.assert_close(gb.double(), rb, atol=tol["atol"] * batch * grid[0] * grid[1] * 4,
                                       rtol=tol["rtol"])
            if not only_backward:  # the deployed conv: the GEMMs around shift_sum, forward only
                c = 2 * d
                x = torch.randn(batch, 1 + grid[0] * grid[1], c, device=device).to(dt)
                args = (x, (torch.randn(taps * d, c, device=device) * c ** -0.5).to(dt),
                        torch.randn(d, device=device).to(dt), (torch.randn(c, d, device=device) * d ** -0.5).to(dt),
                        torch.randn(c, device=device).to(dt))
                y = deploy_conv_ext(*args, grid, 1)
                y_ref = reference.deploy_conv(*[a.double() for a in args], grid, 1)
                torch.testing.assert_close(y.double(), y_ref, atol=tol["atol"] * 50, rtol=tol["rtol"] * 5)
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"ok   {name} (b{batch} grid {grid[0]}x{grid[1]} T{taps} d{d})", flush=True)
        except Exception as exc:  # noqa: BLE001 - every case reports
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
    print(f"{len(_cases()) - failed}/{len(_cases())} cases matched the reference", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only-backward", action="store_true", help="the backward of each case (racecheck runs)")
    args = ap.parse_args(argv)
    return run(torch.device(args.device), args.only_backward)


if __name__ == "__main__":
    sys.exit(main())
