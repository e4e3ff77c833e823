"""The ``spvit`` command (also ``python -m spvit``): demo, search, finetune, eval, deploy, bench.

Configuration: built-in defaults, then ``--config file.yaml`` (flat keys named like the flags, with underscores),
then the flags given on the command line; the resolved config is saved in the run folder. Bad input (missing
dataset, wrong layout, unreachable FLOPs target, architecture for another model, existing run folder) prints one
``spvit: error: ...`` line and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

EXIT_BAD_INPUT = 2
CONFIG_DIRS = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")]
S = argparse.SUPPRESS


class ConfigError(ValueError):
    """Bad --config file or key."""


def _json(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {s!r} ({exc})")


def _optional_float(s: str):
    return None if s.lower() in ("none", "null", "") else float(s)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config read first; flags override it (see configs/)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help="timm model name, e.g. deit_small_patch16_224")
    g.add_argument("--model-kwargs", type=_json, default=S, help="JSON dict of extra timm.create_model kwargs")
    g.add_argument("--pretrained", default=S, help="'timm' (hub, needs network), 'none', or a local checkpoint path")
    g.add_argument("--drop-path", type=float, default=S)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=S, help="ImageNet-layout folder (train/, val/ of class folders) or 'digits'")
    g.add_argument("--num-classes", type=int, default=S)
    g.add_argument("--input-size", type=int, default=S)
    g.add_argument("--aa", default=S, help="RandAugment policy ('none' to disable)")
    g.add_argument("--reprob", type=float, default=S, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=S)
    g.add_argument("--cutmix", type=float, default=S)
    g.add_argument("--smoothing", type=float, default=S)
    g.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false", default=S)
    g.add_argument("--num-workers", type=int, default=S)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=S, help="run folder (never overwritten without --overwrite)")
    g.add_argument("--overwrite", action="store_true", default=S)
    g.add_argument("--resume", action="store_true", default=S, help="continue the run in --out from its checkpoint")
    g.add_argument("--stop-after-epoch", type=int, default=S, help="end after this epoch (resume later)")
    g.add_argument("--device", default=S, help="auto, cpu, cuda (one process per GPU under torchrun)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default=S,
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=S, help="per process")
    g.add_argument("--epochs", type=int, default=S, help="epochs to run")
    g.add_argument("--sched-epochs", type=int, default=S, help="cosine schedule length (default: --epochs)")
    g.add_argument("--lr", type=float, default=S, help="scaled by global batch / 512 unless --no-scale-lr")
    g.add_argument("--no-scale-lr", dest="scale_lr", action="store_false", default=S)
    g.add_argument("--min-lr", type=float, default=S)
    g.add_argument("--warmup-epochs", type=int, default=S)
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--clip-grad", type=_optional_float, default=S)
    g.add_argument("--model-ema", action="store_true", default=S)
    g.add_argument("--model-ema-decay", type=float, default=S)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spvit", description="SPViT: prune ViT self-attentions into convolutions.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole method on the embedded digits set, in minutes on a laptop CPU")
    p.add_argument("--config")
    p.add_argument("--out", default=S, help="run folder (default ./spvit_demo)")
    p.add_argument("--overwrite", action="store_true", default=S)
    p.add_argument("--device", default=S, help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--threads", type=int, default=S, help="torch CPU threads")
    p.add_argument("--teacher-epochs", type=int, default=S)
    p.add_argument("--search-epochs", type=int, default=S)
    p.add_argument("--finetune-epochs", type=int, default=S)
    p.add_argument("--target-fraction", type=float, default=S, help="FLOPs target as a fraction of the teacher's")
    p.add_argument("--distillation", choices=["none", "hard", "soft"], default=S)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)

    p = sub.add_parser("search", help="SPViT search: supernet + FLOPs loss, writes arch.json")
    _add_common(p)
    g = p.add_argument_group("search")
    g.add_argument("--target-gflops", type=float, default=S, help="FLOPs target T in GFLOPs (MACs / 1e9)")
    g.add_argument("--loss-lambda", type=float, default=S, help="weight of the FLOPs loss lambda (T - F)^2")
    g.add_argument("--arc-lr", type=float, default=S, help="learning rate of the gate logits (not scaled)")
    g.add_argument("--arc-min-lr", type=float, default=S)
    g.add_argument("--theta", type=float, default=S, help="initial gate logit")
    g.add_argument("--alpha", type=float, default=S, help="head-mixing temperature")

    p = sub.add_parser("finetune", help="fine-tune the pruned model of an arch.json (optionally distilled)")
    _add_common(p)
    g = p.add_argument_group("fine-tune")
    g.add_argument("--arch", default=S, help="arch.json from `spvit search`")
    g.add_argument("--init", default=S, help="'pretrained' (dense weights, the original) or a search checkpoint path")
    g.add_argument("--teacher", default=S, help="timm model name (e.g. regnety_160) or a saved model file")
    g.add_argument("--teacher-weights", default=S, help="'timm' (hub) or a local checkpoint for --teacher")
    g.add_argument("--distillation", choices=["none", "hard", "soft"], default=S)
    g.add_argument("--distillation-alpha", type=float, default=S)
    g.add_argument("--distillation-tau", type=float, default=S)

    p = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned checkpoint (best.pth) or a dense timm model")
    p.add_argument("--config")
    p.add_argument("--checkpoint", default=S, help="best.pth / checkpoint.pth of a fine-tune run")
    p.add_argument("--model", default=S, help="dense timm model (with --pretrained) instead of --checkpoint")
    p.add_argument("--pretrained", default=S)
    p.add_argument("--data", default=S)
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--device", default=S)
    p.add_argument("--input-size", type=int, default=S)
    p.add_argument("--num-workers", type=int, default=S)

    p = sub.add_parser("deploy", help="export the fine-tuned model for inference")
    p.add_argument("--checkpoint", required=True,
                   help="best.pth of a fine-tune run, or an original SPViT fine-tune checkpoint (with --model)")
    p.add_argument("--model", default=None, help="timm model an original SPViT checkpoint was trained from")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip torch.export")

    p = sub.add_parser("bench", help="inference throughput of a fine-tuned checkpoint vs its dense model")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=20)
    return ap


# ----------------------------------------------------------------------------------------------------------------


def find_config(path: str) -> str:
    if os.path.isfile(path):
        return path
    for d in CONFIG_DIRS:
        for cand in (os.path.join(d, path), os.path.join(d, path + ".yaml")):
            if os.path.isfile(cand):
                return cand
    raise ConfigError(f"config file not found: {path}")


def resolve_config(defaults: Dict, args: argparse.Namespace) -> Dict:
    """defaults < YAML (--config) < flags. Unknown YAML keys are an error."""
    import yaml

    cfg = dict(defaults)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if getattr(args, "config", None):
        path = find_config(args.config)
        try:
            with open(path) as f:
                y = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(y, dict):
            raise ConfigError(f"{path} must hold a mapping of settings")
        unknown = sorted(set(y) - set(defaults))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        cfg.update(y)
        cfg["config_file"] = path
    cfg.update(given)
    return cfg


def cmd_search(args) -> int:
    from . import search

    res = search.run(resolve_config(search.DEFAULTS, args))
    _finish(res)
    if res["dist"].main:
        print(f"architecture: {res['arch']} ({res['gflops']:.4g} of {res['dense_gflops']:.4g} GFLOPs, "
              f"val acc {res['val_acc1']:.2f})" if res["val_acc1"] is not None else f"architecture: {res['arch']}")
    return 0


def cmd_finetune(args) -> int:
    from . import finetune

    res = finetune.run(resolve_config(finetune.DEFAULTS, args))
    _finish(res)
    if res["dist"].main:
        print(f"fine-tuned: {res['gflops']:.4g} GFLOPs, best val acc {res['best_acc1']:.2f}; "
              f"weights in {os.path.join(res['out'], 'best.pth')}")
    return 0


def _finish(res) -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def cmd_demo(args) -> int:
    from . import demo

    cfg = resolve_config(demo.DEFAULTS, args)
    demo.run(cfg)
    return 0


def load_finetuned(path: str):
    """Rebuild a fine-tuned pruned model from a ``best.pth`` / ``checkpoint.pth`` of a fine-tune run."""
    import torch

    from . import demo  # noqa: F401  (registers the demo model with timm)
    from . import engine as E
    from .arch import Architecture
    from .finetune import build_pruned

    if not os.path.isfile(path):
        raise E.RunError(f"checkpoint not found: {path}")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or "arch" not in ck or "model" not in ck:
        raise E.RunError(f"{path} is not a checkpoint of `spvit finetune` (no architecture inside)")
    arch = Architecture.from_dict(ck["arch"])
    model = build_pruned(arch, ck["model_name"], ck["num_classes"], None, 0.0, ck.get("model_kwargs"), "none")
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def cmd_eval(args) -> int:
    from . import engine as E
    from .search import COMMON_DEFAULTS, data_config
    from .data import build_datasets, build_loaders

    defaults = {**COMMON_DEFAULTS, "checkpoint": None, "batch_size": 100}
    cfg = resolve_config(defaults, args)
    if cfg.get("data") is None:
        raise E.RunError("--data is required")
    dist = E.init_distributed(cfg["device"])
    import spvit

    if cfg.get("checkpoint"):
        model, _ = load_finetuned(cfg["checkpoint"])
        size = model.architecture.signature.img_size[0]
        cfg["digits_size"] = cfg["input_size"] = size  # the model's own input size
    else:
        model = None
    _, val = build_datasets(cfg["data"], data_config(cfg), cfg.get("digits_size", 16), need_train=False)
    _, _, loader = build_loaders(None, val, cfg["batch_size"], dist.world, dist.rank, num_workers=cfg["num_workers"],
                                 eval_batch_size=cfg["batch_size"])
    if model is None:
        model = E.build_timm_model(cfg["model"], val.num_classes, cfg["pretrained"], 0.0, cfg.get("model_kwargs"))
    model.to(dist.device)
    r = E.evaluate(model, loader, dist, E.amp_dtype(cfg["amp"], dist.device))
    if dist.main:
        print(json.dumps({"acc1": r["acc1"], "acc5": r["acc5"], "loss": r["loss"], "gflops": spvit.gflops(model),
                          "params": spvit.count_params(model), "images": len(val)}))
    return 0


def cmd_deploy(args) -> int:
    import torch

    from . import demo  # noqa: F401  (registers the demo model with timm)
    from . import engine as E
    from .deploy import deploy_checkpoint

    if os.path.isdir(args.out) and any(os.scandir(args.out)) and not args.overwrite:
        raise E.RunError(f"{args.out} exists and is not empty; pass --overwrite")
    os.makedirs(args.out, exist_ok=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    path = os.path.join(args.out, "deployed.pth")
    deployed = deploy_checkpoint(args.checkpoint, out=path, model=args.model, dtype=dtype)
    E.write_json(deployed.architecture.to_dict(), os.path.join(args.out, "arch.json"))
    print(f"deployed (BN folded, FFNs compacted, fused kernels): {path}  "
          f"[{' '.join(deployed.architecture.attn_choices)}]  load with spvit.load_deployed()")
    if args.export:
        sig = deployed.architecture.signature
        example = torch.randn(1, sig.in_chans, *sig.img_size, dtype=dtype)
        try:
            ep = torch.export.export(deployed, (example,))
            torch.export.save(ep, os.path.join(args.out, "model.pt2"))
            print(f"torch.export program: {os.path.join(args.out, 'model.pt2')}")
        except Exception as exc:  # report, keep the saved model
            print(f"note: torch.export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  f"{path} still loads with spvit.load_deployed")
    print(f"deployed model in {args.out}")
    return 0


def cmd_bench(args) -> int:
    import time

    import torch

    from . import engine as E

    model, ck = load_finetuned(args.checkpoint)
    dist = E.init_distributed(args.device)
    import spvit

    dense = E.build_timm_model(ck["model_name"], ck["num_classes"], None, 0.0, ck.get("model_kwargs")).eval()
    sig = model.architecture.signature
    x = torch.randn(args.batch_size, sig.in_chans, *sig.img_size, device=dist.device)
    rows = []
    for name, m in (("dense", dense), ("pruned", model)):
        m.to(dist.device)
        with torch.no_grad():
            for _ in range(3):
                m(x)
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                m(x)
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.iters
        rows.append({"model": name, "gflops": spvit.gflops(m), "ms_per_batch": 1e3 * dt,
                     "img_s": args.batch_size / dt})
    for r in rows:
        print(f"{r['model']:>7s}: {r['gflops']:.4g} GFLOPs  {r['ms_per_batch']:.2f} ms/batch  {r['img_s']:.0f} img/s")
    print("(eager PyTorch; kernel benchmarks: bench/ in the repository)")
    return 0


COMMANDS = {"demo": cmd_demo, "search": cmd_search, "finetune": cmd_finetune, "eval": cmd_eval, "deploy": cmd_deploy,
            "bench": cmd_bench}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``spvit``; returns the exit code (2 on bad input)."""
    from . import engine as E
    from .data import DataError
    from .models import UnsupportedModelError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DataError, E.RunError, ConfigError, UnsupportedModelError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("SPVIT_DEBUG") == "1":
            raise
        print(f"spvit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("spvit: interrupted; continue the run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
