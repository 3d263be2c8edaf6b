-- Purpose: sudden baseline shifts: accounts whose mean daily energy over the last
--   recent_days of the range differs from their mean daily energy over the days before it
--   by at least a factor (up: a new load or a fault; down: a meter or circuit gone quiet).
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day of the baseline
-- Param: to_day Date | last local day (inclusive); the recent window ends here (no rows unless the range is longer than recent_days)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: recent_days UInt16 = 3 | length of the recent window (days)
-- Param: factor Float64 = 2.0 | flag when recent/baseline >= factor or <= 1/factor
-- Param: min_kwh Float64 = 1.0 | ignore accounts below this mean daily energy in both windows
-- Column: mall_id String | mall
-- Column: account_id String | account
-- Column: name String | merchant name
-- Column: baseline_kwh_day Float64 | mean daily energy before the recent window (kWh)
-- Column: recent_kwh_day Float64 | mean daily energy in the recent window (kWh)
-- Column: ratio Float64 | recent / baseline (inf when the baseline is 0)
-- Column: direction String | up or down
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts
-- Watermark: mallwatt.intervals
SELECT
    e.mall_id AS mall_id,
    e.account_id AS account_id,
    a.name AS name,
    round(e.baseline, 3) AS baseline_kwh_day,
    round(e.recent, 3) AS recent_kwh_day,
    round(if(e.baseline > 0, e.recent / e.baseline, inf), 4) AS ratio,
    if(e.recent > e.baseline, 'up', 'down') AS direction
FROM
(
    SELECT
        mall_id,
        account_id,
        sumIf(kwh, day > {to_day:Date} - {recent_days:UInt16}) / {recent_days:UInt16} AS recent,
        sumIf(kwh, day <= {to_day:Date} - {recent_days:UInt16})
            / greatest(dateDiff('day', {from_day:Date}, {to_day:Date}) + 1 - {recent_days:UInt16}, 1)
            AS baseline
    FROM mallwatt.circuit_local_days(tz = {tz:String}, from_day = {from_day:Date},
                                     to_day = {to_day:Date}, mall_id = {mall_id:String})
    -- a range not longer than the recent window has no baseline: no rows
    WHERE dateDiff('day', {from_day:Date}, {to_day:Date}) + 1 > {recent_days:UInt16}
    GROUP BY mall_id, account_id
) AS e
LEFT JOIN (SELECT account_id, name FROM mallwatt.dim_accounts FINAL) AS a
    ON a.account_id = e.account_id
WHERE greatest(e.recent, e.baseline) >= {min_kwh:Float64}
  AND (e.recent >= e.baseline * {factor:Float64} OR e.recent * {factor:Float64} <= e.baseline)
ORDER BY abs(log(greatest(e.recent, 1e-9) / greatest(e.baseline, 1e-9))) DESC, account_id
