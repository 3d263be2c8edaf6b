"""Column-wise batch records (LedgerBatch, IntervalBatch) built straight from packed rows,
with their encoded size known before they are encoded.

Why: the forwarder turns the rows of many changelog records into batches of at most
`most` rows and `limit` bytes. Going through a polars frame cost more per row than the
whole encoding, and finding the size by encoding (and encoding again each half of a batch
over the limit) encoded a catch-up batch three times. Here the rows are transposed once
(`zip(*rows)`), every slice's Avro size is computed from the column lengths, the same
slices as `pipelines.forwarder.bounded_messages` are chosen, and each is encoded once.

Avro sizes used (fastavro's writer): a long is zig-zag varint coded; a string or bytes
value is its length as a long, then its bytes; a non-empty array is its count as a long,
the items, then a 0 byte (an empty array: the 0 byte only). `codec.encode` adds one
version byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas import codec


def join_packed_arrays(values: list[bytes]) -> bytes:
    """One msgpack array of the items of many packed arrays (each value a msgpack array, as
    the worker packs an account's rows): one `unpackb` for a partition's rows instead of one
    per changelog record. ValueError on a value that is not a msgpack array."""
    count = 0
    bodies: list[bytes] = []
    for value in values:
        head = value[0] if value else 0
        if 0x90 <= head <= 0x9F:  # fixarray: up to 15 items
            count += head & 0x0F
            bodies.append(value[1:])
        elif head == 0xDC:  # array 16
            count += int.from_bytes(value[1:3], "big")
            bodies.append(value[3:])
        elif head == 0xDD:  # array 32
            count += int.from_bytes(value[1:5], "big")
            bodies.append(value[5:])
        else:
            raise ValueError(f"packed rows are not a msgpack array (first byte {value[:1]!r})")
    return b"\xdd" + count.to_bytes(4, "big") + b"".join(bodies)


def varint_size(value: int) -> int:
    """Bytes of a non-negative long in Avro (zig-zag doubles it, then 7 bits a byte)."""
    value <<= 1
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _varint_sizes(lengths: np.ndarray) -> np.ndarray:
    """`varint_size` of each length (lengths of strings: below 2**34, so at most 5 bytes)."""
    zigzag = lengths << 1
    return 1 + sum((zigzag >= (1 << (7 * k))).astype(np.int64) for k in range(1, 5))  # type: ignore[no-any-return]


def string_sizes(values: list[str]) -> np.ndarray:
    """The encoded size of each string of an Avro string array (length prefix + UTF-8)."""
    if "".join(values).isascii():
        lengths = np.fromiter(map(len, values), np.int64, len(values))
    else:
        lengths = np.fromiter((len(v.encode()) for v in values), np.int64, len(values))
    return _varint_sizes(lengths) + lengths  # type: ignore[no-any-return]


def string_bound(values: list[str]) -> int:
    """An upper bound of `string_sizes(values).sum()`, without a size per string."""
    if not values:
        return 0
    text = "".join(values)
    per_char = 1 if text.isascii() else 4
    return len(values) * varint_size(per_char * max(map(len, values))) + per_char * len(text)


@dataclass
class RowColumns:
    """The columns of n rows: Avro string arrays (lists) and packed little-endian numbers
    (bytes, with their item size); sliced by row into batch records."""

    contract: str  # "LedgerBatch" or "IntervalBatch"
    n: int
    strings: dict[str, list[Any]]
    packed: dict[str, tuple[bytes, int]]

    def record(self, batch_id: str, start: int, length: int) -> dict[str, Any]:
        end = start + length
        record: dict[str, Any] = {"batch_id": batch_id}
        for name, values in self.strings.items():
            record[name] = values[start:end]
        for name, (data, width) in self.packed.items():
            record[name] = data[start * width:end * width]
        return record

    def encode(self, batch_id: str, start: int, length: int) -> bytes:
        return codec.encode(self.contract, self.record(batch_id, start, length))

    def fixed_size(self, batch_id: str, length: int) -> int:
        """The encoded size of a slice of `length` rows without its strings' own bytes."""
        size = 1 + varint_size(len(batch_id.encode())) + len(batch_id.encode())
        if length:
            size += len(self.strings) * (varint_size(length) + 1)
        else:
            size += len(self.strings)
        for _, width in self.packed.values():
            size += varint_size(length * width) + length * width
        return size

    def row_sizes(self) -> np.ndarray:
        """Bytes each row's strings add to a batch (its numbers are in `fixed_size`)."""
        sizes = np.zeros(self.n, dtype=np.int64)
        for values in self.strings.values():
            sizes += string_sizes(values)
        return sizes

    def size_bound(self, batch_id: str) -> int:
        """An upper bound of the encoded size of all n rows as one batch."""
        return self.fixed_size(batch_id, self.n) + sum(map(string_bound, self.strings.values()))


def bounded_slices(n: int, most: int, size: Callable[[int, int], int], limit: int) -> list[tuple[int, int]]:
    """(start, length) of the slices `pipelines.forwarder.bounded_messages` makes of n rows:
    runs of at most `most` rows, each split in half while its `size(start, length)` is above
    `limit` (and it has more than one row)."""
    out: list[tuple[int, int]] = []

    def add(start: int, length: int) -> None:
        if length > 1 and size(start, length) > limit:
            half = length // 2
            add(start, half)
            add(start + half, length - half)
        else:
            out.append((start, length))

    for start in range(0, n, most):
        add(start, min(most, n - start))
    return out


def encode_bounded(columns: RowColumns, batch_id: Callable[[int], str], most: int, limit: int
                   ) -> list[tuple[int, int, bytes]]:
    """(start, length, message) of every slice, each encoded once, identical to what
    encoding and splitting by the encoded size (`bounded_messages`) yields."""
    n = columns.n
    if n <= most and columns.size_bound(batch_id(0)) <= limit:
        slices = [(0, n)] if n else []
    else:
        prefix = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(columns.row_sizes(), out=prefix[1:])

        def size(start: int, length: int) -> int:
            return columns.fixed_size(batch_id(start), length) + int(prefix[start + length] - prefix[start])

        slices = bounded_slices(n, most, size, limit)
    out: list[tuple[int, int, bytes]] = []
    for start, length in slices:
        _encode_split(columns, batch_id, start, length, limit, out)
    return out


def _encode_split(columns: RowColumns, batch_id: Callable[[int], str], start: int, length: int, limit: int,
                  out: list[tuple[int, int, bytes]]) -> None:
    """Encode a slice; should it be over the limit after all (a size miscounted), split it by
    its encoded size as `bounded_messages` does, so the limit holds whatever the count."""
    value = columns.encode(batch_id(start), start, length)
    if len(value) > limit and length > 1:
        half = length // 2
        _encode_split(columns, batch_id, start, half, limit, out)
        _encode_split(columns, batch_id, start + half, length - half, limit, out)
    else:
        out.append((start, length, value))
