from __future__ import annotations

import math
import struct

import pytest

from collectors.decode import (
    DATA_TYPES,
    ORDERS,
    counter_wrap,
    decode_raw,
    decode_value,
    encode_raw,
    encode_value,
    word_count,
)

SAMPLES = {
    "int16": [0, 1, -1, 12345, -32768, 32767],
    "uint16": [0, 1, 0xFFFF, 0x1234],
    "int32": [0, -1, 2**31 - 1, -(2**31), 0x12345678, -123456],
    "uint32": [0, 2**32 - 1, 0x12345678, 4294967295],
    "int64": [0, -1, 2**63 - 1, -(2**63), 0x0102030405060708],
    "uint64": [0, 2**64 - 1, 0x0102030405060708],
    "float32": [0.0, 1.5, -230.25, 3.4e38, 1e-30],
    "float64": [0.0, 1.5, -230.25, 1e300, 123456.789012345],
}


def _reference_words(value: float | int, dtype: str, order: str) -> list[int]:
    """Build the expected registers independently: big-endian bytes, then reorder."""
    fmt = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q",
           "uint64": "Q", "float32": "f", "float64": "d"}[dtype]
    b = struct.pack(">" + fmt, value)
    pairs = [b[i:i + 2] for i in range(0, len(b), 2)]
    if order in ("CDAB", "DCBA"):
        pairs.reverse()
    if order in ("BADC", "DCBA"):
        pairs = [p[::-1] for p in pairs]
    return [int.from_bytes(p, "big") for p in pairs]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DATA_TYPES)
def test_every_type_and_order_round_trips(dtype: str, order: str) -> None:
    for v in SAMPLES[dtype]:
        words = encode_raw(v, dtype, order)
        assert len(words) == word_count(dtype)
        assert words == _reference_words(v, dtype, order)
        got = decode_raw(words, dtype, order)
        if dtype == "float32":
            assert got == pytest.approx(v, rel=1e-6)
        else:
            assert got == v


def test_known_register_images() -> None:
    # 230.0 as float32 is 0x43660000
    assert decode_value([0x4366, 0x0000], "float32", "ABCD") == 230.0
    assert decode_value([0x0000, 0x4366], "float32", "CDAB") == 230.0
    assert decode_value([0x6643, 0x0000], "float32", "BADC") == 230.0
    assert decode_value([0x0000, 0x6643], "float32", "DCBA") == 230.0
    # uint32 x0.01 kWh: 0x0001E240 = 123456 -> 1234.56 kWh
    assert decode_value([0x0001, 0xE240], "uint32", "ABCD", 0.01) == pytest.approx(1234.56)
    assert decode_value([0xE240, 0x0001], "uint32", "CDAB", 0.01) == pytest.approx(1234.56)
    # int16 x0.001 kW power: 0xFF38 = -200 -> -200 W when scale is 1 W/count
    assert decode_value([0xFF38], "int16", "ABCD", 1.0) == -200.0
    assert decode_value([0x38FF], "int16", "BADC", 1.0) == -200.0


def test_nan_passes_through_float_decode() -> None:
    words = encode_raw(float("nan"), "float32")
    assert math.isnan(decode_value(words, "float32", "ABCD", 0.1))


def test_wrong_word_count_rejected() -> None:
    with pytest.raises(ValueError):
        decode_raw([1], "float32")
    with pytest.raises(ValueError):
        decode_raw([1, 2], "float32", "XYZW")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype,scale,value", [
    ("uint32", 0.01, 1234.56), ("int32", 0.01, -98.76), ("uint16", 0.1, 229.9),
    ("int16", 0.001, -1.234), ("float32", 0.1, 2301.5), ("float64", 1.0, 98765.4321),
    ("uint64", 0.001, 123456789.123), ("int64", 1.0, -5),
])
def test_scaled_encode_decode_inverse(dtype: str, scale: float, value: float, order: str) -> None:
    words = encode_value(value, dtype, order, scale)
    got = decode_value(words, dtype, order, scale)
    assert got == pytest.approx(value, rel=1e-6, abs=scale / 2)


def test_unsigned_counter_wraps_at_type_width() -> None:
    wrap = counter_wrap("uint32", 0.01)
    assert wrap == pytest.approx(42_949_672.96)
    words = encode_value(wrap + 5.0, "uint32", "ABCD", 0.01)
    assert decode_value(words, "uint32", "ABCD", 0.01) == pytest.approx(5.0)


def test_explicit_wrap_models_display_rollover() -> None:
    words = encode_value(100_000.25, "int32", "ABCD", 0.01, wrap=100_000.0)
    assert decode_value(words, "int32", "ABCD", 0.01) == pytest.approx(0.25)
    assert counter_wrap("int32", 0.01, 100_000.0) == 100_000.0
    assert counter_wrap("float32", 1.0) is None


def test_integer_cannot_encode_nan() -> None:
    with pytest.raises(ValueError):
        encode_value(float("nan"), "uint32", "ABCD", 0.01)
