"""KServe v2 tensor datatypes and how they map to numpy and to the manifest's dtype names.

The Open Inference Protocol names element types ``BOOL``, ``UINT8`` … ``FP64`` and ``BYTES``; the
manifest (:class:`edgepack.manifest.TensorSpec`) names them as numpy does (``"float32"``, ``"string"``).
Binary tensor data is little-endian, so the numpy dtypes here are explicitly little-endian.

``BF16`` is listed so that model metadata can name it, but numpy has no bfloat16, so tensors of that type
are refused with a message rather than decoded into something a runtime would misread.
"""

from __future__ import annotations

import numpy as np

from edgepack.errors import BadRequestError, RuntimeBackendError

__all__ = [
    "BYTES",
    "datatype_of",
    "kserve_datatype",
    "metadata_shape",
    "numpy_dtype",
]

BYTES = "BYTES"

_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    BYTES: np.dtype(object),
}

_FROM_MANIFEST: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
    "string": BYTES,
}

# numpy kind + itemsize -> KServe datatype, for arrays a model returns
_FROM_NUMPY: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): name for name, dt in _NUMPY.items() if name != BYTES}


def kserve_datatype(manifest_dtype: str) -> str:
    """The KServe datatype of a manifest dtype name (``"float32"`` -> ``"FP32"``)."""
    try:
        return _FROM_MANIFEST[manifest_dtype]
    except KeyError:
        raise RuntimeBackendError(f"the manifest dtype {manifest_dtype!r} has no KServe datatype") from None


def numpy_dtype(datatype: str, *, tensor: str) -> np.dtype:
    """The numpy dtype for KServe ``datatype``; BadRequestError names ``tensor`` when there is none."""
    try:
        return _NUMPY[datatype]
    except KeyError:
        if datatype == "BF16":
            raise BadRequestError(f"input '{tensor}': datatype BF16 is not supported by this server") from None
        known = ", ".join(_NUMPY)
        raise BadRequestError(f"input '{tensor}': unknown datatype {datatype!r}; expected one of {known}") from None


def datatype_of(array: np.ndarray, *, tensor: str) -> str:
    """The KServe datatype to answer for an array a model returned."""
    kind = array.dtype.kind
    if kind in "OSU":
        return BYTES
    try:
        return _FROM_NUMPY[(kind, array.dtype.itemsize)]
    except KeyError:
        raise RuntimeBackendError(
            f"output '{tensor}': the model returned dtype {array.dtype}, which KServe v2 cannot carry"
        ) from None


def metadata_shape(shape: list[int | str]) -> list[int]:
    """A manifest shape as KServe metadata writes it: -1 for every dynamic dimension."""
    return [dim if isinstance(dim, int) else -1 for dim in shape]
