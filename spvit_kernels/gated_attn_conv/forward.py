"""Forward of the op ``spvit::gated_attn_conv``: its named inputs and outputs, its static configuration, the body.

The op (registered in :mod:`spvit_kernels.gated_attn_conv.op`) takes the tensors and the static arguments of
:class:`OpInputs`, in that order, and returns the tensors of :class:`OpOutputs`: the layer output and what the backward
needs (empty (0,) tensors when not needed, decided by the static arguments so that the shapes are known without
running the op). :func:`forward` computes them:

* projections: one ``[Wqk; Wv]`` GEMM when MSA is computed; the value projection ``u`` carries no bias (attention rows
  sum to 1, so ``attn (u + bv) Wo^T + bo = attn u Wo^T + (bo + Wo bv)``, exactly; the conv path adds its mixed bias);
* MSA: ``F.scaled_dot_product_attention``, with ``attn_bias`` (G, h, N, N) folded into the head axis
  (:func:`attention_heads`);
* conv candidates: the Triton kernels (:mod:`.launch`), BN from the per-program statistics (:func:`bn_channels`),
  and the live candidate's output map ``R = sum_g w_g Wo_g`` (:func:`out_map`).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..reference import BNState
from .launch import bn_relu, conv_fwd, pow2, tile_block_p


class OpInputs(NamedTuple):
    """The arguments of ``spvit::gated_attn_conv``, in schema order: 17 tensors, 11 static values, then the optional
    ``attn_bias`` (last, so that calls without it keep the schema of the plain layer). Also used for what autograd
    gives per input (``ctx.needs_input_grad``) and returns (one gradient or None per input)."""

    x: object  # (B, N, C) normalised block input, in the compute dtype
    w_qk: object  # (2*h*d, C)
    b_qk: object  # (2*h*d,) | None
    w_v: object  # (h*d, C)
    b_v: object  # (h*d,) | None
    w_o: object  # (C, h*d)
    b_o: object  # (C,) | None
    head_probs: object  # (h, 9) head-mixing logits A
    bn1_weight: object  # (d,) | None: BatchNorm of the 1x1 candidate
    bn1_bias: object
    bn1_mean: object
    bn1_var: object
    bn3_weight: object  # (d,) | None: BatchNorm of the 3x3 candidate
    bn3_bias: object
    bn3_mean: object
    bn3_var: object
    gates: object  # (3,) (e1, e3, em): an input so that autograd routes its gradient; its values are gate_values
    num_heads: object  # h
    alpha: object  # head-mixing temperature
    grid_h: object
    grid_w: object
    training: object  # BN batch statistics
    prefix: object  # num_prefix_tokens
    center: object  # column of M used by the 1x1 candidate
    gate_values: object  # [e1, e3, em] on the host, exactly 0/1
    live: object  # [msa, 3x3, 1x1]: the candidates computed
    bn_eps: object  # [eps of bn1, eps of bn3]
    save: object  # a backward will follow: return the tensors it needs
    attn_bias: object = None  # (G, h, N, N) | None, in the compute dtype


class OpOutputs(NamedTuple):
    """The outputs of ``spvit::gated_attn_conv``, in order. Only ``out`` is the layer's result."""

    out: object  # (B, N, C) the layer output
    out_msa: object  # (B, N, C) the MSA candidate's output when computed but not chosen (for the gate gradient S_m)
    proj: object  # (B, N, 3hd) [q k v] projections when MSA is computed, else (B, N, hd) v; without the v bias
    r_live: object  # (B, N, d) ReLU(BN(conv)) of the chosen conv candidate (zero prefix rows)
    y3: object  # (B, P, d) fp32 pre-BN response of the 3x3 candidate (when computed)
    y1: object  # (B, P, d) fp32 pre-BN response of the 1x1 candidate (when computed)
    chan3: object  # (5, d) fp32 [mean, rstd, gamma, beta, var] of the 3x3's BN (also without a backward: the caller
    chan1: object  # (5, d) fp32 same for the 1x1       updates the running statistics from them)
    m: object  # (h, 9) fp32 the head mixing softmax(A / alpha)


class StaticConfig(NamedTuple):
    """The static arguments of one call (everything but tensors), with the candidates' coefficients."""

    num_heads: int
    alpha: float
    grid: Tuple[int, int]
    training: bool
    prefix: int
    center: int
    gates: Tuple[float, float, float]  # (e1, e3, em) as 0/1 floats
    coefs: Tuple[float, float, float]  # (c_msa, c_3x3, c_1x1)
    live: Tuple[bool, bool, bool]  # computed candidates (msa, 3x3, 1x1)
    eps: Tuple[float, float]  # BN eps of (bn1, bn3)
    save: bool  # a backward will follow: return the tensors it needs

    @staticmethod
    def of(inputs: OpInputs) -> "StaticConfig":
        """The configuration of the op's arguments."""
        e1, e3, em = (float(v) for v in inputs.gate_values)
        coefs = (em, e3 * (1 - em), e1 * (1 - e3) * (1 - em))
        return StaticConfig(int(inputs.num_heads), float(inputs.alpha), (int(inputs.grid_h), int(inputs.grid_w)),
                            bool(inputs.training), int(inputs.prefix), int(inputs.center), (e1, e3, em), coefs,
                            tuple(bool(v) for v in inputs.live),
                            (float(inputs.bn_eps[0]), float(inputs.bn_eps[1])), bool(inputs.save))


def output_specs(x: torch.Tensor, w_v: torch.Tensor, cfg: StaticConfig) -> OpOutputs:
    """(shape, dtype) of every output of the op, from the inputs' shapes and the static arguments."""
    bsz, n, c = x.shape
    hdim = w_v.shape[0]
    h = cfg.num_heads
    d = hdim // h
    p = cfg.grid[0] * cfg.grid[1]
    live_m, live_3, live_1 = cfg.live
    c_m, c_3, c_1 = cfg.coefs
    f32, dt, none = torch.float32, x.dtype, (0,)
    save = cfg.save
    conv_chosen = (live_3 and c_3 == 1) or (live_1 and c_1 == 1)
    return OpOutputs(
        out=((bsz, n, c), dt),
        out_msa=((bsz, n, c) if save and live_m and c_m != 1 else none, dt),
        proj=((bsz, n, 3 * hdim if live_m else hdim) if save else none, dt),
        r_live=((bsz, n, d) if save and conv_chosen else none, dt),
        y3=((bsz, p, d) if save and live_3 else none, f32),
        y1=((bsz, p, d) if save and live_1 else none, f32),
        chan3=((5, d) if live_3 else none, f32),
        chan1=((5, d) if live_1 else none, f32),
        m=((h, 9) if save and (live_3 or live_1) else none, f32),
    )


def bn_channels(y: torch.Tensor, st: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                training: bool, block_p: int) -> torch.Tensor:
    """Per-channel (5, d) fp32 rows [mean, rstd, gamma, beta, var] of the BN that normalises ``y``.

    In training, mean/var are the batch statistics (combined from the per-program partial sums with Chan's formula;
    var is the biased one used for normalising); in eval they are the running statistics.
    """
    bsz, p, d = y.shape
    dev = y.device
    if training:
        n = bsz * p
        if n < 2:
            raise ValueError(f"gated_attn_conv: BatchNorm in training needs more than 1 value per channel, got {n}")
        starts = torch.arange(0, p, block_p, device=dev)
        cnt = torch.clamp(p - starts, max=block_p).to(torch.float32).repeat(bsz)[:, None]  # (B*n_pb, 1)
        s, m2 = st[:, 0], st[:, 1]
        mean = s.sum(0) / n
        m2_tot = m2.sum(0) + (cnt * (s / cnt - mean) ** 2).sum(0)
        var = m2_tot / n
    else:
        mean = running_mean.float()
        var = running_var.float()
    rstd = torch.rsqrt(var + eps)
    gamma = weight.float() if weight is not None else torch.ones(d, device=dev)
    beta = bias.float() if bias is not None else torch.zeros(d, device=dev)
    return torch.stack([mean, rstd, gamma, beta, var])


def update_running_stats(bn: BNState, chan: torch.Tensor, n: int) -> None:
    """``F.batch_norm``'s running-statistics update from the batch statistics in ``chan`` (rows 0 and 4)."""
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_((1 - bn.momentum) * bn.running_mean.float() + bn.momentum * chan[0])
        if bn.running_var is not None:
            bn.running_var.copy_((1 - bn.momentum) * bn.running_var.float() + bn.momentum * chan[4] * (n / (n - 1)))


def out_map(m: torch.Tensor, w_o: torch.Tensor, cols: List[int], num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixed output map R = sum_g w_g Wo_g with w_g = sum_{k in cols} M[g, k]. Returns R (C, d) fp32 and w (h,)."""
    c, hdim = w_o.shape
    wsum = m[:, cols].sum(1)
    r_map = torch.einsum("g,cgd->cd", wsum, w_o.float().view(c, num_heads, hdim // num_heads))
    return r_map, wsum


def attention_heads(proj: torch.Tensor, num_heads: int, groups: int) -> Tuple[torch.Tensor, ...]:
    """q, k, v of the attention from the [q k v] projections ``proj`` (B, N, 3*h*d).

    Without an attention bias (``groups`` = 0) each is a (B, h, N, d) view. With a bias of G = ``groups`` groups, the
    G consecutive batch rows that share the bias groups are folded into the head axis: (B/G, G*h, N, d) each (a copy
    for G > 1), so that the bias enters as one (1, G*h, N, N) mask broadcast over B/G (a 4-D attention: SDPA's fused
    kernels take only 4-D inputs), and its gradient comes out summed over the rows of each group.
    """
    bsz, n, three_hd = proj.shape
    d = three_hd // (3 * num_heads)
    qkv = proj.view(bsz, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
    if groups > 1:
        qkv = qkv.reshape(3, bsz // groups, groups * num_heads, n, d)
    return qkv.unbind(0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA on the tensors of :func:`attention_heads`; ``attn_bias`` (G, h, N, N) or None. Same shape as q."""
    if attn_bias is None:
        return F.scaled_dot_product_attention(q, k, v)
    g, h, n, _ = attn_bias.shape
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.reshape(1, g * h, n, n))


def forward(cfg: StaticConfig, x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1, bn3, attn_bias=None) -> OpOutputs:
    """The layer and what its backward needs (see :class:`OpOutputs`); ``bn1``, ``bn3`` are (weight, bias,
    running_mean, running_var) tuples."""
    bsz, n, c = x.shape
    h = cfg.num_heads
    hdim = w_v.shape[0]
    d = hdim // h
    gh, gw = cfg.grid
    pre = cfg.prefix
    live_m, live_3, live_1 = cfg.live
    c_m, c_3, c_1 = cfg.coefs
    specs = output_specs(x, w_v, cfg)
    res = {name: torch.empty(shape, device=x.device, dtype=dt) for name, (shape, dt) in specs._asdict().items()}

    # projections: one [Wqk; Wv] GEMM when MSA is computed. The value projection u carries no bias: attention rows sum
    # to 1, so attn (u + bv) = attn u + bv and bv folds into the output bias bo + Wo bv (exact); the conv path adds
    # its mixed bias itself, as the reference does.
    if live_m:
        b_qkv = None if b_qk is None else torch.cat([b_qk, b_qk.new_zeros(hdim)])
        proj = F.linear(x, torch.cat([w_qk, w_v]), b_qkv)  # (B, N, 3*h*d)
        v = proj[..., 2 * hdim:]
    else:
        proj = F.linear(x, w_v)  # (B, N, h*d)
        v = proj
    if cfg.save:
        res["proj"] = proj

    out = None
    if live_m:
        groups = 0 if attn_bias is None else attn_bias.shape[0]
        o = attention(*attention_heads(proj, h, groups), attn_bias).reshape(bsz, h, n, d)
        o2 = o.transpose(1, 2).reshape(bsz, n, hdim)
        b_eff = b_o
        if b_v is not None:
            b_eff = w_o.float() @ b_v.float()
            b_eff = (b_eff if b_o is None else b_eff + b_o.float()).to(x.dtype)
        out_msa = F.linear(o2, w_o, b_eff)
        if c_m == 1:
            out = out_msa
        elif cfg.save:
            res["out_msa"] = out_msa

    if live_3 or live_1:
        m = torch.softmax(head_probs.float() / cfg.alpha, dim=0)  # (h, 9)
        if cfg.save:
            res["m"] = m
        if b_v is not None:
            c_taps = m.t() @ b_v.float().view(h, d)  # (9, d) mixed tap biases c_k
            c_bias = torch.stack([c_taps.sum(0), c_taps[cfg.center]])
        else:
            c_bias = torch.zeros(2, d, device=x.device)
        y3, y1, st3, st1 = conv_fwd(v, m.contiguous(), c_bias, gh, gw, pre, cfg.center, live_3, live_1, cfg.training)
        block_p = tile_block_p(pow2(h), pow2(d))
        for kind, is_live, coef, y, st, bn in (("3", live_3, c_3, y3, st3, bn3), ("1", live_1, c_1, y1, st1, bn1)):
            if not is_live:
                continue
            if cfg.save:
                res["y" + kind] = y
            eps = cfg.eps[1] if kind == "3" else cfg.eps[0]
            chan = bn_channels(y, st, *bn, eps, cfg.training, block_p)
            res["chan" + kind] = chan
            if coef == 1:
                cols = list(range(9)) if kind == "3" else [cfg.center]
                r_map, _ = out_map(m, w_o, cols, h)
                r_live = bn_relu(y, chan, n, pre, x.dtype)
                out = F.linear(r_live, r_map.to(x.dtype), b_o)
                if pre:
                    out[:, :pre] = x[:, :pre]
                if cfg.save:
                    res["r_live"] = r_live
    res["out"] = out if out is not None else torch.zeros_like(x)  # skip: no candidate has coefficient 1
    return OpOutputs(**res)
