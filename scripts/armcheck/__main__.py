"""``python -m armcheck`` (with scripts/ on sys.path): the same as ``scripts/arm-check``."""

import sys

from armcheck.cli import main

sys.exit(main())
