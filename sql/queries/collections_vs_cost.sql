-- Purpose: collections (top-ups net of reversals and refunds) against what the energy and
--   the fixed charges cost, per mall, from the ledger_hourly rollup.
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: mall_id String | mall
-- Column: topups_minor Int64 | top-ups credited (minor units)
-- Column: reversals_refunds_minor Int64 | reversals and refunds (negative)
-- Column: collections_minor Int64 | topups + reversals and refunds
-- Column: energy_cost_minor Int64 | energy charges (positive)
-- Column: fixed_cost_minor Int64 | standing charges and shared common-area costs (positive)
-- Column: kwh Float64 | billed energy (kWh)
-- Column: collection_ratio Float64 | collections / (energy + fixed cost); above 1 means prepaid credit grows
-- Column: accounts UInt64 | accounts with ledger entries
-- Source: ledger_hourly (rollup)
-- Watermark: mallwatt.ledger
SELECT
    mall_id,
    sumIf(amount_minor, kind = 'topup') AS topups_minor,
    sumIf(amount_minor, kind IN ('reversal', 'refund')) AS reversals_refunds_minor,
    topups_minor + reversals_refunds_minor AS collections_minor,
    -sumIf(amount_minor, kind = 'charge') AS energy_cost_minor,
    -sumIf(amount_minor, kind IN ('standing_charge', 'shared_cost')) AS fixed_cost_minor,
    round(sumIf(energy_wh, kind = 'charge') / 1000, 3) AS kwh,
    round(collections_minor / nullIf(energy_cost_minor + fixed_cost_minor, 0), 4)
        AS collection_ratio,
    uniqExact(account_id) AS accounts
FROM mallwatt.ledger_hourly
WHERE hour >= toDateTime({from_day:Date}, {tz:String})
  AND hour < toDateTime({to_day:Date} + 1, {tz:String})
  AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
GROUP BY mall_id
ORDER BY mall_id
