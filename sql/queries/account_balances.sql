-- Purpose: last balance per account: the balance_after of its latest ledger entry.
--   The latest entry is the one with the largest ts, ties broken by the largest entry_id:
--   the first row of each account in (account_id, ts, entry_id) DESC order, which is the
--   table's sort key read backwards (no sort, no argMax over a tuple); a replayed copy of
--   an entry is the same row. Entries are counted after FINAL (one per entry_id). Measured
--   at 3.3 M entries: 108 ms + 27 ms against 278 ms for the earlier two-scan version.
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: account_id String | account
-- Column: mall String | mall
-- Column: balance_minor Int64 | balance after the latest entry (minor units)
-- Column: last_entry_ts DateTime64(3, 'UTC') | time of the latest entry
-- Column: entries UInt64 | ledger entries of the account
-- Source: ledger (raw; one range scan per account)
-- Watermark: mallwatt.ledger
SELECT
    l.account_id AS account_id,
    l.mall_id AS mall,
    l.balance_after_minor AS balance_minor,
    l.ts AS last_entry_ts,
    c.entries AS entries
FROM
(
    SELECT account_id, toString(mall_id) AS mall_id, balance_after_minor, ts
    FROM mallwatt.ledger
    WHERE {mall_id:String} = '' OR mall_id = {mall_id:String}
    ORDER BY account_id DESC, ts DESC, entry_id DESC
    LIMIT 1 BY account_id
) AS l
INNER JOIN
(
    SELECT account_id, count() AS entries
    FROM mallwatt.ledger FINAL
    WHERE {mall_id:String} = '' OR mall_id = {mall_id:String}
    GROUP BY account_id
) AS c ON c.account_id = l.account_id
ORDER BY balance_minor ASC, account_id
