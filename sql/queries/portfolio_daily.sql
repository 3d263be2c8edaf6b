-- Billed kWh and money per mall and local day, from the ledger_hourly rollup.
-- Params: tz String (the malls' zone, e.g. 'Asia/Shanghai'; whole-hour offsets only),
--         from_day Date, to_day Date (inclusive, local days).
-- Money in minor units; charges are the consumption debits shown positive.
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
