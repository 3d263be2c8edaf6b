-- Purpose: alerts per mall, local day, kind and severity (low balance, trips, overloads,
--   collector and meter faults); the alerts table is small, read with FINAL.
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: day Date | local day
-- Column: mall_id String | mall
-- Column: kind String | alert kind
-- Column: severity String | INFO, WARNING or CRITICAL
-- Column: alerts UInt64 | alerts
-- Column: accounts UInt64 | distinct accounts alerted
-- Source: alerts
-- Watermark: mallwatt.alerts
SELECT
    toDate(ts, {tz:String}) AS day,
    mall_id,
    kind,
    severity,
    count() AS alerts,
    uniqExact(account_id) AS accounts
FROM mallwatt.alerts FINAL
WHERE ts >= toDateTime({from_day:Date}, {tz:String})
  AND ts < toDateTime({to_day:Date} + 1, {tz:String})
  AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
GROUP BY day, mall_id, kind, severity
ORDER BY day, mall_id, kind, severity
