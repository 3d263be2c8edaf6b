-- Rollups and views for the analytics catalog (sql/queries/, docs/warehouse.md).
--
-- readings_15m has one row per circuit and 15 minutes, which at 15-minute meter resolution
-- is as many rows as the raw table: too many for portfolio-wide reports over a month. So:
--
--   circuit_daily      one row per circuit and UTC day, the register at the end of every
--                      UTC hour as a 24-entry map. Import registers only grow, so max() per
--                      hour IS the last read of the hour, and max/min/bit-or are
--                      duplicate-insensitive: replays need no care (see 002_rollups.sql).
--                      Whole-hour local days and hours of any zone are derived at query
--                      time (view circuit_hours), so one rollup serves every mall zone.
--   ledger_tou_hourly  billed energy and money per account, hour and TOU period, from the
--                      ledger's charges (summed, so it relies on the sink's entry_id filter
--                      exactly like ledger_hourly).
--
-- These views only see rows inserted after this migration; backfill existing data with
-- infra.warehouse_catalog.backfill_rollups(client).

CREATE TABLE IF NOT EXISTS mallwatt.circuit_daily
(
    mall_id           LowCardinality(String),
    circuit_id        String,
    day               Date,  -- UTC day
    account_id        String,
    meter_id          String,
    collector_id      LowCardinality(String),
    first_ts          SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_ts           SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    -- the smallest register of the day: the base of the first hour when no earlier day exists
    min_kwh           SimpleAggregateFunction(min, Float64),
    -- UTC hour -> largest import register read in that hour (= the last read: registers grow)
    hour_max_kwh      SimpleAggregateFunction(maxMap, Tuple(Array(UInt8), Array(Float64))),
    max_power_w       SimpleAggregateFunction(max, Nullable(Float64)),
    -- UTC hour -> highest power read while the relay was OPEN (a tripped meter drawing power)
    open_max_power_w  SimpleAggregateFunction(maxMap, Tuple(Array(UInt8), Array(Float64))),
    -- bit i set: at least one read in the i-th 15-minute slot of the UTC day (96 slots)
    slots             SimpleAggregateFunction(groupBitOr, UInt128)
)
ENGINE = AggregatingMergeTree
-- One partition per day: day is the third key column, so in monthly parts the rows of one
-- day sit in every granule; reading the open day(s) or the last day (top_consumers) read
-- the whole month (measured at 8,400 circuits: 36 ms for one day against 3 ms by day).
PARTITION BY day
-- meter_id in the key: registers of two meters (a swap) are never compared.
ORDER BY (mall_id, circuit_id, day, account_id, meter_id, collector_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS mallwatt.circuit_daily_mv TO mallwatt.circuit_daily AS
SELECT
    mall_id,
    circuit_id,
    toDate(ts, 'UTC') AS day,
    account_id,
    meter_id,
    collector_id,
    min(ts) AS first_ts,
    max(ts) AS last_ts,
    min(import_kwh) AS min_kwh,
    maxMap([toUInt8(toHour(ts, 'UTC'))], [import_kwh]) AS hour_max_kwh,
    max(power_w) AS max_power_w,
    maxMap(
        if(relay = 'OPEN' AND power_w IS NOT NULL, [toUInt8(toHour(ts, 'UTC'))], []),
        if(relay = 'OPEN' AND power_w IS NOT NULL, [assumeNotNull(power_w)], [])
    ) AS open_max_power_w,
    groupBitOr(bitShiftLeft(toUInt128(1), toUInt8(intDiv(toUnixTimestamp(ts) % 86400, 900)))) AS slots
FROM mallwatt.readings
GROUP BY mall_id, circuit_id, day, account_id, meter_id, collector_id;

CREATE TABLE IF NOT EXISTS mallwatt.ledger_tou_hourly
(
    mall_id       LowCardinality(String),
    account_id    String,
    hour          DateTime('UTC'),  -- hour of the billed interval (ts when it has none)
    tou_period    LowCardinality(String),
    energy_wh     SimpleAggregateFunction(sum, Int64),
    amount_minor  SimpleAggregateFunction(sum, Int64),
    entries       SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (mall_id, account_id, hour, tou_period);

CREATE MATERIALIZED VIEW IF NOT EXISTS mallwatt.ledger_tou_hourly_mv TO mallwatt.ledger_tou_hourly AS
SELECT
    mall_id,
    account_id,
    toStartOfHour(toDateTime(ifNull(l.interval_start, l.ts), 'UTC')) AS hour,
    ifNull(l.tou_period, '') AS tou_period,
    sum(ifNull(l.energy_wh, 0)) AS energy_wh,
    sum(l.amount_minor) AS amount_minor,
    count() AS entries
FROM mallwatt.ledger AS l
WHERE l.kind = 'charge'
GROUP BY mall_id, account_id, hour, tou_period;

-- Energy per circuit and hour in local terms, for local days [from_day, to_day] of zone tz
-- (whole-hour offsets), one row per circuit (and meter and account) with parallel arrays:
--   hour_starts   UTC start of each hour with reads
--   kwh           energy observed in that hour: register at the end of the hour minus the
--                 register at the end of the previous hour with reads (so a gap's energy
--                 lands in the hour after it and nothing is lost); negative (reset) -> 0
--   local_days    local date of each hour;  local_hours  local hour of day (0-23)
-- Two UTC days before from_day are read as the base of the first hours.
-- Measured on chDB: merging the maps with maxMap() costs ~10 us a row (Field-based), a
-- window function per circuit as much again, a sort on (hour, register) tuples a third.
-- So the rows are not merged: each circuit's (hour, register) pairs from every part are
-- flattened, sorted by hour, and the largest register of each hour is kept (a replayed or
-- split day gives the same pairs), all as array work.
-- Call: FROM mallwatt.circuit_hours(tz = 'Asia/Shanghai', from_day = '2026-01-01',
--       to_day = '2026-01-31', mall_id = '')   (mall_id '' = every mall).
CREATE VIEW IF NOT EXISTS mallwatt.circuit_hours AS
SELECT
    mall_id,
    circuit_id,
    account_id,
    meter_id,
    arrayFilter((x, keep) -> keep, starts, inside) AS hour_starts,
    arrayFilter((x, keep) -> keep, all_kwh, inside) AS kwh,
    arrayFilter((x, keep) -> keep, all_local_days, inside) AS local_days,
    arrayFilter((x, keep) -> keep, all_local_hours, inside) AS local_hours
FROM
(
    SELECT
        mall_id,
        circuit_id,
        account_id,
        meter_id,
        arrayFlatten(groupArray(
            arrayMap(h -> toDateTime(day, 'UTC') + toIntervalHour(h), hour_max_kwh.1))) AS raw_starts,
        arrayFlatten(groupArray(hour_max_kwh.2)) AS raw_regs,
        arraySort(raw_starts) AS sorted_starts,
        arraySort((r, t) -> t, raw_regs, raw_starts) AS sorted_regs,
        -- pairs of one hour (from several parts or collectors) are now adjacent: keep the
        -- largest register of each run
        arrayMap((t, i) -> i = 1 OR t != sorted_starts[i - 1],
                 sorted_starts, arrayEnumerate(sorted_starts)) AS first_of_hour,
        arrayFilter((t, keep) -> keep, sorted_starts, first_of_hour) AS starts,
        arrayMap(run -> arrayMax(run), arraySplit((r, s) -> s, sorted_regs, first_of_hour)) AS regs,
        groupArray(day) AS days,
        groupArray(min_kwh) AS day_mins,
        arrayMin(arrayFilter((m, d) -> d = arrayMin(days), day_mins, days)) AS base,
        arrayMap(x -> greatest(x, 0), arrayPopFront(arrayDifference(arrayPushFront(regs, base))))
            AS all_kwh,
        arrayMap(t -> toDate(t, {tz:String}), starts) AS all_local_days,
        arrayMap(t -> toHour(t, {tz:String}), starts) AS all_local_hours,
        arrayMap(d -> d >= {from_day:Date} AND d <= {to_day:Date}, all_local_days) AS inside
    FROM mallwatt.circuit_daily
    WHERE day BETWEEN {from_day:Date} - 2 AND {to_day:Date} + 1
      AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    GROUP BY mall_id, circuit_id, account_id, meter_id
)
WHERE notEmpty(kwh);

-- Energy per circuit and LOCAL DAY for [from_day, to_day] of zone tz: the same register
-- differences as circuit_hours at day resolution, with two pairs per UTC-day row instead of
-- up to 24 (the register at the local midnight that falls inside the UTC day, and at the
-- end of the UTC day), so month-long portfolio reports stay fast. Columns: mall_id,
-- circuit_id, account_id, meter_id, local_days Array(Date), kwh Array(Float64).
CREATE VIEW IF NOT EXISTS mallwatt.circuit_days AS
SELECT
    mall_id,
    circuit_id,
    account_id,
    meter_id,
    arrayFilter((x, keep) -> keep, all_local_days, inside) AS local_days,
    arrayFilter((x, keep) -> keep, all_kwh, inside) AS kwh
FROM
(
    SELECT
        mall_id,
        circuit_id,
        account_id,
        meter_id,
        arrayFlatten(groupArray(row_instants)) AS raw_instants,
        arrayFlatten(groupArray(row_regs)) AS raw_regs,
        arraySort(raw_instants) AS sorted_instants,
        arraySort((r, t) -> t, raw_regs, raw_instants) AS sorted_regs,
        arrayMap((t, i) -> i = 1 OR t != sorted_instants[i - 1],
                 sorted_instants, arrayEnumerate(sorted_instants)) AS first_of_instant,
        arrayFilter((t, keep) -> keep, sorted_instants, first_of_instant) AS instants,
        arrayMap(run -> arrayMax(run), arraySplit((r, s) -> s, sorted_regs, first_of_instant)) AS regs,
        groupArray(day) AS days,
        groupArray(min_kwh) AS day_mins,
        arrayMin(arrayFilter((m, d) -> d = arrayMin(days), day_mins, days)) AS base,
        arrayMap(x -> greatest(x, 0), arrayPopFront(arrayDifference(arrayPushFront(regs, base))))
            AS all_kwh,
        -- energy up to an instant belongs to the local day just before it
        arrayMap(t -> toDate(t - 1, {tz:String}), instants) AS all_local_days,
        arrayMap(d -> d >= {from_day:Date} AND d <= {to_day:Date}, all_local_days) AS inside
    FROM
    (
        SELECT
            mall_id,
            circuit_id,
            account_id,
            meter_id,
            day,
            min_kwh,
            toDateTime(day, 'UTC') AS day_start,
            -- the local midnight inside this UTC day (its start for UTC itself)
            toDateTime(toDate(day_start + 86399, {tz:String}), {tz:String}) AS midnight,
            toUInt8(intDiv(toUInt32(midnight) - toUInt32(day_start), 3600)) AS midnight_hour,
            arrayFilter((r, h) -> h < midnight_hour, hour_max_kwh.2, hour_max_kwh.1) AS before_midnight,
            if(empty(before_midnight), [day_start + 86400],
               [toDateTime(midnight, 'UTC'), day_start + 86400]) AS row_instants,
            if(empty(before_midnight), [arrayMax(hour_max_kwh.2)],
               [arrayMax(before_midnight), arrayMax(hour_max_kwh.2)]) AS row_regs
        FROM mallwatt.circuit_daily
        WHERE day BETWEEN {from_day:Date} - 2 AND {to_day:Date} + 1
          AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    )
    GROUP BY mall_id, circuit_id, account_id, meter_id
)
WHERE notEmpty(kwh);
