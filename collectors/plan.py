"""Request planning: merge nearby registers of one table into as few reads as allowed.

Every request on an RS-485 bus costs a round trip (~50-100 ms at 9600 baud), so reading
a few unused registers to save a request is a good trade, up to `max_gap` registers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from collectors.decode import decode_value
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


def decode_block(block: ReadBlock, words: Sequence[int]) -> dict[FieldDef, float]:
    """Decode every field of a block from the words the read returned.

    An unsigned register of all ones (0xFFFF...) is the usual "not available" marker and
    decodes to NaN, so it is flagged instead of read as a huge counter value.
    """
    if len(words) < block.count:
        raise ValueError(f"short read: {len(words)} of {block.count} registers")
    out: dict[FieldDef, float] = {}
    for f in block.fields:
        i = f.address - block.address
        w = words[i:i + f.words]
        if f.type.startswith("uint") and all(x == 0xFFFF for x in w):
            out[f] = math.nan
        else:
            out[f] = decode_value(w, f.type, f.order, f.scale, f.offset)
    return out
