"""Option values shared by the command-line parser and the modules that check them.

Standard library only: ``spvit --version`` and ``spvit <command> --help`` build the parser from this module without
importing torch or timm.
"""

DEVICE_HELP = "auto (CUDA when visible, else CPU), cpu, cuda or cuda:N"
# `spvit compress`: its stages, in order (--stop-after names one)
STAGES = ("teacher", "profile", "search", "finetune", "deploy", "measure", "report")
QUICK_FRACTION = 0.05  # --recipe quick: this fraction of the paper recipe's epochs (at least 1 per stage)
# `spvit deploy --format`: torch (deployed.pth and a torch.export program) or onnx (also model.onnx)
FORMATS = ("torch", "onnx")

__all__ = ["DEVICE_HELP", "STAGES", "QUICK_FRACTION", "FORMATS"]
