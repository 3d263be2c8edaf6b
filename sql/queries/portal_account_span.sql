-- One account's ledger before a point in time: entries, first entry time, last balance and
-- entry (the statement's opening, as bills_account_totals gives it per account of a mall).
-- Params: account_id String, before_ms Int64 (UTC epoch ms, exclusive).
SELECT
    count() AS entries,
    toUnixTimestamp64Milli(min(l.ts)) AS first_ts_ms,
    argMax(l.balance_after_minor, (l.ts, l.entry_id)) AS last_balance_minor,
    argMax(l.entry_id, (l.ts, l.entry_id)) AS last_entry_id
FROM mallwatt.ledger AS l FINAL
WHERE l.account_id = {account_id:String}
  AND l.ts < fromUnixTimestamp64Milli({before_ms:Int64}, 'UTC')
