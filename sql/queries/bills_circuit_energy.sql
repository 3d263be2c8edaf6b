-- Metered Wh per circuit over a period from the 15-minute rollup: register difference per
-- (circuit, meter) so a meter swap never subtracts two meters; resets clamp at 0.
-- Params: start_ms Int64, end_ms Int64 (UTC epoch ms, half-open), mall_id String ('' = all).
SELECT circuit_id, toInt64(sum(wh)) AS wh
FROM
(
    SELECT circuit_id, meter_id, round(greatest(max(last_kwh) - min(first_kwh), 0) * 1000) AS wh
    FROM mallwatt.circuit_15m
    WHERE bucket >= toDateTime(intDiv({start_ms:Int64}, 1000), 'UTC')
      AND bucket < toDateTime(intDiv({end_ms:Int64}, 1000), 'UTC')
      AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    GROUP BY circuit_id, meter_id
)
GROUP BY circuit_id
ORDER BY circuit_id
