"""schemas.rowpack packs each account's rows column-wise: the bytes must be msgpack's own."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import polars as pl
import pytest

from schemas import rowpack
from schemas.intervals import INTERVAL_COLUMNS, pack_interval_rows
from schemas.ledger import LEDGER_COLUMNS, pack_ledger_rows

EDGE_INTS = [0, 1, -1, 31, 32, -32, -33, 127, 128, 255, 256, -128, -129, 65535, 65536, -32768, -32769,
             2**32 - 1, 2**32, -2**31, -2**31 - 1, 2**63 - 1, -2**63]


def by_msgpack(frame: pl.DataFrame, columns: list[str]) -> list[tuple[str, bytes]]:
    """The reference: each account's rows as Python lists through msgpack's packer."""
    rows = list(zip(*[frame[c].to_list() for c in columns], strict=True))
    runs = frame["account_id"].rle().struct.unnest()
    out, start = [], 0
    for account, n in zip(runs["value"].to_list(), runs["len"].to_list(), strict=True):
        out.append((account, msgpack.packb(rows[start:start + n], use_bin_type=True)))
        start += n
    return out


def random_frame(rng: random.Random, n: int, one_run: bool) -> pl.DataFrame:
    def an_int() -> Any:
        return rng.choice([None, rng.choice(EDGE_INTS), rng.randint(-2**63, 2**63 - 1), rng.randint(-300, 300),
                           rng.randint(-70000, 70000)])

    def a_str() -> Any:
        size = rng.choice([0, 1, 31, 32, 33, 255, 256, 65535, 65536, rng.randint(0, 80)])
        return rng.choice([None, "x" * size, "é" * (size // 2),
                           "".join(rng.choice("ab€😀") for _ in range(rng.randint(0, 40)))])

    accounts = ["same"] * n if one_run else sorted(rng.choice(["A", "B" * 40, "Ç", "d"]) + str(rng.randint(0, n // 3))
                                                   for _ in range(n))
    return pl.DataFrame({"account_id": accounts, "s": [a_str() for _ in range(n)], "i": [an_int() for _ in range(n)],
                         "t": [rng.choice([None, rng.randint(-2**31, 2**31 - 1)]) for _ in range(n)],
                         "b": [rng.choice([None, True, False]) for _ in range(n)], "z": [None] * n},
                        schema={"account_id": pl.String, "s": pl.String, "i": pl.Int64, "t": pl.Int32,
                                "b": pl.Boolean, "z": pl.Null})


@pytest.mark.parametrize("chunk", [3, rowpack.CHUNK_ROWS])
def test_packed_runs_are_msgpacks_bytes(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(rowpack, "CHUNK_ROWS", chunk)
    rng = random.Random(1)
    # chunks of 3 rows meet every chunk boundary within 40 rows (2,000 took 20 s of the suite)
    sizes = [1, 5, 17, 40] if chunk == 3 else [1, 5, 17, 300, 2000]
    for trial in range(30):
        frame = random_frame(rng, rng.choice(sizes), one_run=trial % 5 == 0)
        columns = ["s", "account_id", "i", "t", "b", "z"] + (["i"] * 20 if trial % 3 == 0 else [])  # array 16
        assert rowpack.pack_runs(frame, columns) == by_msgpack(frame, columns), trial


def test_a_run_of_more_than_65535_rows_has_an_array_32_header() -> None:
    frame = pl.DataFrame({"account_id": ["a"] * 70_000, "i": list(range(70_000))})
    packed = rowpack.pack_runs(frame, ["i"])
    assert packed == by_msgpack(frame, ["i"]) and packed is not None and packed[0][1][0] == 0xDD


def test_other_types_are_left_to_msgpack() -> None:
    frame = pl.DataFrame({"account_id": ["a", "b"], "f": [1.5, None]})
    assert rowpack.pack_runs(frame, ["f"]) is None
    floats = pl.DataFrame({**{c: [None] for c in INTERVAL_COLUMNS}, "account_id": ["a"], "start_ms": [1.5]})
    assert pack_interval_rows(floats) == by_msgpack(floats, list(INTERVAL_COLUMNS))


def test_ledger_and_interval_rows_as_before() -> None:
    rng = random.Random(2)
    n = 500
    accounts = sorted(f"M{rng.randint(0, 60):03d}" for _ in range(n))
    ledger = pl.DataFrame({name: [rng.choice([None, f"{name}-{rng.randint(0, 10**12)}"]) if dtype == pl.String
                                  else rng.choice([None, True, False]) if dtype == pl.Boolean
                                  else rng.choice([None, rng.randint(-2**31, 2**31 - 1), rng.randint(-200, 200)])
                                  for _ in range(n)] for name, dtype in LEDGER_COLUMNS.items()},
                          schema=LEDGER_COLUMNS).with_columns(account_id=pl.Series(accounts))
    assert pack_ledger_rows(ledger) == by_msgpack(ledger, list(LEDGER_COLUMNS))
    intervals = ledger.select(circuit_id="circuit_id", meter_id="meter_id", account_id="account_id", mall_id="mall_id",
                              start_ms="ts_ms", end_ms="ts_ms", energy_wh="energy_wh",
                              billed_total_wh="amount_minor", estimated="estimated", flag="kind")
    assert pack_interval_rows(intervals) == by_msgpack(intervals, list(INTERVAL_COLUMNS))
