-- Accounts with the most metered energy in [start, end), from the readings_15m rollup.
-- Energy per circuit and meter is a register difference (last read - first read in the
-- range), so missing readings lose nothing; a negative difference (meter reset) counts 0.
-- Params: start DateTime64(3, 'UTC'), end DateTime64(3, 'UTC'), mall_id String ('' = all),
--         limit UInt32.
SELECT
    mall_id,
    account_id,
    round(sum(kwh), 3) AS kwh,
    count() AS circuits,
    max(peak_w) AS peak_power_w
FROM
(
    SELECT
        mall_id,
        account_id,
        circuit_id,
        meter_id,
        greatest(argMaxMerge(last_import) - argMinMerge(first_import), 0) AS kwh,
        max(max_power_w) AS peak_w
    FROM mallwatt.readings_15m
    WHERE bucket >= toStartOfFifteenMinutes({start:DateTime64(3, 'UTC')})
      AND bucket < {end:DateTime64(3, 'UTC')}
      AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    GROUP BY mall_id, account_id, circuit_id, meter_id
)
GROUP BY mall_id, account_id
ORDER BY kwh DESC, account_id
LIMIT {limit:UInt32}
