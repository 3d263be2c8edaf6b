-- Purpose: how far each topic is complete: the ingest watermark. A topic is complete up
--   to the smallest of its partitions' newest event times (every partition has been
--   written at least that far); reports over later times may still change.
-- Param: topic_like String = % | LIKE pattern on the topic name
-- Column: topic String | Kafka topic
-- Column: partitions UInt64 | partitions the sink has written
-- Column: complete_up_to DateTime64(3, 'UTC') | min over partitions of the newest event time
-- Column: newest_event DateTime64(3, 'UTC') | max over partitions of the newest event time
-- Column: lag_s Float64 | seconds from complete_up_to to now
-- Column: last_write DateTime64(3, 'UTC') | when the sink last advanced a partition
-- Source: ingest_watermark
SELECT
    topic,
    count() AS partitions,
    min(m) AS complete_up_to,
    max(m) AS newest_event,
    round((toUnixTimestamp64Milli(now64(3)) - toUnixTimestamp64Milli(min(m))) / 1000, 3) AS lag_s,
    max(u) AS last_write
FROM
(
    SELECT topic, partition, max(max_event_ts) AS m, max(updated_at) AS u
    FROM mallwatt.ingest_watermark
    WHERE topic LIKE {topic_like:String}
    GROUP BY topic, partition
)
GROUP BY topic
ORDER BY topic
