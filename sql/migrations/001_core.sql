-- Raw facts, one table per Kafka topic the sink consumes.
-- Every table is a ReplacingMergeTree whose ORDER BY is a key derived from the data
-- itself (never from ingestion time), so a Kafka replay converges to one copy.
-- non_replicated_deduplication_window keeps recent insert_deduplication_tokens, so a
-- retried sink batch is dropped at insert time already (Replicated* tables use
-- replicated_deduplication_window instead, which is on by default).

CREATE DATABASE IF NOT EXISTS mallwatt;

-- One row per meter read. Codecs measured on 200k synthetic reads (docs/warehouse.md):
-- sorted by circuit and time, ts steps by a jittery poll interval (Delta 4.4x beats
-- DoubleDelta 3.1x) and the 0.01 kWh registers grow slowly (Delta 7.1x; Gorilla 2.5x is
-- worse than plain ZSTD 2.7x); noisy measurements compress best with ZSTD alone.
-- version = collected_at: a replay carries the same value; a later re-read wins.
CREATE TABLE IF NOT EXISTS mallwatt.readings
(
    mall_id       LowCardinality(String),
    account_id    String CODEC(ZSTD(1)),
    meter_id      String CODEC(ZSTD(1)),
    circuit_id    String CODEC(ZSTD(1)),
    ts            DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    import_kwh    Float64 CODEC(Delta, ZSTD(1)),
    export_kwh    Nullable(Float64) CODEC(Delta, ZSTD(1)),
    power_w       Nullable(Float64) CODEC(ZSTD(1)),
    voltage_v     Nullable(Float64) CODEC(ZSTD(1)),
    current_a     Nullable(Float64) CODEC(ZSTD(1)),
    power_factor  Nullable(Float64) CODEC(ZSTD(1)),
    relay         LowCardinality(String),
    flags         Array(LowCardinality(String)),
    batch_id      String CODEC(ZSTD(1)),
    collector_id  LowCardinality(String),
    collected_at  DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(DoubleDelta, ZSTD(1))
)
ENGINE = ReplacingMergeTree(collected_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (mall_id, circuit_id, ts)
-- Raw retention: change with infra.warehouse.set_raw_retention(client, days).
-- ttl_only_drop_parts drops whole monthly parts instead of rewriting them.
TTL toDateTime(ts) + INTERVAL 1095 DAY DELETE
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

-- Money movements. entry_id and ts both derive from the input that caused the entry
-- (LedgerEntry contract), so the sort key is stable under replay.
CREATE TABLE IF NOT EXISTS mallwatt.ledger
(
    entry_id             String,
    account_id           String,
    mall_id              LowCardinality(String),
    kind                 LowCardinality(String),
    amount_minor         Int64 CODEC(T64, ZSTD(1)),
    balance_after_minor  Int64 CODEC(ZSTD(1)),
    ts                   DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    source_id            String CODEC(ZSTD(1)),
    meter_id             Nullable(String),
    circuit_id           Nullable(String),
    interval_start       Nullable(DateTime64(3, 'UTC')),
    energy_wh            Nullable(Int64),
    tou_period           LowCardinality(Nullable(String)),
    tier                 Nullable(Int32),
    rate                 Nullable(String),
    estimated            Bool,
    ingested_at          DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (account_id, ts, entry_id)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS mallwatt.alerts
(
    alert_id     String,
    kind         LowCardinality(String),
    severity     LowCardinality(String),
    mall_id      LowCardinality(String),
    account_id   Nullable(String),
    meter_id     Nullable(String),
    ts           DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    message      String CODEC(ZSTD(3)),
    details      Map(String, String),
    ingested_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (mall_id, ts, alert_id)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS mallwatt.relay_commands
(
    command_id    String,
    action        LowCardinality(String),
    reason        LowCardinality(String),
    mall_id       LowCardinality(String),
    gateway_id    LowCardinality(String),
    meter_id      String,
    account_id    Nullable(String),
    issued_at     DateTime64(3, 'UTC'),
    cause_ts      Nullable(DateTime64(3, 'UTC')),
    requested_by  LowCardinality(String),
    ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (mall_id, meter_id, issued_at, command_id)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS mallwatt.relay_outcomes
(
    command_id   String,
    action       LowCardinality(String),
    status       LowCardinality(String),
    mall_id      LowCardinality(String),
    gateway_id   LowCardinality(String),
    meter_id     String,
    relay_after  LowCardinality(String),
    attempts     Int32,
    ts           DateTime64(3, 'UTC'),
    detail       String,
    ingested_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (mall_id, meter_id, command_id, ts)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS mallwatt.collector_events
(
    event_id      String,
    collector_id  LowCardinality(String),
    mall_id       LowCardinality(String),
    gateway_id    Nullable(String),
    meter_id      Nullable(String),
    kind          LowCardinality(String),
    ts            DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    detail        String,
    ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (mall_id, collector_id, ts, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- Messages some stage could not process: the DeadLetter topic, plus messages the sink
-- itself could not decode on that topic (stage = 'sink').
CREATE TABLE IF NOT EXISTS mallwatt.dead_letters
(
    source_topic      LowCardinality(String),
    source_partition  Int32,
    source_offset     Int64,
    stage             LowCardinality(String),
    reason            String,
    key               Nullable(String),
    value             Nullable(String),
    ts                DateTime64(3, 'UTC'),
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (source_topic, source_partition, source_offset, stage)
SETTINGS non_replicated_deduplication_window = 1000;

-- How far the sink has written each topic partition. Only max() aggregates, so
-- rows from replays or retries can never move a watermark backwards.
CREATE TABLE IF NOT EXISTS mallwatt.ingest_watermark
(
    topic         LowCardinality(String),
    partition     Int32,
    max_offset    SimpleAggregateFunction(max, Int64),
    max_event_ts  SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    updated_at    SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY (topic, partition);
