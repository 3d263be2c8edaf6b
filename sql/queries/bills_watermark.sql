-- How far a topic is complete: the slowest partition's newest event time (UTC epoch ms).
-- Params: topic String (e.g. 'mallwatt.ledger'). NULL when the sink never wrote it.
SELECT if(count() = 0, NULL, toUnixTimestamp64Milli(min(m))) AS complete_until_ms
FROM
(
    SELECT partition, max(max_event_ts) AS m
    FROM mallwatt.ingest_watermark
    WHERE topic = {topic:String}
    GROUP BY partition
)
