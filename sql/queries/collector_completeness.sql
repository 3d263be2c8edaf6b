-- Purpose: data completeness per collector: 15-minute slots with at least one read against
--   the slots expected for every known circuit, from the first UTC day to the end of the
--   data (so today's future slots are not counted as gaps). Circuits of the portfolio
--   that sent nothing in the range are listed under collector '(silent)'.
-- Param: from_day Date | first UTC day
-- Param: to_day Date | last UTC day (inclusive)
-- Param: mall_id String = | one mall, or empty for every mall
-- Column: mall_id String | mall
-- Column: collector_id String | collector ('(silent)': circuits without any read)
-- Column: circuits UInt64 | circuits attributed to the collector
-- Column: expected_slots UInt64 | circuits x 15-minute slots up to the end of the data
-- Column: present_slots UInt64 | slots with at least one read
-- Column: gap_slots Int64 | expected - present
-- Column: completeness Float64 | present / expected
-- Column: circuits_with_gaps UInt64 | circuits missing at least one slot
-- Column: expected_polls UInt64 | polls expected at each meter's poll interval (dimensions)
-- Column: last_read DateTime64(3, 'UTC') | newest read of the collector in the range
-- Source: circuit_daily (rollup), dim_circuits
-- Watermark: mallwatt.readings
WITH
    toDateTime({from_day:Date}, 'UTC') AS range_start,
    (SELECT least(toDateTime({to_day:Date} + 1, 'UTC'),
                  toDateTime(toStartOfFifteenMinutes(max(last_ts)) + 900, 'UTC'))
     FROM mallwatt.circuit_daily
     WHERE day BETWEEN {from_day:Date} AND {to_day:Date}) AS range_end,
    greatest(intDiv(toUInt32(range_end) - toUInt32(range_start), 900), 0) AS slots_in_range
SELECT
    mall_id,
    collector_id,
    count() AS circuits,
    count() * any(slots_in_range) AS expected_slots,
    sum(present) AS present_slots,
    toInt64(expected_slots) - toInt64(present_slots) AS gap_slots,
    round(present_slots / nullIf(expected_slots, 0), 4) AS completeness,
    countIf(present < slots_in_range) AS circuits_with_gaps,
    toUInt64(sum((toUInt32(range_end) - toUInt32(range_start)) / poll_s)) AS expected_polls,
    max(last_read) AS last_read
FROM
(
    SELECT
        if(s.circuit_id = '', d.mall_id, s.mall_id) AS mall_id,
        if(s.circuit_id = '', '(silent)', s.collector_id) AS collector_id,
        ifNull(s.present, 0) AS present,
        s.last_read AS last_read,
        if(d.poll_interval_s > 0, d.poll_interval_s, 900) AS poll_s
    FROM
    (
        SELECT
            mall_id,
            circuit_id,
            argMax(collector_id, c.last_ts) AS collector_id,
            sum(bitCount(day_slots)) AS present,
            max(c.last_ts) AS last_read
        FROM
        (
            SELECT mall_id, circuit_id, day, collector_id, groupBitOr(slots) AS day_slots,
                   max(last_ts) AS last_ts
            FROM mallwatt.circuit_daily
            WHERE day BETWEEN {from_day:Date} AND {to_day:Date}
              AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
            GROUP BY mall_id, circuit_id, day, collector_id
        ) AS c
        GROUP BY mall_id, circuit_id
    ) AS s
    FULL OUTER JOIN
    (
        SELECT circuit_id, mall_id, poll_interval_s FROM mallwatt.dim_circuits FINAL
        WHERE {mall_id:String} = '' OR mall_id = {mall_id:String}
    ) AS d ON d.circuit_id = s.circuit_id
)
GROUP BY mall_id, collector_id
ORDER BY completeness ASC, mall_id, collector_id
