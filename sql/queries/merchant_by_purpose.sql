-- Purpose: energy per merchant (account) and circuit purpose over local days, with the
--   share of the account's total.
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: mall_id String | mall
-- Column: account_id String | merchant account (or the mall's landlord account)
-- Column: name String | merchant name ('' without dimensions)
-- Column: business_type String | business type
-- Column: purpose String | circuit purpose ('(unassigned)' without dimensions)
-- Column: kwh Float64 | energy (kWh)
-- Column: share Float64 | share of the account's energy over the range (sums to 1 per account)
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts, dim_circuits
-- Watermark: mallwatt.intervals
SELECT
    e.mall_id AS mall_id,
    e.account_id AS account_id,
    a.name AS name,
    a.business_type AS business_type,
    if(c.purpose = '', '(unassigned)', c.purpose) AS purpose,
    round(sum(e.circuit_kwh), 3) AS kwh,
    if(sum(sum(e.circuit_kwh)) OVER (PARTITION BY e.account_id) > 0,
       sum(e.circuit_kwh) / sum(sum(e.circuit_kwh)) OVER (PARTITION BY e.account_id), 0) AS share
FROM
(
    SELECT mall_id, account_id, circuit_id, sum(kwh) AS circuit_kwh
    FROM mallwatt.circuit_local_totals(tz = {tz:String}, from_day = {from_day:Date},
                                       to_day = {to_day:Date}, mall_id = {mall_id:String})
    GROUP BY mall_id, account_id, circuit_id
) AS e
LEFT JOIN (SELECT account_id, name, business_type FROM mallwatt.dim_accounts FINAL) AS a
    ON a.account_id = e.account_id
LEFT JOIN (SELECT circuit_id, purpose FROM mallwatt.dim_circuits FINAL) AS c
    ON c.circuit_id = e.circuit_id
GROUP BY mall_id, account_id, name, business_type, purpose
ORDER BY mall_id, account_id, kwh DESC, purpose
