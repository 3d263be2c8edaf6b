-- Rollups fed by materialized views.
--
-- A materialized view sees every inserted block, not the deduplicated table, so a
-- replayed row that ReplacingMergeTree later collapses would still be counted twice in
-- a sum(). The two rollups avoid that in two different ways (docs/warehouse.md):
--   readings_15m  keeps only duplicate-insensitive aggregates (min, max, argMin, argMax,
--                 uniqExact): folding the same reading in twice gives the same state.
--   ledger_hourly sums money, which is not duplicate-insensitive, so the sink drops
--                 ledger entries whose entry_id is already stored before inserting
--                 (pipelines.sink_tables.LEDGER_EXISTING), and the insert token drops
--                 a retried block.

-- Per circuit and 15-minute bucket: first/last register (bill register differences,
-- never sums of deltas, so a missing reading loses no energy), extremes, and the number
-- of distinct read timestamps.
CREATE TABLE IF NOT EXISTS mallwatt.readings_15m
(
    mall_id        LowCardinality(String),
    circuit_id     String,
    bucket         DateTime('UTC'),
    account_id     String,
    meter_id       String,
    first_ts       SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_ts        SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    first_import   AggregateFunction(argMin, Float64, DateTime64(3, 'UTC')),
    last_import    AggregateFunction(argMax, Float64, DateTime64(3, 'UTC')),
    max_power_w    SimpleAggregateFunction(max, Nullable(Float64)),
    min_voltage_v  SimpleAggregateFunction(min, Nullable(Float64)),
    max_voltage_v  SimpleAggregateFunction(max, Nullable(Float64)),
    max_current_a  SimpleAggregateFunction(max, Nullable(Float64)),
    samples        AggregateFunction(uniqExact, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
-- meter_id in the key: a meter swap inside a bucket must not subtract one meter's
-- register from another's.
ORDER BY (mall_id, circuit_id, bucket, account_id, meter_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS mallwatt.readings_15m_mv TO mallwatt.readings_15m AS
SELECT
    mall_id,
    circuit_id,
    toStartOfFifteenMinutes(toDateTime(ts, 'UTC')) AS bucket,
    account_id,
    meter_id,
    min(ts) AS first_ts,
    max(ts) AS last_ts,
    argMinState(import_kwh, ts) AS first_import,
    argMaxState(import_kwh, ts) AS last_import,
    max(power_w) AS max_power_w,
    min(voltage_v) AS min_voltage_v,
    max(voltage_v) AS max_voltage_v,
    max(current_a) AS max_current_a,
    uniqExactState(ts) AS samples
FROM mallwatt.readings
GROUP BY mall_id, circuit_id, bucket, account_id, meter_id;

-- Finalized 15-minute rows; kwh_within counts energy between the first and last read of
-- the bucket (clamped at 0 for meter resets). For billing-grade energy over a range use
-- max(last_kwh) - min(first_kwh) per circuit and meter, or lag the previous bucket.
CREATE VIEW IF NOT EXISTS mallwatt.circuit_15m AS
SELECT
    mall_id,
    circuit_id,
    bucket,
    account_id,
    meter_id,
    min(first_ts) AS first_read,
    max(last_ts) AS last_read,
    argMinMerge(first_import) AS first_kwh,
    argMaxMerge(last_import) AS last_kwh,
    greatest(last_kwh - first_kwh, 0) AS kwh_within,
    max(max_power_w) AS peak_power_w,
    min(min_voltage_v) AS low_voltage_v,
    max(max_voltage_v) AS high_voltage_v,
    max(max_current_a) AS peak_current_a,
    uniqExactMerge(samples) AS reads
FROM mallwatt.readings_15m
GROUP BY mall_id, circuit_id, bucket, account_id, meter_id;

-- Money per account, hour (UTC) and entry kind. Hourly, not daily: a day is a local-time
-- notion (malls bill in their own zone), and whole-hour buckets roll up into any
-- whole-hour-offset zone's days at query time (sql/queries/*.sql take a tz parameter).
CREATE TABLE IF NOT EXISTS mallwatt.ledger_hourly
(
    mall_id       LowCardinality(String),
    account_id    String,
    hour          DateTime('UTC'),
    kind          LowCardinality(String),
    amount_minor  SimpleAggregateFunction(sum, Int64),
    energy_wh     SimpleAggregateFunction(sum, Int64),
    entries       SimpleAggregateFunction(sum, UInt64),
    estimated     SimpleAggregateFunction(sum, UInt64),
    last_balance  AggregateFunction(argMax, Int64, Tuple(DateTime64(3, 'UTC'), String))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (mall_id, account_id, hour, kind);

CREATE MATERIALIZED VIEW IF NOT EXISTS mallwatt.ledger_hourly_mv TO mallwatt.ledger_hourly AS
SELECT
    mall_id,
    account_id,
    toStartOfHour(toDateTime(ts, 'UTC')) AS hour,
    kind,
    sum(l.amount_minor) AS amount_minor,
    sum(ifNull(l.energy_wh, 0)) AS energy_wh,
    count() AS entries,
    countIf(l.estimated) AS estimated,
    argMaxState(l.balance_after_minor, (l.ts, l.entry_id)) AS last_balance
FROM mallwatt.ledger AS l
GROUP BY mall_id, account_id, hour, kind;
