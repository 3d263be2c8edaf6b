-- Purpose: accounts with the most metered energy in [start, end) at 15-minute resolution,
--   from the readings_15m rollup (for short windows; use top_movers for days and months).
--   Energy per circuit and meter is a register difference (last read - first read in the
--   range), so missing readings lose nothing; a negative difference (meter reset) counts 0.
-- Param: start DateTime64(3, 'UTC') | start instant (UTC)
-- Param: end DateTime64(3, 'UTC') | end instant (UTC, exclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: limit UInt32 = 10 | rows returned
-- Column: mall_id String | mall
-- Column: account_id String | account
-- Column: kwh Float64 | energy (kWh)
-- Column: circuits UInt64 | circuits of the account with reads
-- Column: peak_power_w Float64 | highest power read (W)
-- Source: readings_15m (rollup)
-- Watermark: mallwatt.readings
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
