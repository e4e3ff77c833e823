"""The op ``spvit::gated_attn_conv`` (registration, shapes, autograd) and the provider :func:`gated_attn_conv`.

:func:`gated_attn_conv` checks and casts its arguments, reads the three gate values on the host (one device sync,
unless the caller passes ``gate_values``: a graph break), and calls the functional op with the arguments of
:class:`~.forward.OpInputs`; from the op's :class:`~.forward.OpOutputs` it updates the BatchNorm running statistics
(so the op mutates nothing) and returns ``out``.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .._compat import autocast_cast, define_op, require_triton_device
from ..reference import CENTER_TAP, BNState, check_attn_bias
from .backward import backward, setup_context
from .forward import OpInputs, OpOutputs, StaticConfig, forward, output_specs, update_running_stats


def _gated_attn_conv_fwd(
    x: torch.Tensor, w_qk: torch.Tensor, b_qk: Optional[torch.Tensor], w_v: torch.Tensor, b_v: Optional[torch.Tensor],
    w_o: torch.Tensor, b_o: Optional[torch.Tensor], head_probs: torch.Tensor,
    bn1_weight: Optional[torch.Tensor], bn1_bias: Optional[torch.Tensor], bn1_mean: Optional[torch.Tensor],
    bn1_var: Optional[torch.Tensor], bn3_weight: Optional[torch.Tensor], bn3_bias: Optional[torch.Tensor],
    bn3_mean: Optional[torch.Tensor], bn3_var: Optional[torch.Tensor], gates: torch.Tensor,
    num_heads: int, alpha: float, grid_h: int, grid_w: int, training: bool, prefix: int, center: int,
    gate_values: List[float], live: List[bool], bn_eps: List[float], save: bool,
    attn_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Body of ``spvit::gated_attn_conv``: the arguments of :class:`~.forward.OpInputs` (the schema comes from these
    type hints) -> the tensors of :class:`~.forward.OpOutputs`."""
    cfg = StaticConfig.of(OpInputs(
        x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn3_weight, bn3_bias,
        bn3_mean, bn3_var, gates, num_heads, alpha, grid_h, grid_w, training, prefix, center, gate_values, live,
        bn_eps, save, attn_bias))
    with torch.autocast(x.device.type, enabled=False):  # the inputs are already in the compute dtype
        return tuple(forward(cfg, x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs,
                             (bn1_weight, bn1_bias, bn1_mean, bn1_var), (bn3_weight, bn3_bias, bn3_mean, bn3_var),
                             attn_bias))


def _gated_attn_conv_fake(x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                          bn3_weight, bn3_bias, bn3_mean, bn3_var, gates, num_heads, alpha, grid_h, grid_w, training,
                          prefix, center, gate_values, live, bn_eps, save, attn_bias=None):
    cfg = StaticConfig.of(OpInputs(
        x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn3_weight, bn3_bias,
        bn3_mean, bn3_var, gates, num_heads, alpha, grid_h, grid_w, training, prefix, center, gate_values, live,
        bn_eps, save, attn_bias))
    return tuple(x.new_empty(shape, dtype=dt) for shape, dt in output_specs(x, w_v, cfg))


# Opaque to torch.compile (one graph node): the body reads nothing from the device, but it mixes cuBLAS, SDPA and
# several Triton launches with host-side choices that a trace would only have to repeat.
gated_attn_conv_op = define_op("gated_attn_conv", _gated_attn_conv_fwd, _gated_attn_conv_fake, traceable=False)
gated_attn_conv_op.register_autograd(backward, setup_context=setup_context)


def _check(name: str, t: Optional[torch.Tensor], shape: Tuple[int, ...], dtype: Optional[torch.dtype] = None,
           device: Optional[torch.device] = None):
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"gated_attn_conv: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"gated_attn_conv: {name} has dtype {t.dtype}, expected {dtype} (the dtype of x_hat)")
    if device is not None and t.device != device:
        raise ValueError(f"gated_attn_conv: {name} is on {t.device}, expected {device} (the device of x_hat)")


def gated_attn_conv(
    x_hat: torch.Tensor,
    w_qk: torch.Tensor, b_qk: Optional[torch.Tensor],
    w_v: torch.Tensor, b_v: Optional[torch.Tensor],
    w_o: torch.Tensor, b_o: Optional[torch.Tensor],
    head_probs: torch.Tensor, bn1: BNState, bn3: BNState, gates: torch.Tensor, *,
    num_heads: int, alpha: float, grid: Tuple[int, int], training: bool,
    num_prefix_tokens: int = 1, center: int = CENTER_TAP, compute_all: Optional[bool] = None,
    attn_bias: Optional[torch.Tensor] = None, gate_values: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Search-mode single-path attention layer, fused (see :mod:`spvit_kernels.gated_attn_conv`).

    Args:
        x_hat: (B, N, C) normalised block input, N = num_prefix_tokens + H*W.
        w_qk: (2*h*d, C), b_qk: (2*h*d,) | None: query and key projections (queries first).
        w_v: (h*d, C), b_v: (h*d,) | None: value projection, shared by all candidates.
        w_o: (C, h*d), b_o: (C,) | None: output projection, shared by all candidates.
        head_probs: (h, 9) head-mixing logits A.
        bn1, bn3: BatchNorms (d channels) of the 1x1 and the 3x3 candidate (running statistics updated in place in
            training, like ``F.batch_norm``).
        gates: (3,) cumulative gates (e1, e3, em), exactly 0/1 values (may carry straight-through gradients).
        num_heads: h; alpha: head-mixing temperature; grid: (H, W); training: BN batch statistics when True.
        num_prefix_tokens: tokens before the patch grid (passed through by the conv candidates); 0 for Swin.
        center: column of M used by the 1x1 candidate (4 in DeiT tap order; a Swin layer permutes its Swin-order
            head_probs columns to DeiT order and passes 4).
        compute_all: evaluate every candidate even when its coefficient is 0. Default: in training or when
            ``gates`` needs a gradient.
        attn_bias: optional (G, h, N, N) floating-point additive logits of the MSA candidate, G dividing B, row b
            using ``attn_bias[b % G]`` (windowed attention: relative position bias, plus the shift mask of window
            b % G). Cast to the attention's dtype; it may require grad (its gradient is summed over the rows of each
            group; exact zeros when MSA is computed with coefficient 0, None when MSA is not computed).
        gate_values: the values of ``gates`` already on the host (3 floats), when the caller has them (e.g. read for
            all layers at once): then ``gates`` is not read back here (no host synchronisation). They must equal
            ``gates``.
    Returns:
        (B, N, C): em*out_msa + e3(1-em)*out_3x3 + e1(1-e3)(1-em)*out_1x1. Under ``torch.autocast`` the activations and
        projection weights are first cast to the autocast dtype (as ``F.linear`` would) and the output has that
        dtype; head mixing, BatchNorm and the gate gradients stay in fp32.
    Raises:
        ValueError: on wrong shapes/dtypes/devices (attn_bias: shape, groups not dividing B, device) or gates that are
            not exactly 0/1.
        TypeError: on activations other than fp32/bf16/fp16, or an attn_bias that is not floating point.
    """
    if x_hat.dim() != 3:
        raise ValueError(f"gated_attn_conv: x_hat must be (B, N, C), got shape {tuple(x_hat.shape)}")
    require_triton_device("gated_attn_conv", x_hat.device)
    x_in = x_hat
    x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o = autocast_cast(x_hat.device.type, (x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o))
    bsz, n, c = x_hat.shape
    h = int(num_heads)
    gh, gw = int(grid[0]), int(grid[1])
    pre = int(num_prefix_tokens)
    if n != pre + gh * gw:
        raise ValueError(f"gated_attn_conv: {n} tokens but num_prefix_tokens + H*W = {pre} + {gh}*{gw}")
    if w_v.dim() != 2 or w_v.shape[0] % h:
        raise ValueError(f"gated_attn_conv: w_v must be (h*d, C) with h = {h}, got {tuple(w_v.shape)}")
    if x_hat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"gated_attn_conv supports fp32/bf16/fp16 activations, got {x_hat.dtype}")
    hdim = w_v.shape[0]
    d = hdim // h
    dt, dev = x_hat.dtype, x_hat.device
    _check("w_qk", w_qk, (2 * hdim, c), dt, dev)
    _check("b_qk", b_qk, (2 * hdim,), dt, dev)
    _check("w_v", w_v, (hdim, c), dt, dev)
    _check("b_v", b_v, (hdim,), dt, dev)
    _check("w_o", w_o, (c, hdim), dt, dev)
    _check("b_o", b_o, (c,), dt, dev)
    _check("head_probs", head_probs, (h, 9), device=dev)
    _check("gates", gates, (3,), device=dev)
    for name, bn in (("bn1", bn1), ("bn3", bn3)):
        for f in ("weight", "bias", "running_mean", "running_var"):
            _check(f"{name}.{f}", getattr(bn, f), (d,), device=dev)
    if not 0 <= center < 9:
        raise ValueError(f"gated_attn_conv: center must be a tap index in [0, 9), got {center}")
    if not training and any(bn.running_mean is None or bn.running_var is None for bn in (bn1, bn3)):
        raise ValueError("gated_attn_conv: eval mode needs BN running statistics")
    if attn_bias is not None:
        try:
            check_attn_bias(attn_bias, bsz, h, n)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"gated_attn_conv: {exc}") from None
        _check("attn_bias", attn_bias, attn_bias.shape, device=dev)
        # cast like the attention logits it is added to (the reference adds attn_bias.to(q.dtype)); differentiable,
        # so an fp32 bias (e.g. from an fp32 relative-position table under autocast) gets an fp32 gradient
        attn_bias = attn_bias.to(dt)

    if gate_values is None:
        vals = gates.detach().to(torch.float32).tolist()  # one host sync (the original code branches on gates)
    else:
        vals = [float(v) for v in gate_values]
        if len(vals) != 3:
            raise ValueError(f"gated_attn_conv: gate_values must be 3 values (e1, e3, em), got {len(vals)}")
    if any(val not in (0.0, 1.0) for val in vals):
        raise ValueError(f"gated_attn_conv: gates must be exactly 0/1 values, got {vals}")
    e1, e3, em = vals
    coefs = (em, e3 * (1 - em), e1 * (1 - e3) * (1 - em))
    if compute_all is None:
        compute_all = training or (gates.requires_grad and torch.is_grad_enabled())
    live = [True, True, True] if compute_all else [cf != 0 for cf in coefs]
    if not any(live):  # skip, nothing computed: zeros like the input (as the reference)
        return torch.zeros_like(x_in)

    tensors = dict(x=x_hat.contiguous(), w_qk=w_qk.contiguous(), b_qk=b_qk, w_v=w_v.contiguous(), b_v=b_v,
                   w_o=w_o.contiguous(), b_o=b_o, head_probs=head_probs,
                   bn1_weight=bn1.weight, bn1_bias=bn1.bias, bn1_mean=bn1.running_mean, bn1_var=bn1.running_var,
                   bn3_weight=bn3.weight, bn3_bias=bn3.bias, bn3_mean=bn3.running_mean, bn3_var=bn3.running_var,
                   gates=gates, attn_bias=None if attn_bias is None else attn_bias.contiguous())
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values())
    inputs = OpInputs(num_heads=h, alpha=float(alpha), grid_h=gh, grid_w=gw, training=bool(training), prefix=pre,
                      center=int(center), gate_values=[e1, e3, em], live=live,
                      bn_eps=[float(bn1.eps), float(bn3.eps)], save=save, **tensors)
    # without a bias the op is called without its trailing attn_bias (the schema of the plain layer)
    outs = OpOutputs(*gated_attn_conv_op(*(inputs if attn_bias is not None else inputs[:-1])))
    if training:  # running statistics, as F.batch_norm updates them (functional op: the update happens here)
        _, live_3, live_1 = live
        for bn, chan, is_live in ((bn1, outs.chan1, live_1), (bn3, outs.chan3, live_3)):
            if is_live:
                update_running_stats(bn, chan, bsz * gh * gw)
    return outs.out
