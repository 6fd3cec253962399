"""Tensor <-> wire conversion: raw little-endian bytes + dtype + shape (row-major, no padding).

Decoding validates everything a peer could get wrong and raises :class:`WireError` naming the
field and what was expected, so servicers can answer INVALID_ARGUMENT with a useful message.
bfloat16 has no numpy dtype, so bf16 tensors decode through torch (bit-exact).
"""

from __future__ import annotations

import math
import sys
from typing import Iterable

import numpy as np

from epgrpo.protos.v1 import tensor_pb2

# wire name -> (numpy dtype or None for bf16, itemsize)
_DTYPES: dict[str, tuple[np.dtype | None, int]] = {
    "bool": (np.dtype(np.bool_), 1),
    "uint8": (np.dtype(np.uint8), 1),
    "int8": (np.dtype(np.int8), 1),
    "int16": (np.dtype("<i2"), 2),
    "int32": (np.dtype("<i4"), 4),
    "int64": (np.dtype("<i8"), 8),
    "float16": (np.dtype("<f2"), 2),
    "bfloat16": (None, 2),
    "float32": (np.dtype("<f4"), 4),
    "float64": (np.dtype("<f8"), 8),
}
WIRE_DTYPES = tuple(_DTYPES)
_BIG_ENDIAN = sys.byteorder == "big"


class WireError(ValueError):
    """A message field that does not hold what the contract says. ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _numpy_wire_name(dtype: np.dtype) -> str:
    for name, (np_dtype, _) in _DTYPES.items():
        if np_dtype is not None and np_dtype == dtype.newbyteorder("<"):
            return name
    raise WireError("dtype", f"numpy dtype {dtype} cannot be sent; supported: {', '.join(WIRE_DTYPES)}")


def encode(value) -> tensor_pb2.Tensor:
    """Encodes a numpy array or a torch tensor (any device) into a wire ``Tensor``."""
    if type(value).__module__.startswith("torch"):
        return _encode_torch(value)
    array = np.asarray(value)
    name = _numpy_wire_name(array.dtype)
    array = np.asarray(array, dtype=_DTYPES[name][0], order="C")  # keeps 0-d arrays 0-d
    return tensor_pb2.Tensor(dtype=name, shape=list(array.shape), data=array.tobytes())


def _encode_torch(tensor) -> tensor_pb2.Tensor:
    import torch

    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        # Reinterpret the bits; numpy has no bf16, but int16 carries the same 2 bytes.
        data = tensor.view(torch.int16).numpy()
        data = data.astype("<i2", copy=False) if _BIG_ENDIAN else data
        return tensor_pb2.Tensor(dtype="bfloat16", shape=list(tensor.shape), data=data.tobytes())
    return encode(tensor.numpy())


def _check(msg: tensor_pb2.Tensor, field: str, dtypes: Iterable[str] | None, ndim: int | None) -> int:
    if msg.dtype not in _DTYPES:
        raise WireError(f"{field}.dtype", f"unknown dtype {msg.dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if msg.dtype not in dtypes:
            raise WireError(f"{field}.dtype", f"expected {' or '.join(dtypes)}, got {msg.dtype}")
    shape = list(msg.shape)
    if ndim is not None and len(shape) != ndim:
        raise WireError(f"{field}.shape", f"expected {ndim} dimensions, got {len(shape)} ({shape})")
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape", f"dimensions must be >= 0, got {shape}")
    itemsize = _DTYPES[msg.dtype][1]
    expected = math.prod(shape) * itemsize
    if len(msg.data) != expected:
        raise WireError(
            f"{field}.data",
            f"expected {expected} bytes for shape {shape} of {msg.dtype}, got {len(msg.data)}",
        )
    return itemsize


def to_numpy(msg: tensor_pb2.Tensor, field: str = "tensor", *, dtypes=None, ndim=None) -> np.ndarray:
    """Decodes into a (read-only view, native byte order) numpy array; bf16 is upcast to float32."""
    _check(msg, field, dtypes, ndim)
    if msg.dtype == "bfloat16":
        return to_torch(msg, field).float().numpy()
    array = np.frombuffer(msg.data, dtype=_DTYPES[msg.dtype][0]).reshape(tuple(msg.shape))
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def to_torch(msg: tensor_pb2.Tensor, field: str = "tensor", *, dtypes=None, ndim=None):
    """Decodes into a CPU torch tensor, bit-exact for every dtype including bfloat16."""
    import torch

    _check(msg, field, dtypes, ndim)
    shape = tuple(msg.shape)
    if msg.dtype == "bfloat16":
        raw = np.frombuffer(msg.data, dtype="<i2").astype(np.int16, copy=True)
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
    array = np.frombuffer(msg.data, dtype=_DTYPES[msg.dtype][0]).astype(_DTYPES[msg.dtype][0].newbyteorder("="))
    return torch.from_numpy(array.copy()).reshape(shape)


def finite_or_raise(array: np.ndarray, field: str) -> None:
    """Raises WireError when a float array holds NaN or Inf."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise WireError(field, f"expected finite values, got {bad} NaN/Inf")


# Payload bytes per request that clients aim for: well under the channels' 64 MiB message limit
# (protos/channel.py), and small enough that several requests in flight overlap transfer and work.
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_MAX_REQUEST_ITEMS = 256


def batch_slices(count: int, bytes_per_item: int, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_items: int = DEFAULT_MAX_REQUEST_ITEMS) -> list[slice]:
    """Contiguous slices of a batch of ``count`` equal items, each of at most ``max_bytes`` payload
    (but at least one item) and ``max_items`` items: how every client splits images or latents."""
    if count <= 0:
        return []
    size = max(1, min(max_items, max_bytes // max(1, bytes_per_item)))
    return [slice(lo, min(lo + size, count)) for lo in range(0, count, size)]
