"""``python -m spvit`` = the ``spvit`` command."""
import sys

from .cli import main

sys.exit(main())
