"""Conversions done in slices, so a config reload in a thread lets the event loop run."""

import polars as pl
import pytest

from pipelines.core.cols import CHUNK, as_list, chunked, chunked_dict


def test_chunked_dict_equals_dict_zip_across_slices() -> None:
    keys = [f"A{i}" for i in range(CHUNK * 2 + 7)]
    values = list(range(len(keys)))
    out = chunked_dict(keys, values)
    assert out == dict(zip(keys, values, strict=True))
    assert list(out) == keys  # insertion order kept: contexts iterate accounts in file order


def test_chunked_dict_keeps_the_last_value_of_a_repeated_key_like_dict() -> None:
    keys = ["x"] * (CHUNK + 1)
    assert chunked_dict(keys, list(range(CHUNK + 1))) == {"x": CHUNK}


def test_chunked_dict_refuses_lengths_that_differ() -> None:
    with pytest.raises(ValueError, match="3 keys but 2 values"):
        chunked_dict(["a", "b", "c"], [1, 2])


def test_chunked_series_and_as_list_round_trip_across_slices() -> None:
    values = [None if i % 97 == 0 else i for i in range(CHUNK * 3 + 1)]
    column = chunked("v", values, pl.Int64)
    assert column.len() == len(values)
    assert as_list(column) == values
