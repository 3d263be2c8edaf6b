-- Purpose: billed energy per time-of-use period (sharp, peak, flat, valley, deep valley)
--   and its share, per mall, from the ledger's charges (ledger_tou_hourly rollup).
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: mall_id String | mall
-- Column: tou_period String | TOU period of the billed intervals ('' when untagged)
-- Column: kwh Float64 | billed energy (kWh)
-- Column: share Float64 | share of the mall's billed energy (sums to 1 per mall)
-- Column: charges_minor Int64 | energy charges in minor units (positive)
-- Column: avg_price_minor_per_kwh Float64 | charges_minor / kwh
-- Source: ledger_tou_hourly (rollup)
-- Watermark: mallwatt.ledger
SELECT
    mall_id,
    tou_period,
    round(sum(energy_wh) / 1000, 3) AS kwh,
    sum(energy_wh) / sum(sum(energy_wh)) OVER (PARTITION BY mall_id) AS share,
    -sum(amount_minor) AS charges_minor,
    round(if(sum(energy_wh) > 0, -sum(amount_minor) / (sum(energy_wh) / 1000), 0), 4)
        AS avg_price_minor_per_kwh
FROM mallwatt.ledger_tou_hourly
WHERE hour >= toDateTime({from_day:Date}, {tz:String})
  AND hour < toDateTime({to_day:Date} + 1, {tz:String})
  AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
GROUP BY mall_id, tou_period
HAVING sum(energy_wh) != 0
ORDER BY mall_id, indexOf(['sharp', 'peak', 'flat', 'valley', 'deep_valley'], tou_period) = 0,
         indexOf(['sharp', 'peak', 'flat', 'valley', 'deep_valley'], tou_period), tou_period
