-- Purpose: billed kWh and money per mall and local day, from the ledger_hourly rollup.
--   Money in minor units; charges are the consumption debits shown positive.
-- Param: tz String = Asia/Shanghai | the malls' zone (whole-hour offsets only)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Column: mall_id String | mall
-- Column: day Date | local day
-- Column: kwh Float64 | billed energy (kWh)
-- Column: charges_minor Int64 | energy, standing and shared charges (positive)
-- Column: topups_minor Int64 | top-ups
-- Column: net_minor Int64 | sum of all ledger amounts
-- Column: entries UInt64 | ledger entries
-- Column: accounts UInt64 | accounts with entries
-- Source: ledger_hourly (rollup)
-- Watermark: mallwatt.ledger
SELECT
    mall_id,
    toDate(hour, {tz:String}) AS day,
    round(sumIf(energy_wh, kind = 'charge') / 1000, 3) AS kwh,
    -sumIf(amount_minor, kind IN ('charge', 'standing_charge', 'shared_cost')) AS charges_minor,
    sumIf(amount_minor, kind = 'topup') AS topups_minor,
    sum(amount_minor) AS net_minor,
    sum(entries) AS entries,
    uniqExact(account_id) AS accounts
FROM mallwatt.ledger_hourly
WHERE hour >= toDateTime({from_day:Date}, {tz:String})
  AND hour < toDateTime({to_day:Date} + 1, {tz:String})
GROUP BY mall_id, day
ORDER BY mall_id, day
