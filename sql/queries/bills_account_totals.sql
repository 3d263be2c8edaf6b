-- Per account, every entry before a point in time: count, sum, last balance and entry.
-- The statements' opening balances (before the period) and the reconciliation (before its end).
-- Params: before_ms Int64 (UTC epoch ms, exclusive), mall_id String ('' = all).
-- argMax over (ts, entry_id) is the warehouse's order of entries; FINAL keeps sums exact.
SELECT
    account_id,
    any(l.mall_id) AS mall_id,
    count() AS entries,
    sum(l.amount_minor) AS sum_minor,
    argMax(l.balance_after_minor, (l.ts, l.entry_id)) AS last_balance_minor,
    argMax(l.entry_id, (l.ts, l.entry_id)) AS last_entry_id
FROM mallwatt.ledger AS l FINAL
WHERE l.ts < fromUnixTimestamp64Milli({before_ms:Int64}, 'UTC')
  AND ({mall_id:String} = '' OR l.mall_id = {mall_id:String})
GROUP BY account_id
ORDER BY account_id
