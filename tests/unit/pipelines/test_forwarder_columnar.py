"""The forwarder's columnar path publishes the very messages of the row path it replaced
(bench.forwarder_cost.RowForwarder: rows through a polars frame, a batch over the size limit
split by encoding it): same topics, keys, partitions and bytes, in the same order."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import numpy as np
import pytest

from bench.forwarder_cost import RowForwarder, consume_batches, forward_all
from infra import topics as T
from pipelines.envelope import Envelope, OutboxItem
from pipelines.forwarder import MAX_OUTPUT_BYTES, Forwarder, bounded_messages
from schemas import codec
from schemas.columnar import RowColumns, bounded_slices, string_sizes, varint_size
from schemas.intervals import (
    INTERVAL_COLUMNS,
    INTERVAL_ROWS,
    interval_batch_to_frame,
    interval_row_columns,
)
from schemas.ledger import (
    LEDGER_COLUMNS,
    LEDGER_ROWS,
    batch_entries,
    ledger_row_columns,
    unpack_ledger_rows,
)

T0 = 1_784_080_800_000


def _ledger_row(rnd: random.Random, account: str, i: int, old: bool) -> tuple[Any, ...]:
    """A ledger row of any kind: charges with every field, payments and standing charges with
    nulls, debt entries; `old`: packed before debt_change_minor existed (16 columns)."""
    kind = rnd.choice(["charge", "charge", "charge", "topup", "standing_charge", "debt_recovery"])
    charge = kind == "charge"
    circuit = f"C{rnd.randrange(10**6):06d}" if charge or rnd.random() < 0.3 else None
    row = (f"{account}:{circuit}:{T0 + i}" if charge else f"{account}:{kind}:{i}", account,
           rnd.choice(["B0001", "Bé01", "B0002"]), kind, rnd.randrange(-10**6, 10**6), rnd.randrange(-2**40, 2**40),
           T0 + i * 60_000, f"{circuit}@{T0 + i}" if charge else f"p{i}",
           f"m{rnd.randrange(10**5)}" if circuit else None, circuit,
           T0 + (i - 1) * 60_000 if charge else None, rnd.randrange(0, 5000) if charge or rnd.random() < 0.2 else None,
           rnd.choice(["peak", "off_peak", "峰"]) if charge else None, rnd.choice([1, 2, 3]) if charge else None,
           rnd.choice(["1.36", "0.7", "12.25"]) if charge else None, charge and rnd.random() < 0.1)
    if old:
        return row
    return (*row, rnd.randrange(-500, 500) if kind.startswith("debt") else None)


def _interval_row(rnd: random.Random, account: str, i: int) -> tuple[Any, ...]:
    flag = rnd.choice(["", "", "", "rollover", "late", "spike"])
    return (f"C{rnd.randrange(10**6):06d}", f"m{rnd.randrange(10**5)}", account, "B0001", T0 + i * 60_000 - 60_000,
            T0 + i * 60_000, rnd.randrange(0, 10**6), rnd.randrange(0, 2**40), rnd.random() < 0.1, flag)


def _records(seed: int, count: int, most_rows: int) -> list[tuple[int, bytes | None]]:
    """(partition, changelog value) of `count` state changes over two partitions: ledger rows
    (some records of an older worker), interval rows, an alert now and then, tombstones and
    empty outboxes."""
    rnd = random.Random(seed)
    records: list[tuple[int, bytes | None]] = []
    for r in range(count):
        account = f"B0001-S{rnd.randrange(10**4):05d}"
        if rnd.random() < 0.03:
            records.append((r % 2, None))
            continue
        outbox = []
        if rnd.random() < 0.9:
            old = rnd.random() < 0.2
            rows = [_ledger_row(rnd, account, r * 10 + k, old) for k in range(rnd.randint(1, most_rows))]
            outbox.append(OutboxItem(LEDGER_ROWS, account.encode(), msgpack.packb(rows, use_bin_type=True)))
        if rnd.random() < 0.8:
            rows = [_interval_row(rnd, account, r * 10 + k) for k in range(rnd.randint(1, most_rows))]
            outbox.append(OutboxItem(INTERVAL_ROWS, account.encode(), msgpack.packb(rows, use_bin_type=True)))
        if rnd.random() < 0.05:
            outbox.append(OutboxItem(T.ALERTS, account.encode(), f"alert-{r}".encode()))
        records.append((rnd.randrange(2), Envelope(outbox=outbox).to_bytes()))
    return records


@pytest.mark.parametrize(("count", "most_rows", "batch"), [(300, 3, 500), (3000, 4, 2000), (40, 1, 7)])
def test_columnar_path_publishes_the_row_paths_messages(count: int, most_rows: int, batch: int) -> None:
    batches = consume_batches(_records(count, count, most_rows), batch)
    _, old = forward_all(RowForwarder, batches, keep=True)
    _, new = forward_all(Forwarder, batches, keep=True)
    assert [m[0] for m in new.kept].count(T.LEDGER) >= 2
    assert new.kept == old.kept
    if count == 3000:  # batches above the size limit were split, and below it no longer
        assert max(len(m[2]) for m in new.kept) <= MAX_OUTPUT_BYTES
        assert max(len(m[2]) for m in new.kept) > MAX_OUTPUT_BYTES // 2


def test_split_over_a_small_limit_matches_the_row_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many splits, down to one row per message (a row above the limit alone goes as it is)."""
    import pipelines.forwarder as fwd

    batches = consume_batches(_records(7, 200, 5), 500)
    monkeypatch.setattr(fwd, "MAX_OUTPUT_BYTES", 220)
    _, old = forward_all(RowForwarder, batches, keep=True)
    _, new = forward_all(Forwarder, batches, keep=True)
    assert new.kept == old.kept
    assert len(new.kept) > 200 and any(len(m[2]) > 220 for m in new.kept)


def test_predicted_sizes_are_exact() -> None:
    rnd = random.Random(3)
    rows = [_ledger_row(rnd, "A" * rnd.choice([1, 70, 9000]), i, False) for i in range(300)]
    columns = ledger_row_columns(rows)
    sizes = np.concatenate([[0], np.cumsum(columns.row_sizes())])
    for start, length in [(0, 300), (0, 0), (5, 1), (17, 200), (299, 1), (100, 150)]:
        batch_id = f"t:{start}@{10**start}+{start}"
        value = columns.encode(batch_id, start, length)
        assert len(value) == columns.fixed_size(batch_id, length) + sizes[start + length] - sizes[start]
    assert len(columns.encode("b", 0, 300)) <= columns.size_bound("b")
    assert [varint_size(v) for v in (0, 63, 64, 8191, 8192, 2**40)] == [1, 1, 2, 2, 3, 6]
    assert string_sizes(["", "é", "x" * 64]).tolist() == [1, 3, 66]


def test_columns_decode_to_the_rows_nulls_and_old_rows_included() -> None:
    rnd = random.Random(11)
    rows = [_ledger_row(rnd, "A", i, i % 3 == 0) for i in range(60)]
    unpacked = [r for k in range(0, 60, 6) for r in unpack_ledger_rows(msgpack.packb(rows[k:k + 6]))]
    record = codec.decode("LedgerBatch", ledger_row_columns(unpacked).encode("b", 0, 60))
    expected = [dict(zip(LEDGER_COLUMNS, r if len(r) == 17 else (*r, None), strict=True)) for r in rows]
    assert batch_entries(record) == expected
    facts = [_interval_row(rnd, "A", i) for i in range(20)]
    decoded = codec.decode("IntervalBatch", interval_row_columns(facts).encode("i", 3, 10))
    assert interval_batch_to_frame(decoded).rows() == facts[3:13]
    assert list(INTERVAL_COLUMNS) == list(interval_batch_to_frame(decoded).columns)


def test_bounded_slices_split_in_halves_in_order() -> None:
    assert bounded_slices(10, 4, lambda s, n: n, 2) == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2)]
    assert bounded_slices(11, 5, lambda s, n: n + s, 4) == [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1),
                                                            (7, 1), (8, 1), (9, 1), (10, 1)]
    sizes = [random.Random(5).randrange(1, 40) for _ in range(700)]
    parts = bounded_messages(list(range(700)), 64, lambda part, start: bytes(sum(sizes[i] for i in part)), 200)
    slices = bounded_slices(700, 64, lambda s, n: sum(sizes[s:s + n]), 200)
    assert [len(p) for p in parts] == [sum(sizes[s:s + n]) for s, n in slices]
    assert bounded_slices(0, 4, lambda s, n: n, 2) == []
    assert bounded_slices(3, 4, lambda s, n: 10**6, 2) == [(0, 1), (1, 1), (2, 1)]


def test_a_miscounted_size_still_keeps_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from schemas import columnar

    rows = [_ledger_row(random.Random(i), "A", i, False) for i in range(400)]
    columns = ledger_row_columns(rows)
    monkeypatch.setattr(RowColumns, "row_sizes", lambda self: np.zeros(self.n, dtype=np.int64))
    monkeypatch.setattr(RowColumns, "size_bound", lambda self, batch_id: 0)
    out = columnar.encode_bounded(columns, lambda s: f"x+{s}", 1024, 5_000)
    assert all(len(v) <= 5_000 for _, _, v in out) and sum(n for _, n, _ in out) == 400
    assert [s for s, _, _ in out] == sorted(s for s, _, _ in out)


def test_packed_arrays_of_every_header_size_unpack_together() -> None:
    from schemas.columnar import join_packed_arrays
    from schemas.intervals import unpack_interval_values
    from schemas.ledger import unpack_ledger_values

    parts = [list(range(n)) for n in (0, 1, 15, 16, 300, 65_536, 3)]
    joined = msgpack.unpackb(join_packed_arrays([msgpack.packb(p) for p in parts]))
    assert joined == [x for p in parts for x in p]
    rnd = random.Random(2)
    rows = [[_ledger_row(rnd, "A", i, old) for i in range(n)] for n, old in ((20, False), (2, True), (1, False))]
    assert unpack_ledger_values([msgpack.packb(r) for r in rows]) == [
        r for part in rows for r in unpack_ledger_rows(msgpack.packb(part))]
    facts = [_interval_row(rnd, "A", i) for i in range(17)]
    assert unpack_interval_values([msgpack.packb(facts[:16]), msgpack.packb(facts[16:])]) == facts
    with pytest.raises(ValueError, match="not a msgpack array"):
        join_packed_arrays([msgpack.packb(facts[:1]), msgpack.packb({"a": 1})])
