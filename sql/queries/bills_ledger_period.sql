-- Ledger entries of one billing period, for statements and allocations (pipelines.bills).
-- Params: start_ms Int64, end_ms Int64 (UTC epoch ms, half-open), mall_id String ('' = all).
-- FINAL: a replayed entry must appear once on a bill.
SELECT
    entry_id, account_id, mall_id, kind, amount_minor, balance_after_minor,
    toUnixTimestamp64Milli(ts) AS ts_ms, source_id, meter_id, circuit_id,
    toUnixTimestamp64Milli(interval_start) AS interval_start_ms, energy_wh, tou_period, tier, rate, estimated,
    debt_change_minor
FROM mallwatt.ledger AS l FINAL
WHERE l.ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')
  AND l.ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')
  AND ({mall_id:String} = '' OR l.mall_id = {mall_id:String})
ORDER BY account_id, ts_ms, entry_id
