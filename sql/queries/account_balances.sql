-- Last balance per account: the balance_after of its latest ledger entry.
-- Params: mall_id String ('' for every mall).
-- argMax over (ts, entry_id) is duplicate-insensitive, so no FINAL is needed.
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
