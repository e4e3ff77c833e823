"""The ``spvit`` command line: every sub-command's flags (a flag left out takes the config's value, so that
``--config`` and ``--resume`` can supply it) and the one-line error format of bad flags (exit code 2)."""
from __future__ import annotations

import argparse
import json
from typing import Dict

from ._version import __version__
from .options import DEVICE_HELP, FORMATS, QUICK_FRACTION, STAGES

EXIT_BAD_INPUT = 2
EXIT_IO = 1
S = argparse.SUPPRESS


def _json(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {s!r} ({exc})")


def _json_dict(s: str) -> Dict:
    v = _json(s)
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"img_size\": 32}}', got {s!r}")
    return v


def _optional_float(s: str):
    return None if s.lower() in ("none", "null", "") else float(s)


class Parser(argparse.ArgumentParser):
    """argparse with the package's one-line error format (exit code 2)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"spvit: error: {message} (see `{self.prog} --help`)\n")


def _add_run(g, demo: bool = False) -> None:
    g.add_argument("--out", default=S, help="run folder: created if new; an existing one is only continued "
                   "(--resume) or replaced (--overwrite)" + (" (default ./spvit_demo)" if demo else ""))
    g.add_argument("--overwrite", action="store_true", default=S,
                   help="replace the run in --out: removes only the files spvit wrote there, and only in a folder "
                        "spvit created (never ., $HOME or /)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config read first; flags override it (see configs/)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help="timm model name, e.g. deit_small_patch16_224 or "
                   "swin_tiny_patch4_window7_224")
    g.add_argument("--model-kwargs", type=_json_dict, default=S, help="JSON object of extra timm.create_model kwargs")
    g.add_argument("--pretrained", default=S, help="'timm' (hub, needs network or the hub cache), 'none', or a local "
                   "checkpoint path")
    g.add_argument("--drop-path", type=float, default=S, help="stochastic depth rate, in [0, 1)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=S, help="ImageNet-layout folder (train/, val/ of class folders) or 'digits'")
    g.add_argument("--num-classes", type=int, default=S, help="must match the dataset (default: from the data)")
    g.add_argument("--input-size", type=int, default=S, help="image side in pixels; the model is built for it "
                   "(default: the model's own size; fine-tune: the architecture's)")
    g.add_argument("--aa", default=S, help="RandAugment policy ('none' to disable)")
    g.add_argument("--reprob", type=float, default=S, help="random erasing probability, in [0, 1]")
    g.add_argument("--mixup", type=float, default=S, help="Mixup alpha (0 disables)")
    g.add_argument("--cutmix", type=float, default=S, help="CutMix alpha (0 disables)")
    g.add_argument("--smoothing", type=float, default=S, help="label smoothing, in [0, 1)")
    g.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false", default=S,
                   help="plain shuffling instead of repeated augmentation")
    g.add_argument("--num-workers", type=int, default=S, help="data loader processes per rank")
    g = p.add_argument_group("run")
    _add_run(g)
    g.add_argument("--resume", action="store_true", default=S,
                   help="continue the run in --out from its checkpoint and saved config (no other flag needed)")
    g.add_argument("--allow-changes", action="store_true", default=S,
                   help="with --resume: accept settings that differ from the saved config (saved anew)")
    g.add_argument("--stop-after-epoch", type=int, default=S, help="end after this epoch (resume later)")
    g.add_argument("--device", default=S, help=DEVICE_HELP + "; one process per GPU under torchrun")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default=S,
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--seed", type=int, default=S, help="random seed (each rank adds its rank)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=S, help="per process")
    g.add_argument("--epochs", type=int, default=S, help="epochs to run (>= 1)")
    g.add_argument("--sched-epochs", type=int, default=S,
                   help="cosine schedule length (search default 300, as the original; fine-tune: --epochs)")
    g.add_argument("--lr", type=float, default=S, help="scaled by global batch / 512 unless --no-scale-lr")
    g.add_argument("--no-scale-lr", dest="scale_lr", action="store_false", default=S,
                   help="use --lr as given (no batch scaling)")
    g.add_argument("--scale-all-lrs", action="store_true", default=S,
                   help="also scale --min-lr, the warm-up lr and the architecture lrs by global batch / 512 (the "
                        "Swin recipe)")
    g.add_argument("--sched-per-step", action="store_true", default=S,
                   help="update the cosine schedules every iteration instead of every epoch (the Swin recipe)")
    g.add_argument("--min-lr", type=float, default=S, help="floor of the cosine schedule (capped at the scaled lr)")
    g.add_argument("--warmup-epochs", type=int, default=S, help="linear warm-up epochs")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (>= 0)")
    g.add_argument("--clip-grad", type=_optional_float, default=S, help="gradient norm clip ('none': off)")
    g.add_argument("--model-ema", action="store_true", default=S, help="keep an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, default=S, help="EMA decay, in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="spvit", description="SPViT: prune ViT self-attentions into convolutions.")
    ap.add_argument("--version", action="version", version=f"spvit {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole method on the embedded digits set, in minutes on a laptop CPU")
    p.add_argument("--config", help="YAML file of demo settings")
    _add_run(p, demo=True)
    p.add_argument("--device", default=S, help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=S, help="random seed (the results file has seeds 0, 1, 2)")
    p.add_argument("--threads", type=int, default=S,
                   help="torch CPU threads (default 1: the published table; more threads may change the results "
                        "slightly)")
    p.add_argument("--teacher-epochs", type=int, default=S, help="epochs of the dense teacher")
    p.add_argument("--search-epochs", type=int, default=S, help="epochs of the search")
    p.add_argument("--finetune-epochs", type=int, default=S, help="epochs of the fine-tune")
    p.add_argument("--target-fraction", type=float, default=S,
                   help="FLOPs target as a fraction of the teacher's, in (0, 1]")
    p.add_argument("--distillation", choices=["none", "hard", "soft"], default=S,
                   help="distillation from the teacher during the fine-tune")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    p.add_argument("--resume", action="store_true", default=S,
                   help="continue the demo in --out from the stage it stopped in (no other flag needed)")

    _add_compress(sub)

    p = sub.add_parser("search", help="SPViT search: supernet + FLOPs loss, writes arch.json")
    _add_common(p)
    g = p.add_argument_group("search")
    g.add_argument("--target-gflops", type=float, default=S, help="FLOPs target T in GFLOPs (MACs / 1e9)")
    g.add_argument("--loss-lambda", type=float, default=S, help="weight of the FLOPs loss lambda (T - F)^2")
    g.add_argument("--arc-lr", type=float, default=S,
                   help="learning rate of the gate logits (not scaled, unless --scale-all-lrs)")
    g.add_argument("--arc-min-lr", type=float, default=S, help="floor of the gate logits' schedule "
                   "(default: --min-lr, as the original)")
    g.add_argument("--theta", type=float, default=S, help="initial gate logit")
    g.add_argument("--arc-sched-epochs", type=int, default=S,
                   help="cosine length of the gate logits' schedule (default: the lr's; Swin configs: 150)")
    g.add_argument("--alpha", type=float, default=S,
                   help="head-mixing temperature (> 0; default the family's: 0.01 DeiT, 100 Swin)")
    g = p.add_argument_group("hardware-aware search (a latency table from `spvit profile`)")
    g.add_argument("--latency-table", default=S, help="latency table JSON: the complexity term becomes the predicted "
                   "latency on the profiled device (--target-gflops is then unused)")
    g.add_argument("--target-speedup", type=float, default=S, help="latency target = predicted dense latency / S")
    g.add_argument("--target-latency-ms", type=float, default=S, help="absolute latency target (ms per batch of the "
                   "table's batch size)")
    g.add_argument("--ffn-align", type=int, default=S, help="read out a multiple of N units per FFN (by gate-logit "
                   "order; 0: off)")

    p = sub.add_parser("finetune", help="fine-tune the pruned model of an arch.json (optionally distilled)")
    _add_common(p)
    g = p.add_argument_group("fine-tune")
    g.add_argument("--arch", default=S, help="arch.json from `spvit search`")
    g.add_argument("--init", default=S, help="'pretrained' (dense weights, the original), 'none', or a search "
                   "checkpoint path (carries the searched weights)")
    g.add_argument("--teacher", default=S, help="timm model name (e.g. regnety_160) or a best.pth of a run")
    g.add_argument("--teacher-weights", default=S, help="'timm' (hub) or a local checkpoint for --teacher")
    g.add_argument("--teacher-file-runs-code", action="store_true", default=S,
                   help="allow --teacher to be a whole pickled model: loading it RUNS CODE from the file; only for "
                        "files you trust")
    g.add_argument("--distillation", choices=["none", "hard", "soft"], default=S, help="DeiT distillation kind")
    g.add_argument("--distillation-alpha", type=float, default=S, help="weight of the distillation term, in [0, 1]")
    g.add_argument("--distillation-tau", type=float, default=S, help="temperature of soft distillation (> 0)")

    p = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned checkpoint (best.pth) or a dense timm model")
    p.add_argument("--config", help="YAML file of eval settings")
    p.add_argument("--checkpoint", default=S, help="best.pth / checkpoint.pth of a fine-tune run")
    p.add_argument("--model", default=S, help="dense timm model (with --pretrained) instead of --checkpoint")
    p.add_argument("--model-kwargs", type=_json_dict, default=S, help="JSON object of extra timm kwargs (--model)")
    p.add_argument("--pretrained", default=S, help="weights of --model: 'timm', 'none' or a local file")
    p.add_argument("--data", default=S, help="ImageNet-layout folder (its val/) or 'digits' (its test split)")
    p.add_argument("--batch-size", type=int, default=S, help="images per batch")
    p.add_argument("--device", default=S, help=DEVICE_HELP)
    p.add_argument("--input-size", type=int, default=S, help="image side (default: the model's)")
    p.add_argument("--num-workers", type=int, default=S, help="data loader processes")

    p = sub.add_parser("deploy", help="export the fine-tuned model for inference")
    p.add_argument("--checkpoint", required=True,
                   help="best.pth of a fine-tune run, or an original SPViT fine-tune checkpoint (with --model)")
    p.add_argument("--model", default=None, help="timm model an original SPViT checkpoint was trained from")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and compute dtype")
    p.add_argument("--out", required=True, help="output folder (new or empty, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace deployed.pth / arch.json / model.pt2 / model.onnx in --out")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip torch.export")
    p.add_argument("--format", choices=FORMATS, default="torch",
                   help="torch: deployed.pth (+ torch.export program); onnx: also model.onnx (standard ONNX "
                        "operators, dynamic batch, for onnxruntime)")

    p = sub.add_parser("bench", help="inference time of a fine-tuned checkpoint vs its dense model (eager PyTorch)")
    p.add_argument("--checkpoint", required=True, help="best.pth / checkpoint.pth of a fine-tune run")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (>= 1; default 64, or the latency "
                   "table's)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--iters", type=int, default=20, help="timed batches per model (>= 1)")
    p.add_argument("--latency-table", default=None, help="latency table (`spvit profile`): print predicted vs measured "
                   "latency of the deployed model and its dense model on the table's device, dtype and batch")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="with --latency-table: the dtype to run (default and only accepted value: the table's)")
    p.add_argument("--keep-malloc", dest="steady_malloc", action="store_false",
                   help="with --latency-table on CPU: leave the C allocator's thresholds as they are (by default they "
                        "are fixed as `spvit profile` does, see spvit.latency.set_steady_malloc)")

    p = sub.add_parser("profile", help="latency table of a model's deployed pieces on this device (for the "
                       "hardware-aware search)")
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_small_patch16_224")
    p.add_argument("--model-kwargs", type=_json_dict, default={}, help="JSON object of extra timm.create_model kwargs")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and compute dtype")
    p.add_argument("--batch", type=int, default=1, help="images per batch (>= 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while measuring (default: torch's)")
    p.add_argument("--ffn-step", type=int, default=None, help="FFN width grid step (default 64 for FFNs of >= 1024 "
                   "units, else width/16)")
    p.add_argument("--min-reps", type=int, default=5, help="timed calls per piece, at least (>= 1)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per piece: repeat until spent (adaptive)")
    p.add_argument("--context", type=int, default=4, help="time each block piece inside a run of this many blocks, "
                   "as in the model (0: each piece alone, from warm caches)")
    p.add_argument("--rounds", type=int, default=1, help="passes over all pieces; the median over passes is kept "
                   "(spreads the disturbance of a loaded machine over every piece)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic of the repeats (min: least disturbed on a loaded machine)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: latency (default); cpu: process CPU time with --threads 1 (the latency on an idle core, "
                        "for a CPU shared with other work)")
    p.add_argument("--keep-malloc", dest="steady_malloc", action="store_false",
                   help="on CPU: leave the C allocator's thresholds as they are (by default glibc's mmap and trim "
                        "thresholds are fixed so that page faults do not depend on what ran before; recorded)")
    p.add_argument("--out", required=True, help="the table's JSON file (never replaced without --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


def _add_compress(sub) -> None:
    """The ``spvit compress`` sub-command's flags (every one defaults to the config's value)."""
    p = sub.add_parser("compress", help="one command from a timm model and a dataset to a deployed model measured on "
                       "the device: profile, search, fine-tune with distillation, deploy, measure, report",
                       description="Stages: [teacher] -> profile (latency / speedup target) -> search -> fine-tune "
                       "with distillation from the dense model -> deploy -> measure -> report (report.md, "
                       "summary.json, report.png). Each stage writes the files of its own command in a sub-folder of "
                       "--out; `spvit compress --out DIR --resume` continues the stage that was running.")
    p.add_argument("--config", help="YAML of compress settings (flat keys named like the flags; 'train', 'teacher', "
                   "'search', 'finetune': mappings of stage settings that override the recipe)")
    g = p.add_argument_group("what")
    g.add_argument("--model", default=S, help="timm model name, or the best.pth of an spvit run (a dense model)")
    g.add_argument("--model-kwargs", type=_json_dict, default=S, help="JSON object of extra timm.create_model kwargs")
    g.add_argument("--pretrained", default=S, help="weights of a timm name: 'timm' (default, the hub), 'none' or a "
                   "local file")
    g.add_argument("--data", default=S, help="ImageNet-layout folder (train/, val/ of class folders) or 'digits'")
    g.add_argument("--num-classes", type=int, default=S, help="must match the dataset (default: from the data)")
    g = p.add_argument_group("target (exactly one)")
    g.add_argument("--target-speedup", type=float, default=S, help="measured-latency speedup S over the dense model "
                   "on --device (a latency table is profiled first)")
    g.add_argument("--target-latency-ms", type=float, default=S, help="latency in ms per batch of --batch")
    g.add_argument("--target-gflops", type=float, default=S, help="FLOPs target in GFLOPs (no profiling)")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=S, help="auto (default: CUDA when visible, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--batch", type=int, default=S, help="batch size the latency is profiled and measured at "
                   "(default 1)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=S, help="deployed dtype (default fp32)")
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads for the whole run")
    g.add_argument("--latency-table", default=S, help="a table from `spvit profile` instead of profiling")
    g.add_argument("--ffn-align", type=int, default=S, help="read out FFN widths that are multiples of N (default: "
                   "the latency table's width step on the device; 0: off)")
    g.add_argument("--profile-budget", type=float, default=S, help="seconds of timing per piece of the latency "
                   "table (default 0.3)")
    g.add_argument("--measure-rounds", type=int, default=S, help="alternated timing rounds of the dense and the "
                   "compressed model (default 7: median speedup and its spread)")
    g = p.add_argument_group("training")
    g.add_argument("--recipe", choices=["paper", "quick", "none"], default=S,
                   help=f"paper: the original configuration of the model family (configs/); quick (default): the "
                        f"same with {QUICK_FRACTION:g} of its epochs, for a first look; none: the package defaults")
    g.add_argument("--teacher-epochs", type=int, default=S, help="train the dense model this many epochs first (a "
                   "model without pre-trained weights); it is then the teacher")
    g.add_argument("--distillation", choices=["none", "hard", "soft"], default=S,
                   help="distillation from the dense model in the fine-tune (default hard)")
    g.add_argument("--seed", type=int, default=S, help="random seed")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=S, help="run folder: created if new; an existing one is only continued "
                   "(--resume) or replaced (--overwrite)")
    g.add_argument("--overwrite", action="store_true", default=S, help="replace the run in --out (removes only "
                   "the files spvit wrote there)")
    g.add_argument("--resume", action="store_true", default=S, help="continue the run in --out from the stage "
                   "that was running (no other flag needed)")
    g.add_argument("--allow-changes", action="store_true", default=S, help="with --resume: accept changed settings")
    g.add_argument("--stop-after", choices=list(STAGES), default=S, help="end after this stage (--resume later)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
