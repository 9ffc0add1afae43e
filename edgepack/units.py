"""Sizes written the way people write them (``256k``, ``2M``, ``262144``), for flags and config files."""

from __future__ import annotations

import re

from edgepack.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?\s*$")


def parse_size(text: str, what: str) -> int:
    """``262144``, ``256k``, ``256KiB``, ``2M`` → bytes (k = 1024); ``what`` names the setting in errors."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size like 262144, 256k or 2M")
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * factor)
