-- Purpose: energy intensity (kWh per m2 of leased area) by mall, area or business type.
--   Only merchant accounts count (not the landlord's common areas, not vacant units); a
--   merchant without consumption still adds its area to the denominator.
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: by String = mall | group by mall, area or business_type
-- Column: mall_id String | the mall; empty when by is business_type (portfolio-wide)
-- Column: key String | mall id, area id or business type
-- Column: merchants UInt64 | merchants (leased, not vacant) in the group
-- Column: leased_m2 Float64 | their leased area (m2)
-- Column: kwh Float64 | their energy (kWh)
-- Column: kwh_per_m2 Float64 | kwh / leased_m2 over the range
-- Column: kwh_per_m2_day Float64 | the same per local day of the range
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts
-- Watermark: mallwatt.intervals
SELECT
    if({by:String} = 'business_type', '', a.mall_id) AS mall_id,
    multiIf({by:String} = 'mall', a.mall_id, {by:String} = 'area', a.area_id,
            a.business_type) AS key,
    count() AS merchants,
    round(sum(a.leased_area_m2), 3) AS leased_m2,
    round(sum(e.account_kwh), 3) AS kwh,
    round(sum(e.account_kwh) / sum(a.leased_area_m2), 6) AS kwh_per_m2,
    round(kwh_per_m2 / (dateDiff('day', {from_day:Date}, {to_day:Date}) + 1), 6) AS kwh_per_m2_day
FROM
(
    SELECT account_id, mall_id, area_id, business_type, leased_area_m2
    FROM mallwatt.dim_accounts FINAL
    WHERE NOT is_landlord AND NOT vacant AND leased_area_m2 > 0
      AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
) AS a
LEFT JOIN
(
    SELECT account_id, sum(kwh) AS account_kwh
    FROM mallwatt.circuit_local_totals(tz = {tz:String}, from_day = {from_day:Date},
                                       to_day = {to_day:Date}, mall_id = {mall_id:String})
    GROUP BY account_id
) AS e ON e.account_id = a.account_id
WHERE throwIf({by:String} NOT IN ('mall', 'area', 'business_type'),
              'by must be mall, area or business_type') = 0
GROUP BY mall_id, key
ORDER BY mall_id, key
