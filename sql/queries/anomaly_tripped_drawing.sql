-- Purpose: tripped meters still drawing power: hours in which a meter read its relay OPEN
--   and reported power above a threshold (a bypass, a failed relay or a wrong read-back).
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: threshold_w Float64 = 50 | power above this with the relay open is an alarm (W)
-- Column: mall_id String | mall
-- Column: circuit_id String | circuit
-- Column: meter_id String | meter
-- Column: account_id String | account
-- Column: hour DateTime64(0, 'UTC') | start of the hour (UTC)
-- Column: local_hour DateTime64(0) | the same hour in tz
-- Column: max_power_w Float64 | highest power read with the relay open in that hour (W)
-- Source: circuit_daily (rollup)
-- Watermark: mallwatt.readings
SELECT
    mall_id,
    circuit_id,
    meter_id,
    account_id,
    -- DateTime64: Arrow carries plain DateTime as a bare integer
    toDateTime64(toDateTime(day, 'UTC') + toIntervalHour(h), 0, 'UTC') AS hour,
    toTimeZone(hour, {tz:String}) AS local_hour,
    p AS max_power_w
FROM
(
    SELECT mall_id, circuit_id, meter_id, account_id, day, maxMap(open_max_power_w) AS open_power
    FROM mallwatt.circuit_daily
    WHERE day BETWEEN {from_day:Date} - 1 AND {to_day:Date} + 1
      AND notEmpty(open_max_power_w.1)
      AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    GROUP BY mall_id, circuit_id, meter_id, account_id, day
)
ARRAY JOIN open_power.1 AS h, open_power.2 AS p
WHERE p > {threshold_w:Float64}
  AND toDate(hour, {tz:String}) BETWEEN {from_day:Date} AND {to_day:Date}
ORDER BY hour, mall_id, circuit_id
