"""The ``spvit`` script and ``python -m spvit``: ``--version`` and ``--help`` (of any command) are answered from the
parser alone, without importing torch or timm; every other command line runs :func:`spvit.cli.main`."""
from __future__ import annotations

import sys
from typing import List, Optional

from .cli_parser import build_parser

PARSER_ONLY = ("-h", "--help", "--version")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[:argv.index("--")] if "--" in argv else argv
    if not flags or any(a in PARSER_ONLY for a in flags):
        build_parser().parse_args(argv)  # prints the version, the help or the missing command, and exits
    # A command runs: its modules (torch, timm) are imported now, not before.
    from .cli import main as run_command
    return run_command(argv)
