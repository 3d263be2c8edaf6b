-- Purpose: merchants ranked by energy intensity (kWh per m2 of leased area) within their
--   business type: rank 1 is the most efficient (lowest kWh/m2).
-- Param: tz String = Asia/Shanghai | zone of the local days (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | rank within one mall, or empty for the whole portfolio
-- Param: business_type String = | one business type, or empty for all
-- Column: business_type String | business type (the ranking group)
-- Column: rank UInt64 | 1 = lowest kWh/m2 in the business type
-- Column: peers UInt64 | merchants ranked in the business type
-- Column: mall_id String | mall
-- Column: account_id String | merchant account
-- Column: name String | merchant name
-- Column: leased_m2 Float64 | leased area (m2)
-- Column: kwh Float64 | energy (kWh)
-- Column: kwh_per_m2 Float64 | kwh / leased_m2
-- Column: vs_median Float64 | kwh_per_m2 / the business type's median (1 = typical)
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts
-- Watermark: mallwatt.intervals
SELECT
    business_type,
    rank() OVER (PARTITION BY business_type ORDER BY kwh_per_m2 ASC, account_id) AS rank,
    count() OVER (PARTITION BY business_type) AS peers,
    mall_id,
    account_id,
    name,
    leased_m2,
    kwh,
    kwh_per_m2,
    round(kwh_per_m2 / nullIf(median(kwh_per_m2) OVER (PARTITION BY business_type), 0), 4)
        AS vs_median
FROM
(
    SELECT
        a.business_type AS business_type,
        a.mall_id AS mall_id,
        a.account_id AS account_id,
        a.name AS name,
        a.leased_area_m2 AS leased_m2,
        round(e.account_kwh, 3) AS kwh,
        round(e.account_kwh / a.leased_area_m2, 6) AS kwh_per_m2
    FROM
    (
        SELECT account_id, mall_id, name, business_type, leased_area_m2
        FROM mallwatt.dim_accounts FINAL
        WHERE NOT is_landlord AND NOT vacant AND leased_area_m2 > 0
          AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
          AND ({business_type:String} = '' OR business_type = {business_type:String})
    ) AS a
    LEFT JOIN
    (
        SELECT account_id, sum(kwh) AS account_kwh
        FROM mallwatt.circuit_local_totals(tz = {tz:String}, from_day = {from_day:Date},
                                           to_day = {to_day:Date}, mall_id = {mall_id:String})
        GROUP BY account_id
    ) AS e ON e.account_id = a.account_id
)
ORDER BY business_type, rank
