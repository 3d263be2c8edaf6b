-- Cheaper readings rollups, for the sink's 500k rows/s target (docs/warehouse.md, benchmark).
--
-- Measured on the 2-core box (one day of 3,500 circuits per insert): the raw table alone
-- takes ~600k rows per CPU-second, with the 002/004 views ~95k. The cost was in the views:
--   readings_15m_mv    one group per read at 15-minute resolution, each with argMin/argMax
--                      states and a uniqExact hash set;
--   circuit_daily_mv   maxMap over a one-element array per read (Field-based, ~us a row).
-- Both are replaced here by views that only use native min/max/groupArray work, with the
-- same duplicate-insensitive guarantees (a replayed read folds into the same values).

-- readings_15m_v2: the 15-minute rollup with plain SimpleAggregateFunction columns.
--   first_kwh / last_kwh  smallest / largest import register of the bucket: registers only
--                         grow, so they ARE the first and last reads (as in circuit_daily);
--                         a reset inside one bucket reads as max - min instead of 0.
--   read_seconds          distinct second-of-bucket offsets (0..899) with a read: the read
--                         count is its length (replaces uniqExact(ts); reads in the same
--                         second count once).
-- The old readings_15m keeps its data but is no longer fed (its view is dropped below);
-- circuit_15m reads the new table.
CREATE TABLE IF NOT EXISTS mallwatt.readings_15m_v2
(
    mall_id        LowCardinality(String),
    circuit_id     String,
    bucket         DateTime('UTC'),
    account_id     String,
    meter_id       String,
    first_ts       SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_ts        SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    first_kwh      SimpleAggregateFunction(min, Float64),
    last_kwh       SimpleAggregateFunction(max, Float64),
    max_power_w    SimpleAggregateFunction(max, Nullable(Float64)),
    min_voltage_v  SimpleAggregateFunction(min, Nullable(Float64)),
    max_voltage_v  SimpleAggregateFunction(max, Nullable(Float64)),
    max_current_a  SimpleAggregateFunction(max, Nullable(Float64)),
    read_seconds   SimpleAggregateFunction(groupUniqArrayArray, Array(UInt16))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (mall_id, circuit_id, bucket, account_id, meter_id);

DROP VIEW IF EXISTS mallwatt.readings_15m_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS mallwatt.readings_15m_v2_mv TO mallwatt.readings_15m_v2 AS
SELECT mall_id, circuit_id, toStartOfFifteenMinutes(toDateTime(ts, 'UTC')) AS bucket, account_id, meter_id,
    ts AS first_ts, ts AS last_ts, import_kwh AS first_kwh, import_kwh AS last_kwh, power_w AS max_power_w,
    voltage_v AS min_voltage_v, voltage_v AS max_voltage_v, current_a AS max_current_a,
    [toUInt16(toUnixTimestamp(ts) % 900)] AS read_seconds
FROM mallwatt.readings;

-- Data migration (re-running it is harmless: every column is duplicate-insensitive).
-- Buckets the raw table still holds are rebuilt from it exactly; older ones (past the raw
-- retention) come from the old rollup, whose uniqExact state cannot be expanded back into
-- seconds: they get the offsets 0..reads-1, which keeps their read count.
INSERT INTO mallwatt.readings_15m_v2
SELECT
    mall_id, circuit_id, toStartOfFifteenMinutes(toDateTime(ts, 'UTC')) AS bucket, account_id,
    meter_id, min(ts), max(ts), min(import_kwh), max(import_kwh), max(power_w),
    min(voltage_v), max(voltage_v), max(current_a),
    groupUniqArray(toUInt16(toUnixTimestamp(ts) % 900))
FROM mallwatt.readings
GROUP BY mall_id, circuit_id, bucket, account_id, meter_id;

INSERT INTO mallwatt.readings_15m_v2
SELECT
    mall_id, circuit_id, bucket, account_id, meter_id, min(first_ts), max(last_ts),
    argMinMerge(first_import), argMaxMerge(last_import), max(max_power_w),
    min(min_voltage_v), max(max_voltage_v), max(max_current_a),
    arrayMap(i -> toUInt16(i), range(toUInt32(least(uniqExactMerge(samples), 900))))
FROM mallwatt.readings_15m
WHERE bucket < (SELECT ifNull(min(toStartOfFifteenMinutes(toDateTime(ts, 'UTC'))), toDateTime(0, 'UTC'))
                FROM mallwatt.readings)
GROUP BY mall_id, circuit_id, bucket, account_id, meter_id;

-- Same columns as before (bills_* and ad-hoc queries keep working); reads = distinct seconds.
CREATE OR REPLACE VIEW mallwatt.circuit_15m AS
SELECT
    mall_id,
    circuit_id,
    bucket,
    account_id,
    meter_id,
    min(first_ts) AS first_read,
    max(last_ts) AS last_read,
    min(first_kwh) AS first_kwh,
    max(last_kwh) AS last_kwh,
    greatest(last_kwh - first_kwh, 0) AS kwh_within,
    max(max_power_w) AS peak_power_w,
    min(min_voltage_v) AS low_voltage_v,
    max(max_voltage_v) AS high_voltage_v,
    max(max_current_a) AS peak_current_a,
    toUInt64(length(groupUniqArrayArray(read_seconds))) AS reads
FROM mallwatt.readings_15m_v2
GROUP BY mall_id, circuit_id, bucket, account_id, meter_id;

-- circuit_daily, same table and values, fed in two steps: per hour with native aggregates
-- (max register, max power, the hour's slot bits), then one short array per circuit and day
-- (sorted by hour) instead of a maxMap over one-element arrays per read.
CREATE MATERIALIZED VIEW IF NOT EXISTS mallwatt.circuit_daily_v2_mv TO mallwatt.circuit_daily AS
SELECT
    mall_id,
    circuit_id,
    day,
    account_id,
    meter_id,
    collector_id,
    min(h_first) AS first_ts,
    max(h_last) AS last_ts,
    min(h_min) AS min_kwh,
    (arraySort(groupArray(hour)), arraySort((v, h) -> h, groupArray(h_max), groupArray(hour)))
        AS hour_max_kwh,
    max(h_power) AS max_power_w,
    (arraySort(groupArrayIf(hour, h_open > 0)),
     arraySort((v, h) -> h, groupArrayIf(h_open_max, h_open > 0), groupArrayIf(hour, h_open > 0)))
        AS open_max_power_w,
    groupBitOr(h_slots) AS slots
FROM
(
    SELECT
        mall_id,
        circuit_id,
        toDate(ts, 'UTC') AS day,
        account_id,
        meter_id,
        collector_id,
        toUInt8(toHour(ts, 'UTC')) AS hour,
        min(ts) AS h_first,
        max(ts) AS h_last,
        min(import_kwh) AS h_min,
        max(import_kwh) AS h_max,
        max(power_w) AS h_power,
        countIf(relay = 'OPEN' AND power_w IS NOT NULL) AS h_open,
        maxIf(assumeNotNull(power_w), relay = 'OPEN' AND power_w IS NOT NULL) AS h_open_max,
        groupBitOr(bitShiftLeft(toUInt128(1), toUInt8(intDiv(toUnixTimestamp(ts) % 86400, 900))))
            AS h_slots
    FROM mallwatt.readings
    GROUP BY mall_id, circuit_id, day, account_id, meter_id, collector_id, hour
)
GROUP BY mall_id, circuit_id, day, account_id, meter_id, collector_id;

DROP VIEW IF EXISTS mallwatt.circuit_daily_mv;
