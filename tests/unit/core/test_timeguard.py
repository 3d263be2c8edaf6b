"""The time guard: each reason, the vectorised split, the config section."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from pipelines.core.models import Tariff, TariffVersion
from pipelines.core.timeguard import (
    ABSURD,
    BEFORE_START,
    FUTURE,
    LATEST_MS,
    REASON_COLUMN,
    Bounds,
    TimeLimits,
    bounds_for,
    problem,
    split_frame,
    summarise,
)

T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00
Y3000 = int(datetime(3000, 1, 1, tzinfo=UTC).timestamp() * 1000)
START_2024 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)
B = Bounds(max_future_skew_ms=300_000, earliest_ms=START_2024)


def frame(ts: list[int | None], ref: list[int | None] | None = None, circuits: list[str] | None = None
          ) -> pl.DataFrame:
    data: dict[str, object] = {"circuit_id": circuits or [f"c{i}" for i in range(len(ts))], "ts_ms": ts}
    if ref is not None:
        data["msg_ts_ms"] = ref
    return pl.DataFrame(data, schema_overrides={"ts_ms": pl.Int64, "msg_ts_ms": pl.Int64})


def test_scalar_reasons() -> None:
    assert problem(T0, T0, B) is None
    assert problem(T0 + 300_000, T0, B) is None  # exactly the skew: accepted
    assert "ahead of the broker time" in (problem(T0 + 300_001, T0, B) or "")
    assert "ahead of the broker time" in (problem(T0 + 86_400_000 * 365 * 74, T0, B) or "")  # year 2100
    assert "plausible" in (problem(Y3000, T0, B) or "")  # beyond 2200 whatever the broker says
    assert "first tariff" in (problem(START_2024 - 1, T0, B) or "")
    assert "plausible" in (problem(0, T0, B) or "")
    assert "plausible" in (problem(-5, None, B) or "")
    assert "plausible" in (problem(LATEST_MS, None, B) or "")
    assert problem(Y3000, None, B) is not None  # no reference: still beyond the absolute bound
    assert problem(T0 + 10**9, None, B) is None  # no reference: the future check is skipped
    assert problem(None, T0, B) is None  # a missing ts is the core's business (invalid)


def test_split_frame_names_each_reason_and_keeps_the_rest() -> None:
    ts = [T0, Y3000, T0 + 400_000, START_2024 - 900_000, -1, None, T0 + 10**9]
    ref = [T0, T0, T0, T0, T0, T0, None]
    ok, bad = split_frame(frame(ts, ref), B)
    assert ok["ts_ms"].to_list() == [T0, None, T0 + 10**9]
    assert dict(zip(bad["circuit_id"], bad[REASON_COLUMN], strict=True)) == {
        "c1": ABSURD, "c2": FUTURE, "c3": BEFORE_START, "c4": ABSURD}


def test_split_frame_all_good_returns_the_frame_itself() -> None:
    f = frame([T0, T0 + 1], [T0, T0])
    ok, bad = split_frame(f, B)
    assert ok is f and bad.height == 0 and REASON_COLUMN in bad.columns


def test_without_reference_column_only_absolute_bounds() -> None:
    ok, bad = split_frame(frame([T0 + 10**10, 0]), B)
    assert ok.height == 1 and bad[REASON_COLUMN].to_list() == [ABSURD]


def test_summary_names_circuits_and_message_time() -> None:
    _, bad = split_frame(frame([T0 + 3_600_000, T0 + 7_200_000], [T0, T0], ["a.1", "b.1"]), B)
    text = summarise(bad, B)
    assert len(text) == 1
    assert text[0].startswith("2 reading(s) refused, ts more than 300 s ahead of the broker time 2026-07-15T02:00:00Z")
    assert "a.1@2026-07-15T03:00:00Z" in text[0] and "b.1@" in text[0]


def test_bounds_from_tariffs_and_config() -> None:
    early = Tariff(id="early", versions=[TariffVersion(effective_from=datetime(2021, 1, 1, tzinfo=UTC),
                                                      prices={"flat": 100})])
    late = Tariff(id="late", versions=[TariffVersion(effective_from=datetime(2025, 1, 1, tzinfo=UTC),
                                                     prices={"flat": 100})])
    b = bounds_for(TimeLimits(), [early, late], {"x": "early", "y": "late"})
    assert b.earliest_ms == int(datetime(2021, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert b.circuit_floor_ms == {"y": int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)}
    assert b.max_future_skew_ms == 300_000
    # a reading of 2023 is fine on the early tariff's circuit, before the start on the late one's
    ts = int(datetime(2023, 6, 1, tzinfo=UTC).timestamp() * 1000)
    ok, bad = split_frame(frame([ts, ts], [T0, T0], ["x", "y"]), b)
    assert ok["circuit_id"].to_list() == ["x"] and bad[REASON_COLUMN].to_list() == [BEFORE_START]
    # the configured earliest wins when later; the skew is configurable
    b = bounds_for(TimeLimits(earliest=datetime(2022, 1, 1, tzinfo=UTC), max_future_skew_s=60), [early])
    assert b.earliest_ms == int(datetime(2022, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert b.max_future_skew_ms == 60_000


def test_portfolio_time_section_is_validated() -> None:
    from pipelines.generate import generate
    from pipelines.portfolio import ConfigError, parse_portfolio

    data = generate(1, 2, seed=1)
    assert parse_portfolio(data).time.max_future_skew_s == 300  # documented default
    data["time"] = {"max_future_skew_s": 30, "earliest": "2026-01-01T00:00:00+08:00"}
    assert parse_portfolio(data).time.max_future_skew_s == 30
    data["time"] = {"max_future_skew_s": -1}
    with pytest.raises(ConfigError, match=r"time\.max_future_skew_s"):
        parse_portfolio(data, "p.yaml")
    data["time"] = {"max_skew": 5}
    with pytest.raises(ConfigError, match=r"time\.max_skew"):
        parse_portfolio(data, "p.yaml")
