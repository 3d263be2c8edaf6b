-- Purpose: metered energy per local month by mall, area, business type or circuit purpose.
--   Hourly energies of closed days (circuit_hour_kwh), later days from circuit_daily.
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: by String = mall | group by mall, area, business_type or purpose
-- Column: month Date | first day of the local month
-- Column: mall_id String | the mall; empty when by is business_type or purpose (portfolio-wide)
-- Column: key String | mall id, area id ('(common)' for common areas), business type or purpose; '(unassigned)' without dimensions
-- Column: kwh Float64 | energy (kWh)
-- Column: accounts UInt64 | accounts with consumption that month
-- Column: circuits UInt64 | circuits with consumption that month
-- Source: circuit_hour_kwh (rollup), circuit_daily (rollup), dim_accounts, dim_circuits
-- Watermark: mallwatt.readings
WITH per_circuit AS
(
    -- the circuit's energy per local day, as arrays: the dimension joins then see one row
    -- per circuit instead of one per circuit and day
    SELECT mall_id, account_id, circuit_id, (groupArray(day), groupArray(kwh)) AS by_day
    FROM mallwatt.circuit_local_days(tz = {tz:String}, from_day = {from_day:Date},
                                     to_day = {to_day:Date}, mall_id = {mall_id:String})
    GROUP BY mall_id, account_id, circuit_id
)
SELECT toStartOfMonth(day) AS month, mall_id, key, round(sum(e), 3) AS kwh,
       uniqExact(cityHash64(account_id)) AS accounts, uniqExact(cityHash64(circuit_id)) AS circuits
FROM
(
    SELECT
        if({by:String} IN ('business_type', 'purpose'), '', p.mall_id) AS mall_id,
        multiIf({by:String} = 'mall', p.mall_id,
                {by:String} = 'area', if(a.is_landlord, '(common)', a.area_id),
                {by:String} = 'business_type', a.business_type,
                c.purpose) AS raw_key,
        if(raw_key = '', '(unassigned)', raw_key) AS key,
        p.account_id AS account_id,
        p.circuit_id AS circuit_id,
        p.by_day AS by_day
    FROM per_circuit AS p
    LEFT JOIN (SELECT account_id, area_id, business_type, is_landlord
               FROM mallwatt.dim_accounts FINAL) AS a ON a.account_id = p.account_id
    LEFT JOIN (SELECT circuit_id, purpose FROM mallwatt.dim_circuits FINAL) AS c
        ON c.circuit_id = p.circuit_id
    WHERE throwIf({by:String} NOT IN ('mall', 'area', 'business_type', 'purpose'),
                  'by must be mall, area, business_type or purpose') = 0
)
ARRAY JOIN by_day.1 AS day, by_day.2 AS e
GROUP BY month, mall_id, key
ORDER BY month, mall_id, key
