"""Request planning: merge nearby registers of one table into as few reads as allowed.

Every request on an RS-485 bus costs a round trip (~50-100 ms at 9600 baud), so reading
a few unused registers to save a request is a good trade, up to `max_gap` registers.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter

from collectors.decode import _FORMAT
from collectors.profile import FieldDef, Profile

MAX_REGISTERS = 125  # Modbus limit for FC03/FC04


@dataclass(frozen=True, slots=True)
class ReadBlock:
    table: str  # "holding" or "input"
    address: int
    count: int
    fields: tuple[FieldDef, ...]

    @property
    def end(self) -> int:
        return self.address + self.count


def plan_reads(fields: Iterable[FieldDef], max_gap: int = 8,
               max_registers: int = MAX_REGISTERS) -> list[ReadBlock]:
    """Group fields into reads: same table, gap <= max_gap, span <= max_registers."""
    if max_registers < 1 or max_registers > MAX_REGISTERS:
        raise ValueError(f"max_registers must be 1..{MAX_REGISTERS}")
    blocks: list[ReadBlock] = []
    by_table: dict[str, list[FieldDef]] = {}
    for f in fields:
        by_table.setdefault(f.table, []).append(f)
    for table in sorted(by_table):
        cur: list[FieldDef] = []
        start = end = 0
        for f in sorted(by_table[table], key=lambda f: f.address):
            f_end = f.address + f.words
            if f.words > max_registers:
                raise ValueError(f"{f.name} needs {f.words} registers > {max_registers}")
            if cur and f.address - end <= max_gap and f_end - start <= max_registers:
                cur.append(f)
                end = max(end, f_end)
                continue
            if cur:
                blocks.append(ReadBlock(table, start, end - start, tuple(cur)))
            cur, start, end = [f], f.address, f_end
        if cur:
            blocks.append(ReadBlock(table, start, end - start, tuple(cur)))
    return blocks


def plan_profile(profile: Profile) -> list[ReadBlock]:
    return plan_reads(profile.fields, profile.max_gap, profile.max_registers)


def single_reads(fields: Iterable[FieldDef]) -> list[ReadBlock]:
    """One request per field (the reference the merged plan must agree with)."""
    return [ReadBlock(f.table, f.address, f.words, (f,)) for f in fields]


_NEVER = object()  # equal to no raw value: signed and float types have no NaN marker


class BlockCodec:
    """A read block compiled once: register bytes -> engineering values, in field order.

    Fields in ABCD order (the Modbus default) are unpacked by one struct for the whole
    block, gaps skipped with pad bytes; other orders are permuted to ABCD byte by byte
    first. Then raw * scale + offset, and an unsigned all-ones register becomes NaN.
    This is the poller's hot path: no per-field objects, no word lists.
    """

    __slots__ = ("block", "fc", "address", "count", "_main", "_main_idx", "_others", "_post",
                 "_n")

    def __init__(self, block: ReadBlock) -> None:
        self.block = block
        self.fc = 3 if block.table == "holding" else 4
        self.address, self.count = block.address, block.count
        fmt, pos, main_idx, others = ">", 0, [], []
        ordered = sorted(range(len(block.fields)), key=lambda i: block.fields[i].address)
        for i in ordered:
            f = block.fields[i]
            start = 2 * (f.address - block.address)
            if f.order == "ABCD":
                fmt += "x" * (start - pos) + _FORMAT[f.type]
                pos = start + 2 * f.words
                main_idx.append(i)
            else:
                perm = _abcd_permutation(f.order, f.words)
                others.append((i, itemgetter(*(start + j for j in perm)),
                               struct.Struct(">" + _FORMAT[f.type])))
        fmt += "x" * (2 * block.count - pos)
        self._main = struct.Struct(fmt)
        self._main_idx = tuple(main_idx)
        self._others = tuple(others)
        self._post = tuple(
            (f.scale, f.offset, (1 << (16 * f.words)) - 1 if f.type.startswith("uint") else _NEVER)
            for f in block.fields)
        self._n = len(block.fields)

    def decode(self, data: bytes) -> list[float]:
        if len(data) < 2 * self.count:
            raise ValueError(f"short read: {len(data) // 2} of {self.count} registers")
        raw: list = [0] * self._n
        for i, v in zip(self._main_idx, self._main.unpack_from(data), strict=True):
            raw[i] = v
        for i, get, st in self._others:
            raw[i] = st.unpack(bytes(get(data)))[0]
        return [math.nan if r == nan_raw else r * scale + offset
                for r, (scale, offset, nan_raw) in zip(raw, self._post, strict=True)]


def _abcd_permutation(order: str, words: int) -> list[int]:
    """Byte indices (within a value) that put its bytes in ABCD order."""
    idx = list(range(2 * words))
    ws = [idx[2 * k:2 * k + 2] for k in range(words)]
    if order in ("BADC", "DCBA"):
        ws = [w[::-1] for w in ws]
    if order in ("CDAB", "DCBA"):
        ws.reverse()
    return [b for w in ws for b in w]


def compile_blocks(blocks: Iterable[ReadBlock]) -> list[BlockCodec]:
    return [BlockCodec(b) for b in blocks]


def decode_block(block: ReadBlock, words: Sequence[int]) -> dict[FieldDef, float]:
    """Decode every field of a block from the words the read returned.

    An unsigned register of all ones (0xFFFF...) is the usual "not available" marker and
    decodes to NaN, so it is flagged instead of read as a huge counter value. Uses the
    same compiled codec as the poller.
    """
    if len(words) < block.count:
        raise ValueError(f"short read: {len(words)} of {block.count} registers")
    data = struct.pack(f">{block.count}H", *(w & 0xFFFF for w in words[:block.count]))
    return dict(zip(block.fields, BlockCodec(block).decode(data), strict=True))

