"""Backward of the op ``spvit::gated_attn_conv`` (registered as its autograd formula in :mod:`.op`).

Only the live candidate (coefficient 1) is back-propagated: MSA through SDPA's own backward on the attention
recomputed from the saved q, k, v; a conv candidate through the Triton kernels (:mod:`.launch`: ReLU/BN backward
sums, then BN backward at the shifted neighbours, adjoint shift-sum and head un-mixing into ``du``). The gate
gradients come from the inner products of the upstream gradient G with each computed candidate's output
(``S = <G_patch R, r> + <sum G_patch, bo> + <G_prefix, x_prefix>`` for a conv candidate, ``<G, out_msa>`` for MSA)::

    dL/de_m = S_m - e3 S_3 - e1 (1 - e3) S_1
    dL/de_3 = (1 - em) (S_3 - e1 S_1)
    dL/de_1 = (1 - e3) (1 - em) S_1

Parameters of computed candidates whose coefficient is 0 get exact zero gradients; those of candidates that were
not computed get None (as in the eager reference). No double backward.
"""
from typing import Optional

import torch

from .forward import OpInputs, OpOutputs, StaticConfig, attention, attention_heads, out_map
from .launch import bn_bwd_stats, conv_bwd, dot


_MM_OUT_DTYPE_OK = [True]


def _mm_f32(a: torch.Tensor, b_f32: torch.Tensor) -> torch.Tensor:
    """fp32 result of ``a @ b`` for a (M, K) in any float dtype and b (K, N) fp32.

    Low-precision ``a`` on CUDA uses ``torch.mm(..., out_dtype=torch.float32)`` (bf16/fp16 tensor cores, fp32
    output) where this torch has it, else ``a`` is upcast.
    """
    if a.dtype != torch.float32 and a.is_cuda and _MM_OUT_DTYPE_OK[0]:
        try:
            return torch.mm(a, b_f32.to(a.dtype), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[0] = False
    return a.float() @ b_f32


def _maybe_zero(t: Optional[torch.Tensor], used: bool) -> Optional[torch.Tensor]:
    return torch.zeros_like(t) if (t is not None and used) else None


def setup_context(ctx, inputs, output):
    """Autograd context of ``spvit::gated_attn_conv``: the static configuration and the tensors the backward needs."""
    args = OpInputs(*inputs)
    cfg = StaticConfig.of(args)
    if not cfg.save:
        raise RuntimeError("spvit::gated_attn_conv ran with save=False but a backward is needed")
    ctx.cfg = cfg
    ctx.save_for_backward(args.x, args.w_qk, args.w_v, args.w_o, args.b_o, args.b_v, args.attn_bias, *output)
    ctx.meta = {
        "b_qk": None if args.b_qk is None else (args.b_qk.shape, args.b_qk.dtype),
        "gates": args.gates.dtype, "head": args.head_probs.dtype,
        "bn": [None if t is None else (t.shape, t.dtype)
               for t in (args.bn1_weight, args.bn1_bias, args.bn3_weight, args.bn3_bias)],
    }


def backward(ctx, grad_out, *_unused_output_grads):
    """Gradients of the inputs of ``spvit::gated_attn_conv`` (one per :class:`OpInputs` field it was called with)."""
    with torch.autocast(grad_out.device.type, enabled=False):  # fp32 reductions stay fp32 under an outer autocast
        return _backward_impl(ctx, grad_out)


def _zeros(meta, dev) -> Optional[torch.Tensor]:
    return None if meta is None else torch.zeros(meta[0], device=dev, dtype=meta[1])


def _backward_impl(ctx, grad_out):
    cfg = ctx.cfg
    x, w_qk, w_v, w_o, b_o, b_v, attn_bias, *saved_outputs = ctx.saved_tensors
    out, out_msa, proj, r_live, y3, y1, chan3, chan1, m = OpOutputs(*saved_outputs)
    needs = OpInputs(*ctx.needs_input_grad)  # attn_bias: None when the op was called without it
    bsz, n, c = x.shape
    hdim = w_v.shape[0]
    h = cfg.num_heads
    d = hdim // h
    gh, gw = cfg.grid
    pre = cfg.prefix
    live_m, live_3, live_1 = cfg.live
    c_m, c_3, c_1 = cfg.coefs
    e1, e3, em = cfg.gates
    need_gate = needs.gates
    need_bias = attn_bias is not None and bool(needs.attn_bias)
    dev = x.device
    g = grad_out.contiguous() if grad_out is not None else torch.zeros_like(x)
    g2 = g.view(bsz * n, c)
    x2 = x.view(bsz * n, c)
    v = proj[..., 2 * hdim:] if live_m else proj

    zero = torch.zeros((), device=dev, dtype=torch.float32)
    s_m, s_3, s_1 = zero, zero, zero
    dx = torch.zeros_like(x)
    dw_qk = _maybe_zero(w_qk, live_m)
    db_qk = _zeros(ctx.meta["b_qk"], dev) if live_m else None
    dw_v = _maybe_zero(w_v, True)
    db_v = None if b_v is None else torch.zeros_like(b_v)
    dw_o = _maybe_zero(w_o, True)
    db_o = None if b_o is None else torch.zeros_like(b_o)
    conv_live = live_3 or live_1
    dm = torch.zeros(h, 9, device=dev, dtype=torch.float32) if conv_live else None
    bn_meta = ctx.meta["bn"]
    # attention bias: exact zeros when MSA is computed but not chosen (as the reference's 0 * out_msa gives)
    d_bias = torch.zeros_like(attn_bias) if need_bias and live_m else None
    dbn = {"1x1": [_zeros(bn_meta[0], dev) if live_1 else None, _zeros(bn_meta[1], dev) if live_1 else None],
           "3x3": [_zeros(bn_meta[2], dev) if live_3 else None, _zeros(bn_meta[3], dev) if live_3 else None]}

    if conv_live or (need_gate and b_o is not None):
        gsum_patch = g[:, pre:].sum((0, 1), dtype=torch.float32)  # (C,)
    prefix_dot = zero
    if need_gate and pre:
        prefix_dot = (g[:, :pre].float() * x[:, :pre].float()).sum()

    # ---- MSA ----
    if live_m:
        if need_gate:
            s_m = dot(g, (out if c_m == 1 else out_msa).contiguous())
        if c_m == 1:
            # attention backward: the attention is recomputed from the saved q, k, v (one extra attention forward,
            # a few % of the layer's FLOPs at ViT token counts) and differentiated by SDPA's own backward
            # (with a bias, over the grouped layout of attention_heads; SDPA's backward sums the bias gradient over
            # the batch rows of each group)
            groups = 0 if attn_bias is None else attn_bias.shape[0]
            heads = attention_heads(proj, h, groups)
            do = (g2 @ w_o).view(bsz, n, h, d).transpose(1, 2).reshape(heads[0].shape)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in heads]
                bias = None
                if attn_bias is not None:
                    bias = attn_bias.detach().requires_grad_(need_bias)
                    if need_bias:
                        leaves.append(bias)
                o = attention(*leaves[:3], bias)
                grads_attn = torch.autograd.grad(o, leaves, do)
            dq, dk, dvh = (t.reshape(bsz, h, n, d) for t in grads_attn[:3])
            if need_bias:
                d_bias = grads_attn[3]
            o2 = o.detach().reshape(bsz, h, n, d).transpose(1, 2).reshape(bsz * n, hdim)
            gsum = g.sum((0, 1), dtype=torch.float32)  # (C,)
            dw_o_f = (g2.t() @ o2).float()
            if b_v is not None:  # the folded bias bo + Wo bv
                dw_o_f += gsum[:, None] * b_v.float()[None, :]
                db_v = (gsum @ w_o.float()).to(b_v.dtype)
            dw_o = dw_o_f.to(w_o.dtype)
            if b_o is not None:
                db_o = gsum.to(b_o.dtype)
            dqkv = torch.stack([dq, dk, dvh], dim=0).permute(1, 3, 0, 2, 4).reshape(bsz * n, 3 * hdim)
            dw_qkv = dqkv.t() @ x2
            dw_qk = dw_qkv[:2 * hdim].to(w_qk.dtype)
            dw_v = dw_qkv[2 * hdim:].to(w_v.dtype)
            if db_qk is not None:
                db_qk = dqkv[:, :2 * hdim].sum(0, dtype=torch.float32).to(db_qk.dtype)
            dx = (dqkv @ torch.cat([w_qk, w_v])).view(bsz, n, c)

    # ---- conv candidates ----
    if conv_live:
        kinds = [kd for kd, lv in (("3x3", live_3), ("1x1", live_1)) if lv]
        ys = {"3x3": y3, "1x1": y1}
        chans = {"3x3": chan3, "1x1": chan1}
        coef = {"3x3": c_3, "1x1": c_1}
        maps = {}
        for kind in kinds:
            cols = list(range(9)) if kind == "3x3" else [cfg.center]
            maps[kind] = (cols,) + out_map(m, w_o, cols, h)
        # dr for every computed conv candidate with one GEMM: G (B, N, C) @ [R_a | R_b] (C, k*d)
        r_cat = torch.cat([maps[kind][1] for kind in kinds], dim=1)
        dr_all = _mm_f32(g2, r_cat).view(bsz, n, len(kinds) * d)  # fp32: it feeds the gate inner products
        for i, kind in enumerate(kinds):
            cols, r_map, wsum = maps[kind]
            dr = dr_all[..., i * d:(i + 1) * d]
            chan = chans[kind][:4].contiguous()
            y = ys[kind]
            sums = bn_bwd_stats(dr, y, chan, pre)  # (3, d): sum dz, sum dz*xn, sum dr*r
            s_conv = sums[2].sum() + prefix_dot
            if b_o is not None:
                s_conv = s_conv + gsum_patch @ b_o.float()
            if kind == "3x3":
                s_3 = s_conv
            else:
                s_1 = s_conv
            if coef[kind] != 1:
                continue
            # output map and bias
            d_rmap = _mm_f32(g2.t(), r_live.view(bsz * n, d).float())  # (C, d) fp32: feeds dM and dWo
            dw_o = (wsum[None, :, None] * d_rmap[:, None, :]).reshape(c, hdim).to(w_o.dtype)
            dm[:, cols] += torch.einsum("cgd,cd->g", w_o.float().view(c, h, d), d_rmap)[:, None]
            if b_o is not None:
                db_o = gsum_patch.to(b_o.dtype)
            # BN affine and the coefficients of dy = a*dz + b*xn + cst
            sum_dz, sum_dzxn = sums[0], sums[1]
            rstd, gamma = chan[1], chan[2]
            w_meta, b_meta = (bn_meta[2], bn_meta[3]) if kind == "3x3" else (bn_meta[0], bn_meta[1])
            if w_meta is not None:
                dbn[kind][0] = sum_dzxn.to(w_meta[1])
            if b_meta is not None:
                dbn[kind][1] = sum_dz.to(b_meta[1])
            a = gamma * rstd
            if cfg.training:
                npos = bsz * gh * gw
                b_coef = -a * sum_dzxn / npos
                cst = -a * sum_dz / npos
            else:
                b_coef = torch.zeros_like(a)
                cst = torch.zeros_like(a)
            chan7 = torch.cat([chan, torch.stack([a, b_coef, cst])]).contiguous()
            dv, dm_v, dc = conv_bwd(dr, y, chan7, v, m.contiguous(), gh, gw, pre, cfg.center, kind == "3x3")
            dm += dm_v
            dv2 = dv.view(bsz * n, hdim)
            dw_v = (dv2.t() @ x2).to(w_v.dtype)
            dx = (dv2 @ w_v).view(bsz, n, c)
            if pre:
                dx[:, :pre] += g[:, :pre]
            if b_v is not None:  # conv bias sum_g w_g bv_g
                db_v = (wsum[:, None] * dc[None, :]).reshape(hdim).to(b_v.dtype)
                dm[:, cols] += (b_v.float().view(h, d) @ dc)[:, None]

    d_head = None
    if dm is not None:
        d_head = (m * (dm - (m * dm).sum(0, keepdim=True)) / cfg.alpha).to(ctx.meta["head"])

    d_gates = None
    if need_gate:
        de_m = s_m - e3 * s_3 - e1 * (1 - e3) * s_1
        de_3 = (1 - em) * (s_3 - e1 * s_1)
        de_1 = (1 - e3) * (1 - em) * s_1
        d_gates = torch.stack([de_1, de_3, de_m]).to(ctx.meta["gates"])

    no_grad = OpInputs(*(None,) * len(OpInputs._fields))  # running statistics and static arguments: None
    grads = no_grad._replace(
        x=dx, w_qk=dw_qk, b_qk=db_qk, w_v=dw_v, b_v=db_v, w_o=dw_o, b_o=db_o, head_probs=d_head,
        bn1_weight=dbn["1x1"][0], bn1_bias=dbn["1x1"][1], bn3_weight=dbn["3x3"][0], bn3_bias=dbn["3x3"][1],
        gates=d_gates, attn_bias=d_bias)
    return tuple(grads)[:len(ctx.needs_input_grad)]  # attn_bias only when the op was called with it
