"""What the fuzz tests share: bounded, derandomized settings, the one allowed failure, counts by kind, strategies.

Zero crashes means: a parser given any input returns its result (or the documented None/False) or raises
an :class:`~edgepack.errors.EdgepackError` subclass, whose message a user can act on. Any other exception
(KeyError, RecursionError, UnicodeError, OverflowError, ...) escapes :func:`tolerate` and hypothesis
reports the smallest input that raised it.

``EDGEPACK_FUZZ_EXAMPLES`` scales every test's example count (default 1.0; CI keeps the default).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edgepack.errors import EdgepackError

T = TypeVar("T")

# inputs tried, by kind; tests/fuzz/conftest.py prints them at the end of the run
COUNTS: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()

SCALE = float(os.environ.get("EDGEPACK_FUZZ_EXAMPLES", "1.0"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,  # seeded from the test's name: every run tries the same inputs
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


def tolerate(kind: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call ``fn``; an EdgepackError is a clean refusal (None), anything else is a bug and propagates."""
    COUNTS[kind] += 1
    try:
        value = fn(*args, **kwargs)
    except EdgepackError as exc:
        OUTCOMES[f"{kind}: refused ({type(exc).__name__})"] += 1
        return None
    OUTCOMES[f"{kind}: accepted"] += 1
    return value


# --- strategies ------------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


@st.composite
def mutated_json(draw: st.DrawFn, template: dict[str, Any], interesting: dict[str, list[Any]] | None = None) -> Any:
    """``template`` with a few fields replaced, removed, added or nested oddly (valid-looking inputs reach
    deeper than random bytes do)."""
    value: Any = json.loads(json.dumps(template))
    for _ in range(draw(st.integers(0, 4))):
        path = _pick_path(draw, value)
        container, key = _resolve(value, path)
        action = draw(st.sampled_from(["replace", "delete", "add", "interesting"]))
        if container is None:
            value = draw(json_values)
            continue
        if action == "delete" and isinstance(container, dict) and key in container:
            del container[key]
        elif action == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "interesting" and interesting and isinstance(key, str) and key in interesting:
            container[key] = draw(st.sampled_from(interesting[key]))
        elif isinstance(container, dict | list):
            with contextlib.suppress(IndexError, TypeError):
                container[key] = draw(json_values)
    return value


def _pick_path(draw: st.DrawFn, value: Any) -> list[Any]:
    path: list[Any] = []
    node = value
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    return path


def _resolve(value: Any, path: list[Any]) -> tuple[Any, Any]:
    if not path:
        return None, None
    node = value
    for key in path[:-1]:
        node = node[key]
    return node, path[-1]


def encode_json(value: Any, *, canonical: bool) -> bytes:
    if canonical:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
    return json.dumps(value).encode("utf-8", "surrogatepass")


@st.composite
def mutated_bytes(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with bytes flipped, cut, inserted or spliced (structure-blind mutations)."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        if not data:
            data = bytearray(draw(st.binary(max_size=64)))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            other = draw(st.integers(0, len(data) - 1))
            n = draw(st.integers(1, 32))
            data[at : at + n] = data[other : other + n]
    return bytes(data)


def deep_nesting(depth: int, kind: str = "list") -> bytes:
    """JSON nested ``depth`` deep: what a hostile sender uses to exhaust a recursive parser."""
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth
