"""Register words <-> engineering values. Pure functions, no Modbus I/O.

Order names follow the common A/B/C/D convention for a 32-bit value whose big-endian
bytes are A B C D:

- ABCD: big-endian words, big-endian bytes (Modbus default)
- CDAB: word-swapped ("little word", common on Chint/Schneider)
- BADC: bytes swapped inside each word
- DCBA: fully little-endian

For 16-bit values only the byte half matters (ABCD/CDAB -> AB, BADC/DCBA -> BA); for
64-bit values "word swap" reverses all four words. Values are decoded one at a time on
purpose: pymodbus' multi-value little-word decoding is known to be wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Literal

DataType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
Order = Literal["ABCD", "CDAB", "BADC", "DCBA"]

DATA_TYPES: tuple[str, ...] = (
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64",
)
ORDERS: tuple[str, ...] = ("ABCD", "CDAB", "BADC", "DCBA")

_FORMAT = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
    "int64": "q", "uint64": "Q", "float32": "f", "float64": "d",
}
_WORDS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2,
          "int64": 4, "uint64": 4, "float32": 2, "float64": 4}


def word_count(dtype: str) -> int:
    """Registers occupied by one value of `dtype`."""
    return _WORDS[dtype]


def is_integer(dtype: str) -> bool:
    return not dtype.startswith("float")


def raw_modulus(dtype: str) -> int | None:
    """Number of distinct raw values of an unsigned integer type (its wrap point)."""
    if dtype.startswith("uint"):
        return 1 << (16 * _WORDS[dtype])
    return None


def _swap_words(words: Sequence[int], order: str) -> list[int]:
    ws = [w & 0xFFFF for w in words]
    if order in ("BADC", "DCBA"):
        ws = [((w & 0xFF) << 8) | (w >> 8) for w in ws]
    if order in ("CDAB", "DCBA"):
        ws.reverse()
    return ws


def decode_raw(words: Sequence[int], dtype: str, order: str = "ABCD") -> int | float:
    """Decode the registers of ONE value into its raw (unscaled) number."""
    n = _WORDS[dtype]
    if len(words) != n:
        raise ValueError(f"{dtype} needs {n} registers, got {len(words)}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}")
    ws = _swap_words(words, order)
    return struct.unpack(">" + _FORMAT[dtype], struct.pack(f">{n}H", *ws))[0]


def encode_raw(raw: int | float, dtype: str, order: str = "ABCD") -> list[int]:
    """Inverse of decode_raw. Integers are wrapped to the type's width (two's complement)."""
    n = _WORDS[dtype]
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}")
    if is_integer(dtype):
        bits = 16 * n
        packed = struct.pack(f">{'Q' if n == 4 else 'I' if n == 2 else 'H'}",
                             int(raw) & ((1 << bits) - 1))
    else:
        packed = struct.pack(">" + _FORMAT[dtype], float(raw))
    ws = list(struct.unpack(f">{n}H", packed))
    # the swap is its own inverse, so decoding's transform also encodes
    return _swap_words(ws, order)


def decode_value(words: Sequence[int], dtype: str, order: str = "ABCD",
                 scale: float = 1.0, offset: float = 0.0) -> float:
    """Registers -> engineering value (raw * scale + offset), as float (NaN passes through)."""
    raw = decode_raw(words, dtype, order)
    return float(raw) * scale + offset


def encode_value(value: float, dtype: str, order: str = "ABCD", scale: float = 1.0,
                 offset: float = 0.0, wrap: float | None = None) -> list[int]:
    """Engineering value -> registers, the inverse of decode_value.

    `wrap` (engineering units) models a counter that rolls over at that value, e.g.
    99999.99 kWh displays; unsigned integer types also wrap at their raw width.
    """
    if wrap is not None and math.isfinite(value):
        value = math.fmod(value, wrap)
        if value < 0:
            value += wrap
    if not is_integer(dtype):
        return encode_raw((value - offset) / scale if math.isfinite(value) else value,
                          dtype, order)
    if not math.isfinite(value):
        raise ValueError(f"cannot encode {value} as {dtype}")
    raw = round((value - offset) / scale)
    mod = raw_modulus(dtype)
    if mod is not None:
        raw %= mod
    return encode_raw(raw, dtype, order)


def counter_wrap(dtype: str, scale: float, wrap: float | None = None) -> float | None:
    """Engineering value at which a counter register rolls over, if it does."""
    if wrap is not None:
        return wrap
    mod = raw_modulus(dtype)
    return mod * scale if mod is not None else None
