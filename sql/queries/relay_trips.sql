-- Purpose: relay trips and reconnections per mall, local day and reason, with how many
--   were confirmed by the meter's read-back (relay_outcomes).
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: day Date | local day of the command
-- Column: mall_id String | mall
-- Column: action String | TRIP or RECONNECT
-- Column: reason String | credit, warning, overload, operator, topup, ...
-- Column: commands UInt64 | commands issued
-- Column: meters UInt64 | distinct meters
-- Column: confirmed UInt64 | commands with a CONFIRMED outcome
-- Column: failed UInt64 | commands with only FAILED or TIMED_OUT outcomes
-- Column: pending UInt64 | commands without any outcome yet
-- Source: relay_commands, relay_outcomes
-- Watermark: mallwatt.relay-commands, mallwatt.relay-outcomes
SELECT
    toDate(c.issued_at, {tz:String}) AS day,
    c.mall_id AS mall_id,
    c.action AS action,
    c.reason AS reason,
    count() AS commands,
    uniqExact(c.meter_id) AS meters,
    countIf(o.confirmed) AS confirmed,
    countIf(o.outcomes > 0 AND NOT o.confirmed) AS failed,
    countIf(o.outcomes = 0) AS pending
FROM (SELECT * FROM mallwatt.relay_commands FINAL
      WHERE issued_at >= toDateTime({from_day:Date}, {tz:String})
        AND issued_at < toDateTime({to_day:Date} + 1, {tz:String})
        AND ({mall_id:String} = '' OR mall_id = {mall_id:String})) AS c
LEFT JOIN
(
    SELECT command_id, count() AS outcomes, countIf(status = 'CONFIRMED') > 0 AS confirmed
    FROM mallwatt.relay_outcomes FINAL
    WHERE {mall_id:String} = '' OR mall_id = {mall_id:String}
    GROUP BY command_id
) AS o ON o.command_id = c.command_id
GROUP BY day, mall_id, action, reason
ORDER BY day, mall_id, action, reason
