"""Open Inference Protocol tensors <-> numpy: raw contents (``raw_input_contents`` /
``raw_output_contents``) and typed contents, including BYTES tensors (each element preceded by its
length as a 4-byte little-endian integer). Used by the reward service's OIP front and by the
trainer's OIP reward client. Errors are codec ``WireError``s naming the tensor.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Sequence

import numpy as np

from epgrpo.protos.codec import WireError

# OIP datatype -> numpy dtype (little-endian, as the protocol's raw form)
NUMPY_DTYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype(np.int8), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
# The typed-contents field holding each datatype (FP16 has none: raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def encode_bytes(items: Sequence[bytes | str]) -> bytes:
    """The raw form of a BYTES tensor."""
    out = bytearray()
    for item in items:
        data = item.encode() if isinstance(item, str) else bytes(item)
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def decode_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """Splits the raw form of a BYTES tensor of ``count`` elements."""
    items, offset = [], 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise WireError(name, f"BYTES tensor ends inside the length of element {i} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise WireError(name, f"BYTES element {i} claims {length} bytes, only {len(raw) - offset} remain")
        items.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw):
        raise WireError(name, f"{len(raw) - offset} bytes left after the {count} BYTES elements of the shape")
    return items


def decode_tensor(name: str, datatype: str, shape: Sequence[int], raw: bytes | None, contents=None):
    """A numpy array (or, for BYTES, a list of bytes in row-major order) from raw bytes when given,
    else from typed ``contents``. Checks sizes against the shape."""
    if any(d < 0 for d in shape):
        raise WireError(f"{name}.shape", f"dimensions must be >= 0, got {list(shape)}")
    count = math.prod(shape)
    if datatype == "BYTES":
        if raw is not None:
            return decode_bytes(raw, count, name)
        items = list(contents.bytes_contents) if contents is not None else []
        if len(items) != count:
            raise WireError(f"{name}.contents", f"expected {count} BYTES elements for shape {list(shape)}, got {len(items)}")
        return items
    if datatype not in NUMPY_DTYPES:
        raise WireError(f"{name}.datatype", f"unknown datatype {datatype!r}")
    dtype = NUMPY_DTYPES[datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise WireError(name, f"expected {count * dtype.itemsize} raw bytes for {datatype} {list(shape)}, got {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))
    values = getattr(contents, CONTENTS_FIELDS.get(datatype, ""), []) if contents is not None else []
    if len(values) != count:
        raise WireError(f"{name}.contents", f"expected {count} {datatype} values for shape {list(shape)}, got {len(values)}")
    return _typed(values, dtype, datatype, name).reshape(tuple(shape))


def _typed(values, dtype: np.dtype, datatype: str, name: str) -> np.ndarray:
    """Typed contents as ``dtype``, read without an intermediate list; integers outside the
    datatype's range are refused (``uint_contents`` holds UINT8 values as uint32: 256 is no pixel)."""
    if not len(values):
        return np.zeros(0, dtype)
    if dtype.kind in "iu":
        wide = _chunked(values, np.uint64 if datatype == "UINT64" else np.int64)
        info = np.iinfo(dtype)
        low, high = wide.min(), wide.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise WireError(f"{name}.contents", f"{datatype} values lie in [{info.min}, {info.max}], got {int(bad)}")
        return wide.astype(dtype)
    return _chunked(values, np.bool_ if dtype.kind == "b" else np.float64).astype(dtype)


def _chunked(values, dtype, chunk: int = 1 << 15) -> np.ndarray:
    """``values`` (a repeated field) as an array, converted a chunk at a time with the GIL released
    in between: one C loop over millions of values would keep every other thread (a server's event
    loop) waiting for seconds."""
    out = np.empty(len(values), dtype)
    for start in range(0, len(values), chunk):
        out[start:start + chunk] = values[start:start + chunk]
        time.sleep(0)
    return out
