-- Billed energy as the one source of energy (issue 13): the core's interval facts
-- (mallwatt.intervals, IntervalBatch) are stored as they were billed, with their flags, and
-- every energy figure of the catalog reads them instead of register differences of raw
-- readings (which ignored rollover, resets, meter swaps and spikes). The ledger gets the
-- debt column of LedgerEntry writer version 2.

ALTER TABLE mallwatt.ledger ADD COLUMN IF NOT EXISTS debt_change_minor Nullable(Int64) AFTER estimated;

-- One row per billed interval (start < end) and per reading billing refused as late or spike
-- (marker rows: start_ts = end_ts, 0 Wh). (circuit_id, end_ts, start_ts) is the identity: a fact
-- re-published after a crash has the same values, so ReplacingMergeTree keeps one.
-- billed_total_wh is the circuit's billed energy after the interval: a counter that never
-- wraps or resets, so the hourly rollup below stores only maxima and minima of it
-- (duplicate-insensitive, like circuit_daily over registers).
CREATE TABLE IF NOT EXISTS mallwatt.interval_energy
(
    mall_id          LowCardinality(String),
    circuit_id       String,
    end_ts            DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    start_ts          DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    account_id       String,
    meter_id         String,
    energy_wh        Int64 CODEC(T64, ZSTD(1)),
    billed_total_wh  Int64 CODEC(Delta, ZSTD(1)),
    estimated        Bool,
    flag             LowCardinality(String),  -- '', rollover, reset, replaced, rebaseline; late, spike (markers)
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(DoubleDelta, ZSTD(1))
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(end_ts)
ORDER BY (mall_id, circuit_id, end_ts, start_ts)
SETTINGS non_replicated_deduplication_window = 1000;

-- Per circuit, account, meter and UTC day of the billed intervals: the billed total at the
-- end of every UTC hour (an interval belongs to the hour of its last millisecond, end - 1 ms,
-- as in the tariff: (09:45, 10:00] is hour 9) and the smallest total at an interval's start
-- (the base of the first hour when no earlier day exists). Energy of hour h = total at the
-- end of h - total at the end of the previous hour with intervals: exactly the billed Wh.
CREATE TABLE IF NOT EXISTS mallwatt.billed_daily
(
    mall_id       LowCardinality(String),
    circuit_id    String,
    day           Date,  -- UTC day
    account_id    String,
    meter_id      String,
    min_kwh       SimpleAggregateFunction(min, Float64),
    hour_max_kwh  SimpleAggregateFunction(maxMap, Tuple(Array(UInt8), Array(Float64)))
)
ENGINE = AggregatingMergeTree
PARTITION BY day
ORDER BY (mall_id, circuit_id, day, account_id, meter_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS mallwatt.billed_daily_mv TO mallwatt.billed_daily AS
SELECT
    mall_id, circuit_id, day, account_id, meter_id,
    min(h_min) AS min_kwh,
    (arraySort(groupArray(hour)), arraySort((v, h) -> h, groupArray(h_max), groupArray(hour))) AS hour_max_kwh
FROM
(
    SELECT
        mall_id, circuit_id, account_id, meter_id,
        toDate(end_ts - toIntervalMillisecond(1), 'UTC') AS day,
        toUInt8(toHour(end_ts - toIntervalMillisecond(1), 'UTC')) AS hour,
        min(billed_total_wh - energy_wh) / 1000 AS h_min,
        max(billed_total_wh) / 1000 AS h_max
    FROM mallwatt.interval_energy
    WHERE start_ts < end_ts
    GROUP BY mall_id, circuit_id, account_id, meter_id, day, hour
)
GROUP BY mall_id, circuit_id, day, account_id, meter_id;

-- Closed days of billed energy: same shape as circuit_hour_kwh (24 UTC hours), written by
-- close_days() once the intervals watermark passed a day.
CREATE TABLE IF NOT EXISTS mallwatt.billed_hour_kwh
(
    mall_id     LowCardinality(String),
    circuit_id  String,
    day         Date,
    account_id  String,
    meter_id    String,
    kwh         Array(Float32) CODEC(LZ4),
    last_kwh    Float64,  -- billed total at the end of the day: the next day's base
    closed_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(closed_at)
PARTITION BY day
ORDER BY (mall_id, circuit_id, day, account_id, meter_id);

CREATE TABLE IF NOT EXISTS mallwatt.billed_hour_kwh_closed
(
    through    Date,
    closed_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY through;

-- circuit_hour_kwh_live of migration 006 over the billed totals: the same derivation, the
-- billed total in place of the register (it never goes down, so no energy is clamped).
CREATE VIEW IF NOT EXISTS mallwatt.billed_hour_kwh_live AS
WITH
    ifNull((SELECT max(through) FROM mallwatt.billed_hour_kwh_closed), toDate(0)) AS done,
    if({open_only:UInt8} = 1, greatest({from_day:Date}, done + 1), {from_day:Date}) AS lo,
    least({to_day:Date}, ifNull((SELECT max(day) FROM mallwatt.billed_daily), toDate(0))) AS hi,
    lo - 1 <= done AS base_closed
SELECT mall_id, circuit_id, day, account_id, meter_id,
       arraySlice(energies, (k - 1) * 24 + 1, 24) AS kwh,
       filled[k * 24 + 1] AS last_kwh
FROM
(
    SELECT
        mall_id,
        circuit_id,
        account_id,
        meter_id,
        arraySort(groupUniqArrayIf(d, d >= lo)) AS days,
        maxForEachIf(
            arrayConcat(
                arrayResize(CAST([], 'Array(Float64)'), toUInt32(greatest(d, lo) - lo) * 24, -1.),
                dense,
                arrayResize(CAST([], 'Array(Float64)'),
                            toUInt32(greatest(hi, greatest(d, lo)) - greatest(d, lo)) * 24, -1.)),
            d >= lo) AS flat,
        if(countIf(d < lo) > 0, argMaxIf(last_reg, base_key, d < lo), minIf(min_kwh, d >= lo)) AS base,
        arrayFill(x -> x >= 0, arrayPushFront(flat, base)) AS filled,
        arrayMap(x -> greatest(x, 0), arrayPopFront(arrayDifference(filled))) AS energies
    FROM
    (
        SELECT mall_id, circuit_id, account_id, meter_id, day AS d, min_kwh,
            arrayMap(i -> if(i = 0, -1., hour_max_kwh.2[i]),
                     arrayMap(h -> indexOf(hour_max_kwh.1, h), range(toUInt8(24)))) AS dense,
            hour_max_kwh.2[-1] AS last_reg,
            bitShiftLeft(toUInt64(d) * 24 + hour_max_kwh.1[-1], 42)
                + toUInt64(greatest(last_reg, 0) * 1000) AS base_key
        FROM mallwatt.billed_daily
        WHERE day BETWEEN if(base_closed, lo, lo - 2) AND hi
          AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
        UNION ALL
        SELECT mall_id, circuit_id, account_id, meter_id, day AS d, 0. AS min_kwh,
            CAST([], 'Array(Float64)') AS dense, last_kwh AS last_reg,
            bitShiftLeft(toUInt64(d) * 24 + 23, 42) + toUInt64(toUnixTimestamp64Milli(closed_at)) AS base_key
        FROM mallwatt.billed_hour_kwh
        WHERE base_closed AND day BETWEEN lo - 2 AND lo - 1
          AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    )
    GROUP BY mall_id, circuit_id, account_id, meter_id
    HAVING notEmpty(days)
)
ARRAY JOIN days AS day, arrayMap(x -> toUInt32(x - lo) + 1, days) AS k
WHERE day BETWEEN {from_day:Date} AND {to_day:Date};

-- The energy every catalog query reads (through circuit_local_days / _hours / _totals): billed
-- energy per circuit and UTC day, closed days from billed_hour_kwh, later ones derived from
-- billed_daily. Same columns as in 006, so the local-day views are unchanged.
CREATE OR REPLACE VIEW mallwatt.circuit_hour_energy AS
SELECT mall_id, circuit_id, day, account_id, meter_id, kwh
FROM mallwatt.billed_hour_kwh FINAL
WHERE day BETWEEN {from_day:Date} AND {to_day:Date}
  AND day <= (SELECT max(through) FROM mallwatt.billed_hour_kwh_closed)
  AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
UNION ALL
SELECT mall_id, circuit_id, day, account_id, meter_id, kwh
FROM mallwatt.billed_hour_kwh_live(from_day = {from_day:Date}, to_day = {to_day:Date},
                                   mall_id = {mall_id:String}, open_only = 1);
