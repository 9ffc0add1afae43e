"""``python -m firmware`` (scripts/ on sys.path) is ``scripts/build-image``."""

import sys

from firmware.cli import main

sys.exit(main())
