-- Purpose: the average day: mean power per local hour of day over a range of days, by mall,
--   business type or circuit purpose (energy of each hour = average kW in that hour).
-- Param: tz String = Asia/Shanghai | zone of the local days and hours (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: by String = mall | group by mall, business_type or purpose
-- Column: mall_id String | the mall; empty when by is business_type or purpose (portfolio-wide)
-- Column: key String | mall id, business type or purpose
-- Column: hour UInt8 | local hour of day (0-23)
-- Column: avg_kw Float64 | mean power in that hour over the days of the range (kW)
-- Column: share_of_day Float64 | the hour's share of the group's average daily energy
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts, dim_circuits
-- Watermark: mallwatt.intervals
SELECT
    mall_id,
    key,
    hour,
    round(sum(e) / (dateDiff('day', {from_day:Date}, {to_day:Date}) + 1), 4) AS avg_kw,
    sum(e) / sum(sum(e)) OVER (PARTITION BY mall_id, key) AS share_of_day
FROM
(
    SELECT
        if({by:String} IN ('business_type', 'purpose'), '', p.mall_id) AS mall_id,
        multiIf({by:String} = 'mall', p.mall_id, {by:String} = 'business_type',
                a.business_type, c.purpose) AS raw_key,
        if(raw_key = '', '(unassigned)', raw_key) AS key,
        p.by_hour AS by_hour
    FROM
    (
        -- by_hour[h + 1]: the circuit's energy in local hour h, summed over the days
        SELECT mall_id, account_id, circuit_id, sumForEach(by_hour) AS by_hour
        FROM mallwatt.circuit_local_hours(tz = {tz:String}, from_day = {from_day:Date},
                                          to_day = {to_day:Date}, mall_id = {mall_id:String})
        GROUP BY mall_id, account_id, circuit_id
    ) AS p
    LEFT JOIN (SELECT account_id, business_type FROM mallwatt.dim_accounts FINAL) AS a
        ON a.account_id = p.account_id
    LEFT JOIN (SELECT circuit_id, purpose FROM mallwatt.dim_circuits FINAL) AS c
        ON c.circuit_id = p.circuit_id
    WHERE throwIf({by:String} NOT IN ('mall', 'business_type', 'purpose'),
                  'by must be mall, business_type or purpose') = 0
)
ARRAY JOIN by_hour AS e, arrayEnumerate(by_hour) AS i
GROUP BY mall_id, key, toUInt8(i - 1) AS hour
ORDER BY mall_id, key, hour
