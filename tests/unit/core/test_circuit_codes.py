"""Circuit ranks of a batch (`interval._circuit_codes`) equal the Enum cast they replaced, on
every path: a few rows (Python), fewer than half the portfolio (distinct ids through the
index's dict, `cols.ranks`) and as many as half of it (the Enum cast)."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pytest

from pipelines.core import cols
from pipelines.core.interval import CircuitIndex, _circuit_codes
from pipelines.core.models import CircuitConfig

N = 4_000  # circuits: 2,000 rows is the switch to the Enum cast


def _index() -> CircuitIndex:
    rnd = random.Random(7)
    ids = [f"M{rnd.randrange(90):02d}-C{i:05d}" for i in range(N)]
    return CircuitIndex({c: CircuitConfig(circuit_id=c, account_id=f"A{c}") for c in ids})


def _enum_codes(circ: pl.Series, ix: CircuitIndex) -> np.ndarray:
    """The implementation before (main 9cde190), as the reference."""
    return circ.cast(pl.Enum(ix.ids), strict=False).to_physical().cast(pl.Int64).fill_null(-1).to_numpy()


@pytest.mark.parametrize("rows", [0, 1, 300, 512, 513, 1_500, 1_999, 2_000, 6_000])
@pytest.mark.parametrize("shape", ["distinct", "repeats", "unknown_and_null"])
def test_codes_equal_the_enum_cast(rows: int, shape: str) -> None:
    ix = _index()
    rnd = random.Random(rows)
    if shape == "distinct":
        values: list[str | None] = rnd.sample(ix.ids, min(rows, N)) + rnd.choices(ix.ids, k=max(0, rows - N))
    elif shape == "repeats":
        values = rnd.choices(ix.ids[:50], k=rows)
    else:
        values = [rnd.choice(ix.ids) if rnd.random() < 0.6 else (None if rnd.random() < 0.5 else f"x{i}")
                  for i in range(rows)]
    circ = pl.Series("circuit_id", values, dtype=pl.String)
    got = _circuit_codes(circ, ix)
    assert got.dtype == np.int64 and got.shape == (rows,)
    assert got.tolist() == _enum_codes(circ, ix).tolist()
    assert got.tolist() == [ix.rank.get(v, -1) for v in values]  # type: ignore[arg-type]


def test_ranks_of_a_column_with_only_unknown_or_null_values() -> None:
    assert cols.ranks(pl.Series("c", [None, None], dtype=pl.String), {"a": 0}).tolist() == [-1, -1]
    assert cols.ranks(pl.Series("c", ["b", None, "b"], dtype=pl.String), {"a": 0}).tolist() == [-1, -1, -1]
    assert cols.ranks(pl.Series("c", ["b", "a", None, "a"], dtype=pl.String), {"a": 5}).tolist() == [-1, 5, -1, 5]


def test_the_enum_is_built_only_when_a_batch_needs_it() -> None:
    ix = _index()
    _circuit_codes(pl.Series("circuit_id", ix.ids[:1_000]), ix)
    assert "enum" not in vars(ix)
    _circuit_codes(pl.Series("circuit_id", ix.ids), ix)
    assert "enum" in vars(ix)
