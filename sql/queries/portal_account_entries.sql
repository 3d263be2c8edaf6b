-- One account's ledger entries of one billing period (the portal's statements; same columns
-- and order as bills_ledger_period, which reads a whole mall).
-- Params: account_id String, start_ms Int64, end_ms Int64 (UTC epoch ms, half-open).
-- FINAL: a replayed entry must appear once on a statement.
SELECT
    entry_id, account_id, mall_id, kind, amount_minor, balance_after_minor,
    toUnixTimestamp64Milli(ts) AS ts_ms, source_id, meter_id, circuit_id,
    toUnixTimestamp64Milli(interval_start) AS interval_start_ms, energy_wh, tou_period, tier, rate, estimated,
    debt_change_minor
FROM mallwatt.ledger AS l FINAL
WHERE l.account_id = {account_id:String}
  AND l.ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')
  AND l.ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')
ORDER BY ts_ms, entry_id
