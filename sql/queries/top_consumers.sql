-- Purpose: accounts with the most billed energy in [start, end) at hour resolution, from
--   the billed_daily rollup of the interval facts (one row per circuit and UTC day). Energy
--   per circuit and meter is a difference of the circuit's billed total: the total at the
--   end of the window's last hour with intervals minus the total before the window (or the
--   smallest interval start total inside it when the circuit has no earlier interval within
--   two days), so it is exactly the energy billing charged (rollover, resets, meter swaps and
--   spikes as billing handled them). An interval belongs to the hour of its end; start and
--   end are taken to whole UTC hours.
-- Param: start DateTime64(3, 'UTC') | start instant (UTC; the hour it falls in is included)
-- Param: end DateTime64(3, 'UTC') | end instant (UTC, exclusive; rounded down to the hour)
-- Param: mall_id String = | one mall, or empty for every mall
-- Param: limit UInt32 = 10 | rows returned
-- Column: mall_id String | mall
-- Column: account_id String | account
-- Column: kwh Float64 | billed energy (kWh)
-- Column: circuits UInt64 | circuits of the account with billed intervals
-- Column: peak_power_w Float64 | highest power read on the UTC days the window touches (W)
-- Source: billed_daily (rollup of interval_energy), circuit_daily (rollup, power only)
-- Watermark: mallwatt.intervals, mallwatt.readings
SELECT
    e.mall_id AS mall_id,
    e.account_id AS account_id,
    round(e.kwh, 3) AS kwh,
    e.circuits AS circuits,
    p.peak_w AS peak_power_w
FROM
(
    SELECT mall_id, account_id, sum(kwh) AS kwh, count() AS circuits
    FROM
    (
        SELECT
            mall_id,
            account_id,
            circuit_id,
            meter_id,
            toDateTime(toStartOfHour({start:DateTime64(3, 'UTC')}), 'UTC') AS lo,
            toDateTime(toStartOfHour({end:DateTime64(3, 'UTC')}), 'UTC') AS hi,
            -- every (UTC hour, billed total at its end) pair, unmerged rows included (max below)
            arrayFlatten(groupArray(
                arrayMap(h -> toDateTime(day, 'UTC') + toIntervalHour(h), hour_max_kwh.1))) AS starts,
            arrayFlatten(groupArray(hour_max_kwh.2)) AS totals,
            arrayFilter((r, t) -> t >= lo AND t < hi, totals, starts) AS inside,
            arrayFilter((r, t) -> t < lo, totals, starts) AS before,
            arrayMin(arrayFilter((m, d) -> toDateTime(d, 'UTC') + 86400 > lo,
                                 groupArray(min_kwh), groupArray(day))) AS first_inside,
            greatest(arrayMax(inside) - if(empty(before), first_inside, arrayMax(before)), 0) AS kwh
        FROM mallwatt.billed_daily
        WHERE day BETWEEN toDate({start:DateTime64(3, 'UTC')}, 'UTC') - 2
                      AND toDate({end:DateTime64(3, 'UTC')}, 'UTC')
          AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
        GROUP BY mall_id, account_id, circuit_id, meter_id
        HAVING notEmpty(inside)
    )
    GROUP BY mall_id, account_id
    ORDER BY kwh DESC, account_id
    LIMIT {limit:UInt32}
) AS e
LEFT JOIN
(
    SELECT mall_id, account_id, max(max_power_w) AS peak_w
    FROM mallwatt.circuit_daily
    WHERE day BETWEEN toDate({start:DateTime64(3, 'UTC')}, 'UTC') AND toDate({end:DateTime64(3, 'UTC')}, 'UTC')
      AND toDateTime(day, 'UTC') < toDateTime(toStartOfHour({end:DateTime64(3, 'UTC')}), 'UTC')
      AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    GROUP BY mall_id, account_id
) AS p ON e.mall_id = p.mall_id AND e.account_id = p.account_id
ORDER BY kwh DESC, account_id
