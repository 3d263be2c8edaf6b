-- Purpose: last balance per account: the balance_after of its latest ledger entry.
--   argMax over (ts, entry_id) is duplicate-insensitive, so no FINAL is needed.
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: account_id String | account
-- Column: mall String | mall
-- Column: balance_minor Int64 | balance after the latest entry (minor units)
-- Column: last_entry_ts DateTime64(3, 'UTC') | time of the latest entry
-- Column: entries UInt64 | ledger entries of the account
-- Source: ledger (raw; one range scan per account)
-- Watermark: mallwatt.ledger
SELECT
    account_id,
    any(l.mall_id) AS mall,
    argMax(balance_after_minor, (ts, entry_id)) AS balance_minor,
    max(ts) AS last_entry_ts,
    uniqExact(entry_id) AS entries
FROM mallwatt.ledger AS l
WHERE {mall_id:String} = '' OR l.mall_id = {mall_id:String}
GROUP BY account_id
ORDER BY balance_minor ASC, account_id
