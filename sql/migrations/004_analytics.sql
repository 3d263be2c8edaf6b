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
PARTITION BY toYYYYMM(day)
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
-- (whole-hour offsets), one row per circuit and UTC day:
--   hours/kwh            UTC hours with reads and the energy observed in each: register at
--                        the end of the hour minus the register at the end of the previous
--                        hour with reads (across days; a gap's energy lands in the hour
--                        after it, so no energy is lost); negative (meter reset) -> 0.
--   local_days/hours     the local date and hour of each of those hours.
-- The two extra UTC days read before from_day are the base of the first hours.
-- Call: FROM mallwatt.circuit_hours(tz = 'Asia/Shanghai', from_day = '2026-01-01',
--       to_day = '2026-01-31', mall_id = '')   (mall_id '' = every mall).
CREATE VIEW IF NOT EXISTS mallwatt.circuit_hours AS
SELECT
    mall_id,
    circuit_id,
    account_id,
    meter_id,
    day,
    arrayFilter((x, keep) -> keep, all_hours, inside) AS hours,
    arrayFilter((x, keep) -> keep, all_kwh, inside) AS kwh,
    arrayFilter((x, keep) -> keep, all_local_days, inside) AS local_days,
    arrayFilter((x, keep) -> keep, all_local_hours, inside) AS local_hours,
    max_power_w,
    open_power,
    slots
FROM
(
    SELECT
        *,
        arrayMap(h -> toDateTime(day, 'UTC') + toIntervalHour(h), all_hours) AS instants,
        arrayMap(t -> toDate(t, {tz:String}), instants) AS all_local_days,
        arrayMap(t -> toHour(t, {tz:String}), instants) AS all_local_hours,
        arrayMap(d -> d >= {from_day:Date} AND d <= {to_day:Date}, all_local_days) AS inside,
        arrayMap((r, p) -> greatest(r - p, 0), all_regs,
                 arrayPushFront(arrayPopBack(all_regs), ifNull(prev_reg, min_kwh))) AS all_kwh
    FROM
    (
        SELECT
            *,
            lagInFrame(toNullable(all_regs[-1])) OVER (
                PARTITION BY circuit_id, meter_id ORDER BY day, account_id
                ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS prev_reg
        FROM
        (
            SELECT
                mall_id,
                circuit_id,
                account_id,
                meter_id,
                day,
                maxMap(hour_max_kwh) AS regs_by_hour,
                regs_by_hour.1 AS all_hours,
                regs_by_hour.2 AS all_regs,
                min(min_kwh) AS min_kwh,
                max(c.max_power_w) AS max_power_w,
                maxMap(open_max_power_w) AS open_power,
                groupBitOr(c.slots) AS slots
            FROM mallwatt.circuit_daily AS c
            WHERE day BETWEEN {from_day:Date} - 2 AND {to_day:Date} + 1
              AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
            GROUP BY mall_id, circuit_id, account_id, meter_id, day
        )
    )
)
WHERE notEmpty(hours);
