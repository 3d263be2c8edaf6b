-- Cheaper inserts and month-long queries under 1 s (docs/warehouse.md, benchmark).
--
-- 1. No 15-minute rollup. At 15-minute meter resolution readings_15m_v2 had exactly as many
--    rows as the raw table and twice its bytes, so it doubled the sink's write work (measured:
--    raw + circuit_daily 574k rows/s, with readings_15m_v2 as well 286k). The raw table is
--    ordered (mall_id, circuit_id, ts), so a 15-minute bucket of one circuit is one range
--    read: circuit_15m becomes a plain view over it, same columns as before.
-- 2. circuit_hour_kwh: energy of every UTC hour per circuit and UTC day, for CLOSED days,
--    written once per day by close_days() (infra.warehouse_catalog; the sink runs it on a
--    timer). Month-long portfolio queries read it (one row and 24 numbers per circuit and
--    day) instead of deriving energies from registers per query; only the days after the
--    last closed one are derived at query time (view circuit_hour_energy).

DROP VIEW IF EXISTS mallwatt.readings_15m_v2_mv;
DROP VIEW IF EXISTS mallwatt.readings_15m_mv;

-- Same columns as the 005 view. Every aggregate is duplicate-insensitive (a replayed read
-- that ReplacingMergeTree has not collapsed yet changes nothing); reads = distinct seconds.
CREATE OR REPLACE VIEW mallwatt.circuit_15m AS
SELECT
    mall_id,
    circuit_id,
    toStartOfFifteenMinutes(toDateTime(ts, 'UTC')) AS bucket,
    account_id,
    meter_id,
    min(ts) AS first_read,
    max(ts) AS last_read,
    min(import_kwh) AS first_kwh,
    max(import_kwh) AS last_kwh,
    greatest(last_kwh - first_kwh, 0) AS kwh_within,
    max(power_w) AS peak_power_w,
    min(voltage_v) AS low_voltage_v,
    max(voltage_v) AS high_voltage_v,
    max(current_a) AS peak_current_a,
    toUInt64(uniqExact(toUnixTimestamp(ts))) AS reads
FROM mallwatt.readings
GROUP BY mall_id, circuit_id, bucket, account_id, meter_id;

-- Nothing reads the old 15-minute tables any more (nothing was deployed with them).
DROP TABLE IF EXISTS mallwatt.readings_15m_v2;
DROP TABLE IF EXISTS mallwatt.readings_15m;

-- Energy per circuit, meter and UTC day: kwh[h + 1] = energy of UTC hour h, the register at
-- the end of the hour minus the register at the end of the previous hour with reads (a gap's
-- energy lands in the first hour after it; a negative difference, a reset, counts 0). The
-- previous day's last register is the base of hour 0, so a day's row sums to the day's
-- energy. A recomputed day replaces the old row (closed_at).
CREATE TABLE IF NOT EXISTS mallwatt.circuit_hour_kwh
(
    mall_id     LowCardinality(String),
    circuit_id  String,
    day         Date,  -- UTC day
    account_id  String,
    meter_id    String,
    -- 24 entries, UTC hours 0..23. Float32 + LZ4, measured on a month of 8,400 circuits:
    -- summing every entry took 64 ms as Float64 + ZSTD, 32 ms Float64 + LZ4, 22 ms Float32 +
    -- LZ4 (decompression is the cost). An hour's energy keeps ~7 digits (0.1 Wh at 1 MWh);
    -- sums are Float64.
    kwh         Array(Float32) CODEC(LZ4),
    last_kwh    Float64,  -- register at the end of the day (full precision): the next day's base
    closed_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(closed_at)
-- by day, like circuit_daily: the base of the open days is read from one or two days' rows
PARTITION BY day
ORDER BY (mall_id, circuit_id, day, account_id, meter_id);

-- Every UTC day up to max(through) is in circuit_hour_kwh (close_days writes the rows first,
-- then this mark), so queries take those days from the table and derive only later ones.
CREATE TABLE IF NOT EXISTS mallwatt.circuit_hour_kwh_closed
(
    through    Date,
    closed_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY through;

-- The circuit_hour_kwh rows of UTC days [from_day, to_day], derived from circuit_daily.
-- open_only = 1: only the days after the last closed one. Same register differences as
-- circuit_hours (004): the base of the first day is the register of the latest hour with
-- reads in the two days before it (last_kwh of those days' closed rows when the day before
-- is closed, else their circuit_daily rows), else the first day's smallest read.
-- One GROUP BY per circuit (and meter and account): each circuit_daily row becomes a dense
-- 24-entry register array (hours without reads -1) placed at its day's offset in the
-- window [lo, hi]; maxForEach merges rows of the same day (unmerged parts) on the way;
-- arrayFill carries the register over hours without reads, arrayDifference gives the
-- energies. Measured on chDB at 35,000 circuits (one open day): 108 ms, against 172 ms with
-- a GROUP BY per circuit and day first and ~3x that for circuit_hours' sort of (hour,
-- register) pairs. base_key orders the base candidates by (day, hour) and breaks ties by
-- the larger register (circuit_daily) or the newer closing (closed rows).
CREATE VIEW IF NOT EXISTS mallwatt.circuit_hour_kwh_live AS
WITH
    ifNull((SELECT max(through) FROM mallwatt.circuit_hour_kwh_closed), toDate(0)) AS done,
    if({open_only:UInt8} = 1, greatest({from_day:Date}, done + 1), {from_day:Date}) AS lo,
    least({to_day:Date}, ifNull((SELECT max(day) FROM mallwatt.circuit_daily), toDate(0))) AS hi,
    lo - 1 <= done AS base_closed
SELECT mall_id, circuit_id, day, account_id, meter_id,
       arraySlice(energies, (k - 1) * 24 + 1, 24) AS kwh,
       filled[k * 24 + 1] AS last_kwh
FROM
(
    SELECT
        mall_id,
        circuit_id,
        account_id,
        meter_id,
        arraySort(groupUniqArrayIf(d, d >= lo)) AS days,
        -- (the If combinator still evaluates the arrays of rows before lo: clamp their sizes)
        maxForEachIf(
            arrayConcat(
                arrayResize(CAST([], 'Array(Float64)'), toUInt32(greatest(d, lo) - lo) * 24, -1.),
                dense,
                arrayResize(CAST([], 'Array(Float64)'),
                            toUInt32(greatest(hi, greatest(d, lo)) - greatest(d, lo)) * 24, -1.)),
            d >= lo) AS flat,
        if(countIf(d < lo) > 0, argMaxIf(last_reg, base_key, d < lo), minIf(min_kwh, d >= lo)) AS base,
        arrayFill(x -> x >= 0, arrayPushFront(flat, base)) AS filled,
        arrayMap(x -> greatest(x, 0), arrayPopFront(arrayDifference(filled))) AS energies
    FROM
    (
        SELECT mall_id, circuit_id, account_id, meter_id, day AS d, min_kwh,
            arrayMap(i -> if(i = 0, -1., hour_max_kwh.2[i]),
                     arrayMap(h -> indexOf(hour_max_kwh.1, h), range(toUInt8(24)))) AS dense,
            hour_max_kwh.2[-1] AS last_reg,
            bitShiftLeft(toUInt64(d) * 24 + hour_max_kwh.1[-1], 42)
                + toUInt64(greatest(last_reg, 0) * 1000) AS base_key
        FROM mallwatt.circuit_daily
        WHERE day BETWEEN if(base_closed, lo, lo - 2) AND hi
          AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
        UNION ALL
        SELECT mall_id, circuit_id, account_id, meter_id, day AS d, 0. AS min_kwh,
            CAST([], 'Array(Float64)') AS dense, last_kwh AS last_reg,
            bitShiftLeft(toUInt64(d) * 24 + 23, 42) + toUInt64(toUnixTimestamp64Milli(closed_at)) AS base_key
        FROM mallwatt.circuit_hour_kwh
        WHERE base_closed AND day BETWEEN lo - 2 AND lo - 1
          AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
    )
    GROUP BY mall_id, circuit_id, account_id, meter_id
    HAVING notEmpty(days)
)
ARRAY JOIN days AS day, arrayMap(x -> toUInt32(x - lo) + 1, days) AS k
WHERE day BETWEEN {from_day:Date} AND {to_day:Date};

-- circuit_hour_kwh rows of UTC days [from_day, to_day]: closed days from the table, later
-- ones derived from circuit_daily.
CREATE VIEW IF NOT EXISTS mallwatt.circuit_hour_energy AS
SELECT mall_id, circuit_id, day, account_id, meter_id, kwh
FROM mallwatt.circuit_hour_kwh FINAL
WHERE day BETWEEN {from_day:Date} AND {to_day:Date}
  AND day <= (SELECT max(through) FROM mallwatt.circuit_hour_kwh_closed)
  AND ({mall_id:String} = '' OR mall_id = {mall_id:String})
UNION ALL
SELECT mall_id, circuit_id, day, account_id, meter_id, kwh
FROM mallwatt.circuit_hour_kwh_live(from_day = {from_day:Date}, to_day = {to_day:Date},
                                    mall_id = {mall_id:String}, open_only = 1);

-- Energy per circuit and LOCAL day of zone tz for local days [from_day, to_day]: each UTC
-- day's hours before the next local midnight belong to the local date at its UTC 00:00, the
-- rest to the day after (whole-hour offsets, taken at the UTC day's start: on a
-- daylight-saving switch day an hour can land on the wrong side; none in China). One row
-- per circuit, meter and local day.
CREATE VIEW IF NOT EXISTS mallwatt.circuit_local_days AS
SELECT mall_id, circuit_id, account_id, meter_id, local_day AS day, e AS kwh
FROM
(
    SELECT
        mall_id,
        circuit_id,
        account_id,
        meter_id,
        toDateTime(day, 'UTC') AS utc_start,
        toDate(utc_start, {tz:String}) AS d0,
        -- hours of the UTC day before the next local midnight (24: the zone is UTC)
        24 - toHour(utc_start, {tz:String}) AS m,
        arraySum(arraySlice(kwh, 1, m)) AS e0,
        if(m < 24, [d0, d0 + 1], [d0]) AS ds,
        if(m < 24, [e0, arraySum(arraySlice(kwh, m + 1))], [e0]) AS es
    FROM mallwatt.circuit_hour_energy(from_day = {from_day:Date} - 1, to_day = {to_day:Date} + 1,
                                      mall_id = {mall_id:String})
)
ARRAY JOIN ds AS local_day, es AS e
WHERE local_day BETWEEN {from_day:Date} AND {to_day:Date};

-- Energy per circuit of its hours inside local days [from_day, to_day] of zone tz: one row per
-- circuit, meter and UTC day (the local_days split without doubling the rows), for reports
-- that only need totals over the range.
CREATE VIEW IF NOT EXISTS mallwatt.circuit_local_totals AS
SELECT mall_id, circuit_id, account_id, meter_id, e AS kwh
FROM
(
    SELECT
        mall_id,
        circuit_id,
        account_id,
        meter_id,
        toDateTime(day, 'UTC') AS utc_start,
        toDate(utc_start, {tz:String}) AS d0,
        24 - toHour(utc_start, {tz:String}) AS m,
        d0 BETWEEN {from_day:Date} AND {to_day:Date} AS in_first,
        m < 24 AND d0 + 1 BETWEEN {from_day:Date} AND {to_day:Date} AS in_second,
        if(in_first, arraySum(arraySlice(kwh, 1, m)), 0)
            + if(in_second, arraySum(arraySlice(kwh, m + 1)), 0) AS e
    FROM mallwatt.circuit_hour_energy(from_day = {from_day:Date} - 1, to_day = {to_day:Date} + 1,
                                      mall_id = {mall_id:String})
)
WHERE in_first OR in_second;

-- Energy per circuit and LOCAL hour of day for local days [from_day, to_day] of zone tz: one
-- row per circuit, meter and UTC day, by_hour[L + 1] = energy of local hour L of that UTC day
-- (0 when that hour's local day is outside the range): the UTC row rotated by the offset,
-- UTC hours m..23 (local hours 0..off-1 of the next local day) first. Array slices, no
-- per-hour lambda (measured at 35,000 circuits x 30 days: 106 ms against 229 ms). The offset
-- is taken at the UTC day's start, so on a daylight-saving switch day hours can shift by one
-- (none in China).
CREATE VIEW IF NOT EXISTS mallwatt.circuit_local_hours AS
SELECT mall_id, circuit_id, account_id, meter_id, by_hour
FROM
(
    SELECT
        mall_id,
        circuit_id,
        account_id,
        meter_id,
        toDateTime(day, 'UTC') AS utc_start,
        toDate(utc_start, {tz:String}) AS d0,
        24 - toHour(utc_start, {tz:String}) AS m,
        d0 BETWEEN {from_day:Date} AND {to_day:Date} AS in_first,
        d0 + 1 BETWEEN {from_day:Date} AND {to_day:Date} AS in_second,
        arrayConcat(
            if(in_second, arraySlice(kwh, m + 1), arrayResize(arraySlice(kwh, 1, 0), 24 - m)),
            if(in_first, arraySlice(kwh, 1, m), arrayResize(arraySlice(kwh, 1, 0), m))) AS by_hour
    FROM mallwatt.circuit_hour_energy(from_day = {from_day:Date} - 1, to_day = {to_day:Date} + 1,
                                      mall_id = {mall_id:String})
)
WHERE in_first OR in_second;
