"""Eager PyTorch definition of every SPViT op (the specification the fused kernels are tested against).

Everything here follows the method as described in ``docs/method.md`` (section numbers in the comments refer to it).
Conventions:

* tokens are ``(batch, tokens, channels)``; the first ``num_prefix_tokens`` tokens (the class token in DeiT/ViT)
  are not part of the patch grid; patch token at grid row ``i``, column ``j`` is token ``prefix + W*i + j``;
* the 3x3 kernel positions ("taps") are in the DeiT order of §1.3: tap ``k`` reads the neighbour at offset
  ``TAP_OFFSETS[k] = (dy, dx)`` with ``k = 3*(dx+1) + (dy+1)``; the centre tap is ``CENTER_TAP = 4``;
* a *plane tensor* ``(batch, P, T, d)`` holds for every patch position ``p`` and tap ``t`` the ``d``-channel
  contribution that tap ``t`` of position ``p`` makes to the output at ``p - offset_t`` (the "folded depthwise"
  form: a 3x3 conv C->d equals one GEMM C->9d followed by a shift-and-sum of the 9 planes).

No function in this file modifies its inputs except the BatchNorm running statistics, which are updated in
place in training mode exactly as ``torch.nn.functional.batch_norm`` does.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# (dy, dx) of tap k, DeiT order (column-major over the 3x3 window): k = 3*(dx+1) + (dy+1).
TAP_OFFSETS: Tuple[Tuple[int, int], ...] = tuple((k % 3 - 1, k // 3 - 1) for k in range(9))
CENTER_TAP = 4
KINDS = ("3x3", "1x1")


class BNState(NamedTuple):
    """The tensors of a BatchNorm over ``d`` channels (``running_*`` are updated in place in training)."""

    weight: torch.Tensor  # (d,)
    bias: torch.Tensor  # (d,)
    running_mean: torch.Tensor  # (d,)
    running_var: torch.Tensor  # (d,)
    momentum: float = 0.1
    eps: float = 1e-5


def head_mix(head_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Head-mixing matrix M (§1.2).

    Args:
        head_probs: (heads, 9) logits ``A``.
        alpha: temperature (0.01 for DeiT).
    Returns:
        (heads, 9): column-wise softmax over heads of ``A / alpha``.
    """
    return torch.softmax(head_probs.float() / alpha, dim=0).to(head_probs.dtype)


def tap_columns(kind: str, center: int = CENTER_TAP) -> list:
    """Columns of M used by a conv candidate: all nine for '3x3', the centre one for '1x1'."""
    if kind == "3x3":
        return list(range(9))
    if kind == "1x1":
        return [center]
    raise ValueError(f"unknown conv kind {kind!r}; expected one of {KINDS}")


def mixed_conv_params(
    w_v: torch.Tensor, b_v: Optional[torch.Tensor], w_o: torch.Tensor, m: torch.Tensor, num_heads: int, kind: str,
    center: int = CENTER_TAP,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight-side conv parameters of a conv candidate (§1.2, §1.4).

    Args:
        w_v: (h*d, C) value projection; b_v: (h*d,) or None; w_o: (C, h*d) output projection;
        m: (h, 9) head mixing; kind: '3x3' or '1x1'.
    Returns:
        taps: (T, d, C) with T = 9 or 1 (tap t is the C->d map K_t);
        tap_bias: (d,) the conv bias (sum of the mixed value biases of the taps used);
        out_map: (C, d) the d->C output map (sum of the mixed output maps R_t).
    """
    cols = tap_columns(kind, center)
    hd, c_in = w_v.shape
    d = hd // num_heads
    mm = m[:, cols]  # (h, T)
    taps = torch.einsum("gt,gdc->tdc", mm, w_v.reshape(num_heads, d, c_in))
    if b_v is None:
        tap_bias = w_v.new_zeros(d)
    else:
        tap_bias = torch.einsum("gt,gd->d", mm, b_v.reshape(num_heads, d))
    out_map = torch.einsum("gt,cgd->cd", mm, w_o.reshape(w_o.shape[0], num_heads, d))
    return taps, tap_bias, out_map


def mix_planes(u: torch.Tensor, m_cols: torch.Tensor) -> torch.Tensor:
    """Activation-side head mixing (§1.2): ``U[b,p,t,:] = sum_g M[g,t] * u[b,p,g,:]``.

    Args:
        u: (B, P, h*d) value projections without bias; m_cols: (h, T).
    Returns:
        (B, P, T, d)
    """
    b, p, hd = u.shape
    h = m_cols.shape[0]
    return torch.einsum("bpgd,gt->bptd", u.reshape(b, p, h, hd // h), m_cols.to(u.dtype))


def shift_sum(
    planes: torch.Tensor, bias: Optional[torch.Tensor], grid: Tuple[int, int], relu: bool,
) -> torch.Tensor:
    """Folded depthwise step (§1.4, §10.4): ``y[p] = act(sum_t planes[p + offset_t, t] + bias)``.

    Args:
        planes: (B, P, T, d) with P = H*W (row-major) and T = 9 (taps in TAP_OFFSETS order) or T = 1 (1x1).
        bias: (d,) or None, added at every position (a conv bias, not padded).
        grid: (H, W).
        relu: apply ReLU after the bias.
    Returns:
        (B, P, d); neighbours outside the grid contribute zero.
    """
    b, p, t, d = planes.shape
    hh, ww = grid
    if p != hh * ww:
        raise ValueError(f"shift_sum: planes have {p} positions but the grid {hh}x{ww} has {hh * ww}")
    if t == 1:
        y = planes[:, :, 0]
    elif t == 9:
        img = planes.reshape(b, hh, ww, 9, d)
        padded = F.pad(img, (0, 0, 0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, 9, d)
        y = planes.new_zeros(b, hh, ww, d)
        for k, (dy, dx) in enumerate(TAP_OFFSETS):
            y = y + padded[:, 1 + dy:1 + dy + hh, 1 + dx:1 + dx + ww, k]
        y = y.reshape(b, p, d)
    else:
        raise ValueError(f"shift_sum: expected 9 or 1 taps, got {t}")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return torch.relu(y) if relu else y


def _bn_relu(y: torch.Tensor, bn: BNState, training: bool) -> torch.Tensor:
    """BatchNorm over the channel axis of (B, P, d) (statistics over B*P), then ReLU (§1.6)."""
    b, p, d = y.shape
    z = F.batch_norm(
        y.reshape(b * p, d), bn.running_mean, bn.running_var, bn.weight, bn.bias, training, bn.momentum, bn.eps,
    )
    return torch.relu(z).reshape(b, p, d)


def _with_prefix(x_hat: torch.Tensor, out_p: torch.Tensor, prefix: int) -> torch.Tensor:
    """Concatenate the untouched prefix tokens of ``x_hat`` with the patch outputs (§1.5)."""
    if prefix == 0:
        return out_p
    return torch.cat([x_hat[:, :prefix].to(out_p.dtype), out_p], dim=1)


def conv_attention(
    x_hat: torch.Tensor, taps: torch.Tensor, tap_bias: torch.Tensor, out_map: torch.Tensor,
    b_o: Optional[torch.Tensor], bn: BNState, grid: Tuple[int, int], training: bool, num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """A conv layer of a pruned (fine-tune) model, weight-side form (§1.4, §5.3).

    Args:
        x_hat: (B, N, C) normalised block input, N = prefix + H*W.
        taps: (T, d, C); tap_bias: (d,); out_map: (C, d); b_o: (C,) or None; bn: BatchNorm over d channels.
    Returns:
        (B, N, C): prefix tokens pass through, patches get ``ReLU(BN(conv(x))) @ out_map^T + b_o``.
    """
    t, d, c = taps.shape
    xp = x_hat[:, num_prefix_tokens:]
    b, p, _ = xp.shape
    planes = (xp @ taps.reshape(t * d, c).t()).reshape(b, p, t, d)
    y = shift_sum(planes, tap_bias, grid, relu=False)
    r = _bn_relu(y, bn, training)
    out_p = F.linear(r, out_map, b_o)
    return _with_prefix(x_hat, out_p, num_prefix_tokens)


def msa(
    x_hat: torch.Tensor, w_qk: torch.Tensor, b_qk: Optional[torch.Tensor], w_v: torch.Tensor,
    b_v: Optional[torch.Tensor], w_o: torch.Tensor, b_o: Optional[torch.Tensor], num_heads: int,
    attn_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Multi-head self-attention with split qk / v projections (§1.4, MSA). Returns (B, N, C).

    ``attn_bias``: optional additive attention logits of shape (G, h, N, N) with G dividing B; batch row ``b`` uses
    ``attn_bias[b % G]`` (Swin, §7.2: the relative position bias, plus the shift mask of window ``b % G`` in
    shifted blocks, with windows of one image consecutive in the batch).
    """
    b, n, _ = x_hat.shape
    qk = F.linear(x_hat, w_qk, b_qk)
    v = F.linear(x_hat, w_v, b_v)
    hd = w_v.shape[0]
    d = hd // num_heads
    q, k = qk.reshape(b, n, 2, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    v = v.reshape(b, n, num_heads, d).transpose(1, 2)
    if attn_bias is None:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        g = check_attn_bias(attn_bias, b, num_heads, n)
        shape = (b // g, g, num_heads, n, d)
        o = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                           attn_mask=attn_bias.to(q.dtype)).reshape(b, num_heads, n, d)
    return F.linear(o.transpose(1, 2).reshape(b, n, hd), w_o, b_o)


def check_attn_bias(attn_bias: torch.Tensor, batch: int, num_heads: int, tokens: int) -> int:
    """Validate an additive attention bias (G, h, N, N) for a batch of ``batch`` rows; returns G."""
    if attn_bias.dim() != 4 or tuple(attn_bias.shape[1:]) != (num_heads, tokens, tokens):
        raise ValueError(f"attn_bias must be (G, {num_heads}, {tokens}, {tokens}) (groups, heads, tokens, tokens), "
                         f"got {tuple(attn_bias.shape)}")
    g = attn_bias.shape[0]
    if g == 0 or batch % g:
        raise ValueError(f"attn_bias has {g} groups, which does not divide the batch of {batch} rows")
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias must be a floating-point additive bias, got {attn_bias.dtype}")
    return g


def detach_rule(gates: torch.Tensor) -> torch.Tensor:
    """The "slow down less-complex gates" rule of §2.2, out of place and without a host sync.

    ``gates`` = (e1, e3, em), each exactly 0 or 1. If e1 = e3 = 1, e1 is detached; if also em = 1, e3 is detached.
    Values are unchanged; the rule changes no gradient of the layer output (proved in §2.2), it is kept for
    fidelity.
    """
    e1, e3, em = gates.unbind(0)
    d1, d3 = e1.detach(), e3.detach()
    keep1 = 1 - d1 * d3  # 0 where the rule detaches e1
    keep3 = 1 - d1 * d3 * em.detach()
    e1 = d1 + keep1 * (e1 - d1)
    e3 = d3 + keep3 * (e3 - d3)
    return torch.stack([e1, e3, em])


def gate_coefficients(gates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixing coefficients (c_msa, c_3x3, c_1x1) of the cumulative gates (e1, e3, em) (§2.1)."""
    e1, e3, em = gates.unbind(0)
    return em, e3 * (1 - em), e1 * (1 - e3) * (1 - em)


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
    """Search-mode single-path attention layer (§1, §2.1, §10.1).

    Args:
        x_hat: (B, N, C) normalised block input, N = num_prefix_tokens + H*W.
        w_qk: (2*h*d, C), b_qk: (2*h*d,) | None: query and key projections (queries first).
        w_v: (h*d, C), b_v: (h*d,) | None: value projection, shared by all candidates.
        w_o: (C, h*d), b_o: (C,) | None: output projection, shared by all candidates.
        head_probs: (h, 9) head-mixing logits A.
        bn1, bn3: BatchNorms (d channels) of the 1x1 and the 3x3 candidate.
        gates: (3,) cumulative gates (e1, e3, em), exactly 0/1 values (may carry straight-through gradients).
        training: BN uses batch statistics (and updates running ones) when True.
        compute_all: evaluate every candidate even when its coefficient is 0. Default: in training (both BNs
            update their running statistics every step, §4.6) or when ``gates`` needs a gradient.
        attn_bias: optional (G, h, N, N) additive attention logits for the MSA candidate only (see :func:`msa`);
            the conv candidates never see it (§7.2).
        gate_values: the values of ``gates`` already on the host (3 floats), when the caller has them (e.g. read for
            all layers at once): then ``gates`` is not read back here (no host synchronisation). They must equal
            ``gates``.
    Returns:
        (B, N, C): em*out_msa + e3(1-em)*out_3x3 + e1(1-e3)(1-em)*out_1x1.
    """
    gates = detach_rule(gates.to(x_hat.dtype))
    c_m, c_3, c_1 = gate_coefficients(gates)
    if compute_all is None:
        compute_all = training or (gates.requires_grad and torch.is_grad_enabled())
    if compute_all:
        live = [True] * 3
    elif gate_values is not None:
        e1, e3, em = (float(v) for v in gate_values)
        live = [em != 0, e3 * (1 - em) != 0, e1 * (1 - e3) * (1 - em) != 0]
    else:
        live = [bool(c != 0) for c in (c_m, c_3, c_1)]

    if not any(live):
        return torch.zeros_like(x_hat)
    out = None  # sum of the live candidates' terms (in the matmuls' dtype, e.g. the autocast dtype)
    b, n, c = x_hat.shape
    xp = x_hat[:, num_prefix_tokens:]
    if live[1] or live[2]:
        m = head_mix(head_probs, alpha)
        u = xp @ w_v.t()  # (B, P, h*d), shared by both convs (§1.2)
    for kind, coef, is_live, bn in (("3x3", c_3, live[1], bn3), ("1x1", c_1, live[2], bn1)):
        if not is_live:
            continue
        cols = tap_columns(kind, center)
        _, tap_bias, out_map = mixed_conv_params(w_v, b_v, w_o, m, num_heads, kind, center)
        planes = mix_planes(u, m[:, cols])
        y = shift_sum(planes, tap_bias, grid, relu=False)
        r = _bn_relu(y, bn, training)
        term = coef * _with_prefix(x_hat, F.linear(r, out_map, b_o), num_prefix_tokens)
        out = term if out is None else out + term
    if live[0]:
        term = c_m * msa(x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o, num_heads, attn_bias)
        out = term if out is None else out + term
    return out


def masked_ffn(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    mask: torch.Tensor, approximate: str = "none",
) -> torch.Tensor:
    """Search-mode FFN with gated hidden units (§2.3, §10.3).

    Args:
        x: (B, N, C); w1: (F, C); b1: (F,) | None; w2: (C, F); b2: (C,) | None;
        mask: (F,) gate samples (exactly 0/1; may carry straight-through gradients);
        approximate: GELU variant ('none' = erf, 'tanh').
    Returns:
        (B, N, C) = (GELU(x W1^T + b1) * mask) W2^T + b2.
    """
    hdn = F.gelu(F.linear(x, w1, b1), approximate=approximate) * mask.to(x.dtype)
    return F.linear(hdn, w2, b2)


def pruned_ffn(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    approximate: str = "none",
) -> torch.Tensor:
    """Compact (pruned) FFN: GELU(x W1^T + b1) W2^T + b2. x: (B, N, C); w1: (F, C); w2: (C, F)."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def fold_bn(taps: torch.Tensor, tap_bias: torch.Tensor, bn: BNState) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv (§6, §10.4).

    Args:
        taps: (T, d, C); tap_bias: (d,).
    Returns:
        w_planes: (T*d, C) the projection to the T planes; b_fold: (d,) folded bias.
    """
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = taps * s[None, :, None]
    b = s * (tap_bias - bn.running_mean) + bn.bias
    t, d, c = taps.shape
    return w.reshape(t * d, c), b


def deploy_conv(
    x_hat: torch.Tensor, w_planes: torch.Tensor, b_fold: torch.Tensor, w_out: torch.Tensor,
    b_out: Optional[torch.Tensor], grid: Tuple[int, int], num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Deployed conv layer with BN folded (§10.4).

    Args:
        x_hat: (B, N, C); w_planes: (T*d, C) with T = 9 or 1; b_fold: (d,); w_out: (C, d); b_out: (C,) | None.
    Returns:
        (B, N, C): prefix tokens pass through; patches: ReLU(shift_sum(x_p W_planes^T) + b_fold) W_out^T + b_out.
    """
    d = b_fold.shape[0]
    t = w_planes.shape[0] // d
    xp = x_hat[:, num_prefix_tokens:]
    b, p, _ = xp.shape
    planes = (xp @ w_planes.t()).reshape(b, p, t, d)
    y = shift_sum(planes, b_fold, grid, relu=True)
    return _with_prefix(x_hat, F.linear(y, w_out, b_out), num_prefix_tokens)


def conv_weight_to_taps(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch conv weight (d, C, kh, kw) -> taps (T, d, C) in TAP_OFFSETS order (§1.3)."""
    d, c, kh, kw = weight.shape
    if (kh, kw) == (1, 1):
        return weight[:, :, 0, 0][None]
    if (kh, kw) != (3, 3):
        raise ValueError(f"expected a 1x1 or 3x3 conv weight, got {tuple(weight.shape)}")
    return torch.stack([weight[:, :, dy + 1, dx + 1] for dy, dx in TAP_OFFSETS])


def taps_to_conv_weight(taps: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_taps`: taps (T, d, C) -> conv weight (d, C, k, k)."""
    t, d, c = taps.shape
    if t == 1:
        return taps[0][:, :, None, None]
    w = taps.new_zeros(d, c, 3, 3)
    for k, (dy, dx) in enumerate(TAP_OFFSETS):
        w[:, :, dy + 1, dx + 1] = taps[k]
    return w


__all__: Sequence[str] = [
    "TAP_OFFSETS", "CENTER_TAP", "BNState", "check_attn_bias", "head_mix", "tap_columns", "mixed_conv_params",
    "mix_planes", "shift_sum", "conv_attention", "msa", "detach_rule", "gate_coefficients", "gated_attn_conv",
    "masked_ffn", "pruned_ffn", "fold_bn", "deploy_conv", "conv_weight_to_taps", "taps_to_conv_weight",
]
