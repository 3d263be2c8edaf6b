-- Purpose: common-area HVAC, elevator and public-lighting energy inside and outside the
--   opening hours, per mall and purpose: plant left running after closing shows up here.
-- Param: tz String = Asia/Shanghai | zone of the local days and hours (whole-hour offsets)
-- Param: from_day Date | first local day
-- Param: to_day Date | last local day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: open_hour UInt8 = 10 | opening time (local hour; the hour starting then is open)
-- Param: close_hour UInt8 = 22 | closing time (local hour; the hour starting then is closed)
-- Param: running_kw Float64 = 1.0 | a closed hour counts as running above this average power
-- Column: mall_id String | mall
-- Column: purpose String | hvac, elevator or public_lighting
-- Column: kwh_open Float64 | energy in opening hours (kWh)
-- Column: kwh_closed Float64 | energy outside opening hours (kWh)
-- Column: closed_share Float64 | kwh_closed / (kwh_open + kwh_closed)
-- Column: avg_kw_open Float64 | mean power over the opening hours of the range
-- Column: avg_kw_closed Float64 | mean power over the closed hours of the range
-- Column: running_closed_hours UInt64 | closed hours (summed over circuits) above running_kw
-- Source: billed_hour_kwh (rollup of interval_energy), billed_daily (rollup), dim_circuits
-- Watermark: mallwatt.intervals
SELECT
    h.mall_id AS mall_id,
    c.purpose AS purpose,
    round(sum(h.kwh_open), 3) AS kwh_open,
    round(sum(h.kwh_closed), 3) AS kwh_closed,
    round(kwh_closed / nullIf(kwh_open + kwh_closed, 0), 4) AS closed_share,
    round(sum(h.kwh_open) / (uniqExact(h.circuit_id) * open_hours_total), 3) AS avg_kw_open,
    round(sum(h.kwh_closed) / (uniqExact(h.circuit_id) * (days * 24 - open_hours_total)), 3)
        AS avg_kw_closed,
    sum(h.running) AS running_closed_hours
FROM
(
    SELECT
        mall_id,
        circuit_id,
        -- one row per circuit and UTC day, by_hour indexed by local hour
        arrayMap(x -> x >= {open_hour:UInt8} AND x < {close_hour:UInt8}, range(toUInt8(24))) AS open_mask,
        arraySum(arrayFilter((e, o) -> o, by_hour, open_mask)) AS kwh_open,
        arraySum(arrayFilter((e, o) -> NOT o, by_hour, open_mask)) AS kwh_closed,
        arrayCount((e, o) -> NOT o AND e > {running_kw:Float64}, by_hour, open_mask) AS running
    FROM mallwatt.circuit_local_hours(tz = {tz:String}, from_day = {from_day:Date},
                                      to_day = {to_day:Date}, mall_id = {mall_id:String})
    WHERE circuit_id IN (SELECT circuit_id FROM mallwatt.dim_circuits FINAL
                         WHERE purpose IN ('hvac', 'elevator', 'public_lighting'))
) AS h
INNER JOIN (SELECT circuit_id, purpose FROM mallwatt.dim_circuits FINAL
            WHERE purpose IN ('hvac', 'elevator', 'public_lighting')) AS c
    ON c.circuit_id = h.circuit_id
CROSS JOIN
(
    SELECT
        dateDiff('day', {from_day:Date}, {to_day:Date}) + 1 AS days,
        days * greatest(toInt32({close_hour:UInt8}) - toInt32({open_hour:UInt8}), 0)
            AS open_hours_total
) AS span
GROUP BY mall_id, purpose, days, open_hours_total
ORDER BY mall_id, purpose
