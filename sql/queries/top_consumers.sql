-- Purpose: accounts with the most metered energy in [start, end) at hour resolution, from
--   the circuit_daily rollup (one row per circuit and UTC day). Energy per circuit and
--   meter is a register difference: the last register read in the window's hours minus
--   the last register read before them (or the first register of the window when the
--   circuit has no earlier read within two days), so missing readings lose nothing; a
--   negative difference (meter reset) counts 0. start and end are taken to whole UTC hours.
-- Param: start DateTime64(3, 'UTC') | start instant (UTC; the hour it falls in is included)
-- Param: end DateTime64(3, 'UTC') | end instant (UTC, exclusive; rounded down to the hour)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: limit UInt32 = 10 | rows returned
-- Column: mall_id String | mall
-- Column: account_id String | account
-- Column: kwh Float64 | energy (kWh)
-- Column: circuits UInt64 | circuits of the account with reads
-- Column: peak_power_w Float64 | highest power read on the UTC days the window touches (W)
-- Source: circuit_daily (rollup)
-- Watermark: mallwatt.readings
SELECT
    mall_id,
    account_id,
    round(sum(kwh), 3) AS kwh,
    count() AS circuits,
    max(peak_w) AS peak_power_w
FROM
(
    SELECT
        mall_id,
        account_id,
        circuit_id,
        meter_id,
        toDateTime(toStartOfHour({start:DateTime64(3, 'UTC')}), 'UTC') AS lo,
        toDateTime(toStartOfHour({end:DateTime64(3, 'UTC')}), 'UTC') AS hi,
        -- every (UTC hour, last register of the hour) pair of the circuit, unmerged rows
        -- included (max per hour below, so a replayed or split day changes nothing)
        arrayFlatten(groupArray(
            arrayMap(h -> toDateTime(day, 'UTC') + toIntervalHour(h), hour_max_kwh.1))) AS starts,
        arrayFlatten(groupArray(hour_max_kwh.2)) AS regs,
        arrayFilter((r, t) -> t >= lo AND t < hi, regs, starts) AS inside,
        arrayFilter((r, t) -> t < lo, regs, starts) AS before,
        -- no read before the window: the smallest register of the days inside it
        arrayMin(arrayFilter((m, d) -> toDateTime(d, 'UTC') + 86400 > lo,
                             groupArray(min_kwh), groupArray(day))) AS first_inside,
        greatest(arrayMax(inside) - if(empty(before), first_inside, arrayMax(before)), 0) AS kwh,
        maxIf(max_power_w, toDateTime(day, 'UTC') + 86400 > lo AND toDateTime(day, 'UTC') < hi)
            AS peak_w
    FROM mallwatt.circuit_daily
    WHERE day BETWEEN toDate({start:DateTime64(3, 'UTC')}, 'UTC') - 2
                  AND toDate({end:DateTime64(3, 'UTC')}, 'UTC')
      AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    GROUP BY mall_id, account_id, circuit_id, meter_id
    HAVING notEmpty(inside)
)
GROUP BY mall_id, account_id
ORDER BY kwh DESC, account_id
LIMIT {limit:UInt32}
