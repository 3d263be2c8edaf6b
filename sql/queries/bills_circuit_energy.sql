-- Billed Wh per circuit over a period, from the interval facts (mallwatt.interval_energy):
-- exactly the energy billing charged (rollover, resets, meter swaps, spikes and late readings
-- as the core handled them). An interval belongs to the period that holds its end (one ending
-- at midnight to the day before, like its hour in billed_daily).
-- Params: start_ms Int64, end_ms Int64 (UTC epoch ms, half-open), mall_id String ('' = all).
-- FINAL: a re-published fact counts once.
SELECT circuit_id, toInt64(sum(energy_wh)) AS wh
FROM mallwatt.interval_energy FINAL
WHERE end_ts > fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')
  AND end_ts <= fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')
  AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
GROUP BY circuit_id
ORDER BY circuit_id
