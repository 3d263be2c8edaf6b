-- The audit trail (issue 16): who did what, when, with what result. One row per AuditEvent of
-- mallwatt.audit; event_id is stable, so a re-published event is kept once.
CREATE TABLE IF NOT EXISTS mallwatt.audit_events
(
    event_id     String,
    ts           DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    principal    String,
    action       LowCardinality(String),
    target       String,
    result       LowCardinality(String),
    component    LowCardinality(String),
    detail       String,
    ingested_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (principal, ts, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
