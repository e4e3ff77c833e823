"""The FLOPs model against the golden numbers of docs/method.md (§3.1, §3.3) and its gradient."""
import pytest
import timm
import torch

import spvit
from spvit.arch import Architecture, BlockArch
from spvit.flops import arch_macs, dense_macs, layer_costs
from spvit.models.convert import signature_of

GOLDEN_DENSE = {"deit_tiny_patch16_224": 1_251_052_032, "deit_small_patch16_224": 4_586_542_080,
                "deit_base_patch16_224": 17_510_836_224}


@pytest.fixture(scope="module")
def sigs():
    with torch.device("meta"):  # shapes only: fast
        return {n: signature_of(timm.create_model(n, pretrained=False)) for n in GOLDEN_DENSE}


def test_dense_golden(sigs):
    for n, v in GOLDEN_DENSE.items():
        assert dense_macs(sigs[n]) == v


def test_deit_small_layer_costs(sigs):
    c1, c3, cm, per_unit, norms = layer_costs(sigs["deit_small_patch16_224"])
    assert (c1, c3, cm, per_unit * 1536, norms) == (9_633_792, 48_168_960, 146_000_640, 231_211_008, 151_296)


def _arch(sig, attn, widths, name):
    return Architecture(name, sig, [BlockArch(a, tuple(range(w))) for a, w in zip(attn, widths)])


def test_shipped_architectures_golden(sigs):
    # §8.3 architectures, §3.3 golden MAC counts
    ti = _arch(sigs["deit_tiny_patch16_224"], ["1x1", "1x1"] + ["msa"] * 10,
               [744, 758, 764, 767, 766, 764, 756, 659, 633, 473, 179, 145], "deit_tiny_patch16_224")
    sm = _arch(sigs["deit_small_patch16_224"], ["1x1"] + ["msa"] * 11,
               [1304, 1399, 1344, 1214, 1251, 1183, 1140, 925, 742, 391, 104, 103], "deit_small_patch16_224")
    b60 = _arch(sigs["deit_base_patch16_224"], ["1x1"] * 3 + ["3x3"] * 2 + ["msa"] * 7,
                [1118, 489, 1050, 1345, 1336, 1326, 1431, 1564, 1606, 1702, 1290, 190], "deit_base_patch16_224")
    b100 = _arch(sigs["deit_base_patch16_224"], ["1x1"] * 3 + ["3x3"] + ["msa"] * 8,
                 [1253, 610, 1343, 1912, 2354, 2306, 2483, 2753, 2869, 2860, 2443, 934], "deit_base_patch16_224")
    assert arch_macs(ti) == 1_036_705_536
    assert arch_macs(sm) == 3_346_503_936
    assert arch_macs(b60) == 8_390_582_784
    assert arch_macs(b100) == 11_730_751_488
    assert spvit.gflops(sm) == pytest.approx(3.346503936)


def test_flops_target_out_of_range():
    from tests.helpers import tiny_vit
    sn = spvit.supernet(tiny_vit())
    with pytest.raises(ValueError, match="cannot be met"):
        sn.flops_loss(sn.dense_gflops() * 1.01, 1.0)
    with pytest.raises(ValueError, match="cannot be met"):
        sn.flops_loss(sn.min_gflops() * 0.5, 1.0)


@pytest.mark.parametrize("name,gmacs,mparams", [("spvit_deit_tiny_patch16_224", 1.037, 4.87),
                                                ("spvit_deit_small_patch16_224", 3.347, 16.12),
                                                ("spvit_deit_base_patch16_224", 8.391, 46.21)])
def test_registered_shipped_models(name, gmacs, mparams):
    # docs/method.md §8.4 recount: fine-tune-format parameters (incl. head_probs and BN affine, excl. BN buffers)
    with torch.device("meta"):
        m = timm.create_model(name)
    assert isinstance(m, spvit.PrunedModel)
    assert spvit.gflops(m) == pytest.approx(gmacs, abs=5e-4)
    assert spvit.count_params(m) / 1e6 == pytest.approx(mparams, abs=5e-3)
