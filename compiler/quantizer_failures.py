"""One boundary for the third-party quantizers: whatever they raise becomes a :class:`QuantizerError`.

onnxruntime's quantization tooling, NNCF and ai-edge-quantizer fail with many exception types (ValueError,
KeyError, RuntimeError, their own). The pipeline needs one to act on (``auto`` falls back to float), and the
user needs the tool, its version and its message; edgepack's own errors pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from edgepack.errors import EdgepackError, QuantizerError


@contextmanager
def quantizer_failures(tool: str, what: str = "int8") -> Iterator[None]:
    """Raise what the block raises as ``QuantizerError("<tool> cannot quantize this model to <what>: ...")``."""
    try:
        yield
    except EdgepackError:
        raise
    except Exception as exc:  # the boundary: every type the tools raise, named in the message
        raise QuantizerError(
            f"{tool} cannot quantize this model to {what}: {type(exc).__name__}: {exc}; compile with "
            "--precision fp32 (or fp16 where the target has it)"
        ) from exc
