"""The contract: stubs are current, tensors round-trip bit-exactly, bad tensors are named."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epgrpo.protos import codec
from epgrpo.protos.generate import stale_files
from epgrpo.protos.v1 import tensor_pb2


def test_committed_stubs_match_the_proto_files():
    assert stale_files() == [], "run: python -m epgrpo.protos.generate"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8,
                                   torch.int8, torch.int16, torch.int32, torch.int64, torch.bool])
def test_torch_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 5, generator=g) * 100).to(dtype)
    y = codec.to_torch(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, y)


def test_bf16_special_values_survive():
    x = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, 3.0e38], dtype=torch.bfloat16)
    y = codec.to_torch(codec.encode(x))
    assert torch.equal(x.view(torch.int16), y.view(torch.int16))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=4), st.sampled_from(["uint8", "float32", "int64", "float16"]))
def test_numpy_round_trip_any_shape(shape, dtype):
    a = (np.arange(int(np.prod(shape)), dtype=np.float64) % 250).astype(dtype).reshape(shape)
    b = codec.to_numpy(codec.encode(a))
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_wire_layout_is_little_endian_row_major():
    msg = codec.encode(np.array([[1, 2], [3, 256]], dtype=np.int32))
    assert msg.data == np.array([1, 2, 3, 256], dtype="<i4").tobytes()
    assert list(msg.shape) == [2, 2] and msg.dtype == "int32"


@pytest.mark.parametrize(
    "msg, kwargs, fragment",
    [
        (tensor_pb2.Tensor(dtype="float8", shape=[1], data=b"\0"), {}, "images.dtype: unknown dtype"),
        (tensor_pb2.Tensor(dtype="uint8", shape=[2, 2], data=b"\0" * 3), {}, "images.data: expected 4 bytes"),
        (tensor_pb2.Tensor(dtype="uint8", shape=[-1, 2], data=b""), {}, "images.shape: dimensions must be >= 0"),
        (tensor_pb2.Tensor(dtype="uint8", shape=[4], data=b"\0" * 4), {"ndim": 4}, "images.shape: expected 4 dimensions"),
        (tensor_pb2.Tensor(dtype="float32", shape=[1], data=b"\0" * 4), {"dtypes": ("uint8",)}, "images.dtype: expected uint8"),
    ],
)
def test_bad_tensors_raise_wire_errors_naming_the_field(msg, kwargs, fragment):
    with pytest.raises(codec.WireError) as info:
        codec.to_numpy(msg, "images", **kwargs)
    assert fragment in str(info.value)
    assert info.value.field.startswith("images")


def test_non_finite_values_are_reported():
    with pytest.raises(codec.WireError, match="scores: expected finite values, got 2 NaN/Inf"):
        codec.finite_or_raise(np.array([1.0, np.nan, np.inf]), "scores")
