from __future__ import annotations

import random

import pytest

from collectors.decode import encode_value
from collectors.plan import decode_block, plan_profile, plan_reads, single_reads
from collectors.profile import FieldDef, load_profiles


def _f(name: str, addr: int, dtype: str = "float32", table: str = "input") -> FieldDef:
    from collectors.profile import CANONICAL
    return FieldDef(name=name, table=table, address=addr, type=dtype, unit=CANONICAL[name][0])


def test_contiguous_fields_merge_and_gaps_split() -> None:
    fields = [_f("voltage_v", 0), _f("current_a", 6), _f("power_w", 12), _f("import_kwh", 0x48)]
    blocks = plan_reads(fields, max_gap=4)
    assert [(b.address, b.count) for b in blocks] == [(0, 14), (0x48, 2)]
    assert [(b.address, b.count) for b in plan_reads(fields, max_gap=3)] == [
        (0, 2), (6, 2), (12, 2), (0x48, 2)]


def test_tables_never_merge() -> None:
    fields = [_f("voltage_v", 0), _f("current_a", 2, table="holding")]
    blocks = plan_reads(fields, max_gap=10)
    assert {(b.table, b.address) for b in blocks} == {("input", 0), ("holding", 2)}


def test_max_registers_respected() -> None:
    names = ["voltage_v", "current_a", "power_w", "import_kwh", "export_kwh", "power_factor"]
    fields = [_f(n, i * 40) for i, n in enumerate(names)]
    for limit in (2, 41, 42, 125):
        blocks = plan_reads(fields, max_gap=100, max_registers=limit)
        assert all(b.count <= limit for b in blocks)
        assert sorted(f.name for b in blocks for f in b.fields) == sorted(names)
    with pytest.raises(ValueError):
        plan_reads(fields, max_registers=126)


def _image(fields, rng: random.Random) -> tuple[dict[tuple[str, int], int], dict[FieldDef, float]]:
    regs: dict[tuple[str, int], int] = {}
    truth = {}
    for f in fields:
        bits = 16 * f.words
        top = 1000.0 if f.type.startswith("float") else min(
            1000.0, (2 ** (bits - (0 if f.type.startswith("u") else 1)) - 1) * f.scale * 0.9)
        signed = not f.type.startswith("u") and f.wrap is None
        v = rng.uniform(-top if signed else 0, top)
        words = encode_value(v, f.type, f.order, f.scale, f.offset, f.wrap)
        for i, w in enumerate(words):
            regs[(f.table, f.address + i)] = w
        truth[f] = v
    return regs, truth


@pytest.mark.parametrize("name", sorted(load_profiles()))
def test_merged_reads_equal_single_reads(name: str) -> None:
    prof = load_profiles()[name]
    rng = random.Random(name)
    regs, truth = _image(prof.fields, rng)
    # unused registers inside a merged span hold junk; decoding must ignore them
    junk = lambda t, a: regs.get((t, a), rng.randrange(0x10000))  # noqa: E731

    def read(block):
        return [junk(block.table, a) for a in range(block.address, block.end)]

    merged = {}
    for b in plan_profile(prof):
        assert b.count <= prof.max_registers
        merged.update(decode_block(b, read(b)))
    single = {}
    for b in single_reads(prof.fields):
        single.update(decode_block(b, read(b)))
    assert merged == single
    assert len(plan_profile(prof)) <= len(prof.fields)
    for f, v in truth.items():
        assert merged[f] == pytest.approx(v, rel=1e-6, abs=f.scale)


def test_short_read_rejected() -> None:
    b = plan_reads([_f("voltage_v", 0), _f("current_a", 2)])[0]
    with pytest.raises(ValueError):
        decode_block(b, [0, 0, 0])


def test_unsigned_all_ones_is_not_available() -> None:
    import math
    b = plan_reads([_f("import_kwh", 0, "uint32"), _f("power_w", 2, "int16")])[0]
    got = {f.name: v for f, v in decode_block(b, [0xFFFF, 0xFFFF, 0xFFFF]).items()}
    assert math.isnan(got["import_kwh"])
    assert got["power_w"] == -1.0  # signed -1 is a legitimate value


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
def test_block_codec_equals_the_reference_decoder(order: str) -> None:
    """The poller's compiled codec (one struct per block) == decode_value per field."""
    from collectors.decode import DATA_TYPES, decode_value, word_count
    from collectors.plan import BlockCodec, ReadBlock
    rng = random.Random(order)
    names = ["import_kwh", "export_kwh", "total_kwh", "power_w", "voltage_v", "current_a",
             "power_factor", "frequency_hz"]
    fields, addr = [], 3
    for name, dtype in zip(names, DATA_TYPES, strict=True):
        from collectors.profile import CANONICAL
        fields.append(FieldDef(name=name, table="holding", address=addr, type=dtype,
                               order=order, scale=rng.choice([1.0, 0.01, 0.1]),
                               offset=rng.choice([0.0, 5.0]), unit=CANONICAL[name][0]))
        addr += word_count(dtype) + rng.choice([0, 0, 3])  # some gaps
    block = ReadBlock("holding", 0, addr + 2, tuple(reversed(fields)))  # any field order
    codec = BlockCodec(block)
    for _ in range(200):
        words = [rng.randrange(0x10000) for _ in range(block.count)]
        if rng.random() < 0.2:
            words = [0xFFFF] * block.count  # "not available" on every unsigned field
        got = codec.decode(bytes(b for w in words for b in w.to_bytes(2, "big")))
        for f, v in zip(block.fields, got, strict=True):
            w = words[f.address:f.address + f.words]
            if f.type.startswith("uint") and all(x == 0xFFFF for x in w):
                assert v != v
                continue
            want = decode_value(w, f.type, f.order, f.scale, f.offset)
            assert v == want or (v != v and want != want), (f.type, order, w, v, want)
