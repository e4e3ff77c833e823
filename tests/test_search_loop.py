"""Search and fine-tune loops on a tiny ViT over the embedded digits: outputs, optimiser split, FLOPs loss,
distillation."""
import csv
import json
import os

import pytest
import torch

import spvit
from spvit import finetune, optim, search
from spvit.config import SearchConfig
from spvit.distill import DistillationLoss
from spvit.distributed import DistInfo
from .pipeline_helpers import dense_gflops, tiny_cfg, tiny_search_cfg


def test_search_writes_everything_and_meets_pressure(tmp_path):
    out = tmp_path / "search"
    cfg = tiny_search_cfg(out, epochs=3)
    res = search.run(cfg)
    files = set(os.listdir(out))
    assert {"config.yaml", "metrics.csv", "gates.jsonl", "arch.json", "checkpoint.pth", "best.pth"} <= files
    assert {f"arch_epoch{e:03d}.json" for e in range(3)} <= files
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for k in ("train_loss", "train_task", "train_flops_loss", "val_acc1", "gflops", "n_msa", "n_skip",
              "ffn_kept_frac", "train_img_s", "lr0", "lr1"):
        assert k in rows[0], k
    gates = [json.loads(line) for line in open(out / "gates.jsonl")]
    assert len(gates) == 3 and len(gates[0]["blocks"]) == 2 and "p_choice" in gates[0]["blocks"][0]
    arch = spvit.Architecture.load(str(out / "arch.json"))
    # the FLOPs loss pushes the read-out below the dense model, towards the target
    assert res["gflops"] < dense_gflops()
    assert arch.meta["epoch"] == 2 and abs(spvit.gflops(arch) - res["gflops"]) < 1e-9
    assert float(rows[-1]["lr1"]) == pytest.approx(cfg["arc_lr"], rel=0.5)


def test_two_optimisers_split_parameters(tmp_path):
    cfg = tiny_search_cfg(tmp_path / "s", epochs=1)
    sn = search.build_supernet(SearchConfig.from_dict(cfg), 10, cfg["model_kwargs"], DistInfo())
    groups = optim.decay_groups(sn, 0.05)
    arch = sn.arch_parameters()
    names = {id(p): n for n, p in sn.named_parameters()}
    assert arch and all("thresholds" in names[id(p)] for p in arch)
    weight_names = {names[id(p)] for g in groups for p in g["params"]}
    assert not any("thresholds" in n for n in weight_names)
    decay = {names[id(p)] for p in groups[1]["params"]}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    assert any(n.endswith("head_probs") for n in decay)  # head_probs is a weight with decay (docs/method.md §4.3)
    assert any(n.endswith("pos_embed") for n in no_decay) and any(n.endswith("cls_token") for n in no_decay)
    assert all(not n.endswith(".bias") for n in decay)
    assert len(weight_names) + len(arch) == len(list(sn.parameters()))


def test_finetune_with_distillation(tmp_path):
    s = search.run(tiny_search_cfg(tmp_path / "search", epochs=1))
    module_path = tmp_path / "teacher_module.pth"
    torch.save(s["supernet"].vit, module_path)  # a whole pickled module: only with the opt-in flag
    ft0 = tmp_path / "ft_none"
    finetune.run(tiny_cfg(finetune.DEFAULTS, ft0, arch=s["arch"], init="none", epochs=1))
    teachers = {"hard": dict(teacher=str(ft0 / "best.pth")),  # a checkpoint of a run (loaded safely)
                "soft": dict(teacher=str(module_path), teacher_file_runs_code=True)}
    for kind in ("hard", "soft"):
        cfg = tiny_cfg(finetune.DEFAULTS, tmp_path / f"ft_{kind}", arch=s["arch"], init="none", epochs=1,
                       distillation=kind, **teachers[kind])
        res = finetune.run(cfg)
        rows = list(csv.DictReader(open(tmp_path / f"ft_{kind}" / "metrics.csv")))
        assert "train_distill" in rows[0] and res["best_acc1"] >= 0
        ck = torch.load(tmp_path / f"ft_{kind}" / "best.pth", weights_only=True)
        assert ck["arch"]["blocks"] and ck["model_name"] == "spvit_demo_vit"
    # carrying the searched weights from the search checkpoint
    cfg = tiny_cfg(finetune.DEFAULTS, tmp_path / "ft_carry", arch=s["arch"],
                   init=str(tmp_path / "search" / "checkpoint.pth"), epochs=1)
    assert finetune.run(cfg)["gflops"] == pytest.approx(s["gflops"])


def test_distillation_losses():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(5, 4)
    x = torch.randn(6, 5)
    logits = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    t = teacher(x).detach()
    hard = DistillationLoss(teacher, "hard", alpha=0.5)(x, logits, y)
    ref = 0.5 * torch.nn.functional.cross_entropy(logits, y) + 0.5 * torch.nn.functional.cross_entropy(
        logits, t.argmax(-1))
    assert torch.allclose(hard, ref)
    soft = DistillationLoss(teacher, "soft", alpha=1.0, tau=2.0)(x, logits, y)
    p_t = torch.softmax(t / 2, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(logits / 2, -1))).sum() * 4 / logits.numel()
    assert torch.allclose(soft, kl, atol=1e-6)
    soft.backward()
    assert logits.grad is not None and not any(p.requires_grad for p in teacher.parameters())


def test_lr_schedule_matches_deit_semantics():
    # search configs: weight lr constant at the floor, arc lr decays < 1% over 21 epochs (docs/method.md §4.4)
    assert optim.epoch_lr(20, 1e-4, 1e-4, 300) == pytest.approx(1e-4)
    assert optim.epoch_lr(0, 1e-3, 1e-4, 300) == optim.epoch_lr(1, 1e-3, 1e-4, 300) == pytest.approx(1e-3)
    assert optim.epoch_lr(20, 1e-3, 1e-4, 300) == pytest.approx(0.990e-3, rel=2e-3)
    assert optim.epoch_lr(131, 1e-4, 1e-5, 130) == pytest.approx(1e-5)


def test_lr_never_rises_when_the_scaled_lr_is_below_min_lr():
    # a small batch scales lr 5e-5 x 64/512 below min_lr 1e-4: the floor is capped at the scaled lr
    lr = 5e-5 * 64 / 512
    floor = optim.lr_floor(lr, 1e-4, "--min-lr")
    values = [optim.epoch_lr(e, lr, floor, 300) for e in range(30)]
    assert floor == lr and all(b <= a for a, b in zip(values, values[1:]))
    assert optim.lr_floor(1e-3, 1e-5, "--min-lr") == 1e-5
