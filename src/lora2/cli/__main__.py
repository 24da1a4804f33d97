"""`python -m lora2.cli` runs the command line (used by `lora2 bench` subprocesses)."""

import sys

from lora2.cli import main

sys.exit(main())
