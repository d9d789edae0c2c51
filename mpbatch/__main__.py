"""python -m mpbatch: the mpbatch command (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
