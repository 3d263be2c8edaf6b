-- Purpose: merchants drawing power while the mall is closed: mean power over the closed
--   hours of the range above a threshold and a large share of their energy at night.
--   Common-area circuits and the purposes that legitimately run all night are left out.
-- Param: tz String = Asia/Shanghai | zone of the local days and hours (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: open_hour UInt8 = 10 | opening time (local hour)
-- Param: close_hour UInt8 = 22 | closing time (local hour)
-- Param: min_kw Float64 = 1.0 | flag when the mean power over the closed hours exceeds this
-- Param: min_share Float64 = 0.3 | ... and the closed hours carry at least this share of the energy
-- Param: exclude_purposes Array(String) = ['refrigeration'] | purposes that run at night by design
-- Column: mall_id String | mall
-- Column: account_id String | merchant account
-- Column: name String | merchant name
-- Column: business_type String | business type
-- Column: kwh_closed Float64 | energy outside opening hours (kWh)
-- Column: kwh_total Float64 | energy over the range (kWh)
-- Column: closed_share Float64 | kwh_closed / kwh_total
-- Column: avg_kw_closed Float64 | mean power over the closed hours of the range (kW)
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_accounts, dim_circuits
-- Watermark: mallwatt.intervals
SELECT
    e.mall_id AS mall_id,
    e.account_id AS account_id,
    a.name AS name,
    a.business_type AS business_type,
    round(e.kwh_closed, 3) AS kwh_closed,
    round(e.kwh_total, 3) AS kwh_total,
    round(e.kwh_closed / nullIf(e.kwh_total, 0), 4) AS closed_share,
    round(e.kwh_closed / ((dateDiff('day', {from_day:Date}, {to_day:Date}) + 1)
        * (24 - greatest(toInt32({close_hour:UInt8}) - toInt32({open_hour:UInt8}), 0))), 3)
        AS avg_kw_closed
FROM
(
    SELECT
        mall_id,
        account_id,
        sum(arraySum((e, h) -> if(h < {open_hour:UInt8} OR h >= {close_hour:UInt8}, e, 0),
                     by_hour, range(toUInt8(24)))) AS kwh_closed,
        sum(arraySum(by_hour)) AS kwh_total
    FROM mallwatt.circuit_local_hours(tz = {tz:String}, from_day = {from_day:Date},
                                      to_day = {to_day:Date}, mall_id = {mall_id:String})
    WHERE circuit_id NOT IN (SELECT circuit_id FROM mallwatt.dim_circuits FINAL
                             WHERE is_common OR has({exclude_purposes:Array(String)}, purpose))
    GROUP BY mall_id, account_id
) AS e
LEFT JOIN (SELECT account_id, name, business_type, is_landlord FROM mallwatt.dim_accounts FINAL) AS a
    ON a.account_id = e.account_id
WHERE NOT a.is_landlord
  AND avg_kw_closed > {min_kw:Float64}
  AND closed_share >= {min_share:Float64}
ORDER BY avg_kw_closed DESC, account_id
