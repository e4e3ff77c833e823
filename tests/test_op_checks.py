"""Every public op entry (spvit_kernels.ops) checks devices, dtypes, shapes and ranges of all its arguments and raises
one clear TypeError / ValueError naming the argument, whatever backend would run; and the model-level entry points
(prune, load_official) refuse arguments of the wrong kind the same way."""
import pytest
import torch

import spvit
from spvit_kernels import ops, reference

B, H, W, P, C, D, F, HEADS = 2, 3, 4, 1, 16, 8, 12, 2
N = P + H * W


def r(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


def shift_sum_args():
    return dict(planes=r(B, H * W, 9, D), bias=r(D), grid=(H, W), relu=True)


def deploy_conv_args():
    return dict(x_hat=r(B, N, C), w_planes=r(9 * D, C), b_fold=r(D), w_out=r(C, D), b_out=r(C), grid=(H, W),
                num_prefix_tokens=P)


def ffn_args(masked=False):
    args = dict(x=r(B, N, C), w1=r(F, C), b1=r(F), w2=r(C, F), b2=r(C))
    if masked:
        args["mask"] = (torch.rand(F) > 0.5).float()
    args["approximate"] = "none"
    return args


def bn(d=D):
    return reference.BNState(torch.ones(d), torch.zeros(d), torch.zeros(d), torch.ones(d))


def gac_args():
    hd = HEADS * D
    return dict(x_hat=r(B, N, C), w_qk=r(2 * hd, C), b_qk=r(2 * hd), w_v=r(hd, C), b_v=r(hd), w_o=r(C, hd),
                b_o=r(C), head_probs=r(HEADS, 9), bn1=bn(), bn3=bn(), gates=torch.tensor([1.0, 1.0, 0.0]),
                num_heads=HEADS, alpha=1.0, grid=(H, W), training=False, num_prefix_tokens=P, center=4)


POSITIONAL = {"shift_sum": 4, "deploy_conv": 6, "pruned_ffn": 5, "masked_ffn": 6, "gated_attn_conv": 11}
MAKERS = {"shift_sum": shift_sum_args, "deploy_conv": deploy_conv_args, "pruned_ffn": ffn_args,
          "masked_ffn": lambda: ffn_args(masked=True), "gated_attn_conv": gac_args}


def call(op, args):
    names = list(args)
    k = POSITIONAL[op]
    return getattr(ops, op)(*[args[n] for n in names[:k]], **{n: args[n] for n in names[k:]})


# (op, argument, bad value (a function of the good arguments), error type, message fragment)
CASES = [
    ("shift_sum", "bias", lambda a: a["bias"].to("meta"), ValueError, "bias is on meta"),
    ("shift_sum", "planes", lambda a: a["planes"].to(torch.int32), TypeError, "planes must be float"),
    ("shift_sum", "planes", lambda a: a["planes"][0], ValueError, "planes must have 4 dimensions"),
    ("shift_sum", "planes", lambda a: a["planes"][:, :, :3], ValueError, "9 or 1 taps"),
    ("shift_sum", "bias", lambda a: a["bias"][:-1], ValueError, "bias must have shape"),
    ("shift_sum", "bias", lambda a: a["bias"].numpy(), TypeError, "bias must be a tensor"),
    ("shift_sum", "grid", lambda a: (H, 0), ValueError, "grid"),
    ("shift_sum", "grid", lambda a: 12, TypeError, "grid"),
    ("shift_sum", "grid", lambda a: (W, H + 1), ValueError, "positions but the grid"),
    ("shift_sum", "relu", lambda a: "yes", TypeError, "relu"),
    ("deploy_conv", "b_fold", lambda a: a["b_fold"][:0], ValueError, "b_fold must be"),
    ("deploy_conv", "b_fold", lambda a: a["b_fold"].to("meta"), ValueError, "b_fold is on meta"),
    ("deploy_conv", "w_planes", lambda a: a["w_planes"][:-1], ValueError, "w_planes must be"),
    ("deploy_conv", "w_out", lambda a: a["w_out"].t(), ValueError, "w_out must have shape"),
    ("deploy_conv", "b_out", lambda a: a["b_out"].to("meta"), ValueError, "b_out is on meta"),
    ("deploy_conv", "x_hat", lambda a: a["x_hat"][:, 1:], ValueError, "tokens"),
    ("deploy_conv", "x_hat", lambda a: a["x_hat"].long(), TypeError, "x_hat must be float"),
    ("deploy_conv", "num_prefix_tokens", lambda a: -1, ValueError, "num_prefix_tokens"),
    ("pruned_ffn", "w1", lambda a: a["w1"].to("meta"), ValueError, "w1 is on meta"),
    ("pruned_ffn", "w2", lambda a: a["w2"][:, :-1], ValueError, "w2 must have shape"),
    ("pruned_ffn", "b1", lambda a: a["b1"][:-1], ValueError, "b1 must have shape"),
    ("pruned_ffn", "b2", lambda a: a["b2"].to(torch.int64), TypeError, "b2 must be float"),
    ("pruned_ffn", "approximate", lambda a: "relu", ValueError, "approximate"),
    ("pruned_ffn", "x", lambda a: None, TypeError, "x must be a tensor"),
    ("masked_ffn", "mask", lambda a: a["mask"][:-1], ValueError, "mask must have shape"),
    ("masked_ffn", "mask", lambda a: a["mask"].to("meta"), ValueError, "mask is on meta"),
    ("gated_attn_conv", "center", lambda a: 99, ValueError, "center must be in"),
    ("gated_attn_conv", "center", lambda a: 1.5, TypeError, "center must be an integer"),
    ("gated_attn_conv", "head_probs", lambda a: a["head_probs"][:, :3], ValueError, "head_probs must have shape"),
    ("gated_attn_conv", "gates", lambda a: a["gates"][:2], ValueError, "gates must have shape"),
    ("gated_attn_conv", "bn3", lambda a: bn(D + 1), ValueError, "bn3.weight must have shape"),
    ("gated_attn_conv", "bn1", lambda a: torch.nn.BatchNorm2d(D), TypeError, "bn1 must be a reference.BNState"),
    ("gated_attn_conv", "num_heads", lambda a: 3, ValueError, "multiple of num_heads"),
    ("gated_attn_conv", "alpha", lambda a: 0.0, ValueError, "alpha must be > 0"),
    ("gated_attn_conv", "alpha", lambda a: float("nan"), ValueError, "alpha must be a finite number"),
    ("gated_attn_conv", "w_o", lambda a: a["w_o"].to("meta"), ValueError, "w_o is on meta"),
    ("gated_attn_conv", "attn_bias", lambda a: r(1, HEADS, N, N + 1), ValueError, "attn_bias must be"),
    ("gated_attn_conv", "grid", lambda a: (H, W, 1), TypeError, "grid"),
]


@pytest.mark.parametrize("op,arg,bad,exc,match", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_is_one_clear_error(op, arg, bad, exc, match):
    args = MAKERS[op]()
    args[arg] = bad(args)
    with pytest.raises(exc, match=match) as info:
        call(op, args)
    assert op in str(info.value)


@pytest.mark.parametrize("op", sorted(MAKERS))
def test_good_arguments_pass_and_match_the_reference(op):
    """The checks accept what the reference accepts (the default backend runs)."""
    args = MAKERS[op]()
    with torch.no_grad():
        out = call(op, args)
        names = list(args)
        k = POSITIONAL[op]
        ref = getattr(reference, op)(*[args[n] for n in names[:k]], **{n: args[n] for n in names[k:]})
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_extension_provider_rejects_an_empty_folded_bias():
    from spvit_kernels import _ext
    from spvit_kernels.deploy_conv import deploy_conv_ext

    if not _ext.has_op("shift_sum"):
        pytest.skip(f"the extension is not built: {_ext.error()}")
    args = deploy_conv_args()
    args["b_fold"] = args["b_fold"][:0]
    with pytest.raises(ValueError, match="b_fold must be"):
        deploy_conv_ext(*args.values())
    a = shift_sum_args()
    with pytest.raises(ValueError, match="meta"):  # the op called directly: its fake kernel sees real tensors
        torch.ops.spvit.shift_sum(a["planes"], a["bias"].to("meta"), H, W, True)


def test_model_entry_points_refuse_wrong_kinds(tmp_path):
    with pytest.raises(TypeError, match="arch must be an spvit.Architecture"):
        spvit.prune(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="model must be"):
        spvit.prune(None, None)
    path = tmp_path / "ck.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(TypeError, match="model must be a timm model name"):
        spvit.load_official(str(path), 123)
    with pytest.raises(TypeError, match="path must be a file path"):
        spvit.load_official(123, "deit_tiny_patch16_224")
