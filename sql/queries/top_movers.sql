-- Purpose: top consumers of a period and how they moved against the previous period of
--   the same length (e.g. this week vs last week), ordered by the size of the change.
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day of this period
-- Param: to_day Date | last local day of this period (inclusive); the previous period is the same number of days just before
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: limit UInt32 = 20 | rows returned
-- Column: mall_id String | mall
-- Column: account_id String | account
-- Column: name String | merchant name ('' without dimensions)
-- Column: kwh Float64 | energy this period (kWh)
-- Column: kwh_previous Float64 | energy in the previous period (kWh)
-- Column: change_kwh Float64 | kwh - kwh_previous
-- Column: change_pct Float64 | change relative to the previous period (NULL when it was 0)
-- Column: rank_now UInt64 | rank by kwh this period (1 = largest consumer)
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts
-- Watermark: mallwatt.intervals
SELECT
    e.mall_id AS mall_id,
    e.account_id AS account_id,
    a.name AS name,
    round(e.now_kwh, 3) AS kwh,
    round(e.prev_kwh, 3) AS kwh_previous,
    round(e.now_kwh - e.prev_kwh, 3) AS change_kwh,
    if(e.prev_kwh > 0, round((e.now_kwh - e.prev_kwh) / e.prev_kwh, 4), NULL) AS change_pct,
    e.rank_now AS rank_now
FROM
(
    SELECT
        mall_id,
        account_id,
        sumIf(kwh, day >= {from_day:Date}) AS now_kwh,
        sumIf(kwh, day < {from_day:Date}) AS prev_kwh,
        rank() OVER (ORDER BY now_kwh DESC) AS rank_now
    FROM mallwatt.circuit_local_days(
        tz = {tz:String},
        from_day = {from_day:Date} - (dateDiff('day', {from_day:Date}, {to_day:Date}) + 1),
        to_day = {to_day:Date}, mall_id = {mall_id:String})
    GROUP BY mall_id, account_id
) AS e
LEFT JOIN (SELECT account_id, name FROM mallwatt.dim_accounts FINAL) AS a
    ON a.account_id = e.account_id
ORDER BY abs(change_kwh) DESC, account_id
LIMIT {limit:UInt32}
