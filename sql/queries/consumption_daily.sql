-- Purpose: metered energy per local day by mall, area, business type or circuit purpose.
--   Billed hourly energies (interval facts): closed days from billed_hour_kwh, later days from billed_daily.
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: by String = mall | group by mall, area, business_type or purpose
-- Column: day Date | local day
-- Column: mall_id String | the mall; empty when by is business_type or purpose (portfolio-wide)
-- Column: key String | mall id, area id ('(common)' for common areas), business type or purpose; '(unassigned)' without dimensions
-- Column: kwh Float64 | energy (kWh)
-- Column: accounts UInt64 | accounts with consumption that day
-- Column: circuits UInt64 | circuits with consumption that day
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts, dim_circuits
-- Watermark: mallwatt.intervals
WITH keys AS
(
    -- the group key per account (area, business type) or per circuit (purpose), from the
    -- dimensions, so the circuit-day rows meet one small join instead of two
    SELECT account_id AS id,
           if({by:String} = 'area', if(is_landlord, '(common)', area_id), business_type) AS raw_key
    FROM mallwatt.dim_accounts FINAL
    WHERE {by:String} IN ('area', 'business_type')
    UNION ALL
    SELECT circuit_id AS id, toString(purpose) AS raw_key
    FROM mallwatt.dim_circuits FINAL
    WHERE {by:String} = 'purpose'
)
SELECT day, mall_id, key, round(sum(e), 3) AS kwh,
       uniqExact(cityHash64(account_id)) AS accounts, uniqExact(cityHash64(circuit_id)) AS circuits
FROM
(
    SELECT
        p.day AS day,
        if({by:String} IN ('business_type', 'purpose'), '', p.mall_id) AS mall_id,
        if({by:String} = 'mall', p.mall_id, if(k.raw_key = '', '(unassigned)', k.raw_key)) AS key,
        p.account_id AS account_id,
        p.circuit_id AS circuit_id,
        p.kwh AS e
    FROM mallwatt.circuit_local_days(tz = {tz:String}, from_day = {from_day:Date},
                                     to_day = {to_day:Date}, mall_id = {mall_id:String}) AS p
    LEFT JOIN keys AS k ON k.id = if({by:String} = 'purpose', p.circuit_id, p.account_id)
    WHERE throwIf({by:String} NOT IN ('mall', 'area', 'business_type', 'purpose'),
                  'by must be mall, area, business_type or purpose') = 0
)
GROUP BY day, mall_id, key
ORDER BY day, mall_id, key
