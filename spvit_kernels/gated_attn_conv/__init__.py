"""Fused search-mode SPViT attention layer (docs/method.md §1, §2, §10): MSA, 3x3 and 1x1 from one value projection.

Same signature and semantics as :func:`spvit_kernels.reference.gated_attn_conv`::

    out = em * MSA(x) + e3 (1 - em) * conv3x3(x) + e1 (1 - e3) (1 - em) * conv1x1(x)

    conv_k(x)[patches] = ReLU(BN_k(sum_t mix_k(u)[p + offset_t] + c_k)) R_k^T + b_o,   conv_k(x)[prefix] = x[prefix]
    u = x Wv^T,  M = softmax(A / alpha) (h, 9),  R_k = sum_g (sum_{t in k} M[g, t]) Wo_g

Contract:

* ``gates`` (e1, e3, em) are exactly 0/1, so exactly one candidate (or none: skip, zeros) has coefficient 1; only
  that one contributes to the output, and only it is back-propagated. Computed candidates with coefficient 0 (all
  of them in training or when ``gates`` needs a gradient, unless ``compute_all`` says otherwise) get exact zero
  parameter gradients; candidates not computed get None. ``gates`` gets the gradient of the formula above.
* In training the BatchNorms use batch statistics and their running statistics are updated in place, as
  ``F.batch_norm`` does; in eval they use the running statistics.
* ``attn_bias`` (G, h, N, N) adds to the MSA logits, row b using ``attn_bias[b % G]`` (windowed attention, Swin);
  the conv candidates never see it.
* Under ``torch.autocast`` the activations and projection weights are cast to the autocast dtype first; head
  mixing, BatchNorm and the gate gradients stay in fp32. No double backward.

Modules: :mod:`.kernels` (Triton kernels), :mod:`.launch` (their launchers and the backward's launch ops),
:mod:`.forward` (the op's named inputs / outputs, static configuration and body), :mod:`.backward` (its autograd
formula), :mod:`.op` (the ``torch.library`` op ``spvit::gated_attn_conv`` and the provider :func:`gated_attn_conv`).
The design (what runs where, what is saved, why) is described in docs/kernel-design.md.
"""
from .op import gated_attn_conv, gated_attn_conv_op

__all__ = ["gated_attn_conv", "gated_attn_conv_op"]
