-- Dimensions for analytics: the portfolio config (pipelines/portfolio.py) as tables, loaded
-- by infra.warehouse_dims.load_dimensions (python -m infra.warehouse dims --config FILE).
--
-- ReplacingMergeTree(version, is_deleted) keyed by id: loading the same config again only
-- adds rows that collapse into the same content; an id that disappeared from the config
-- gets a tombstone (is_deleted = 1). Read with FINAL (the tables are small), which keeps
-- the newest version and drops tombstones. version = load time in ms, so a later load wins.

CREATE TABLE IF NOT EXISTS mallwatt.dim_malls
(
    mall_id       String,
    name          String,
    timezone      LowCardinality(String),
    tariff_id     String,
    currency      LowCardinality(String),
    holidays      Array(Date),
    leasable_m2   Float64,  -- sum of the merchants' leased areas (vacant units included)
    version       UInt64,
    is_deleted    UInt8 DEFAULT 0,
    loaded_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY mall_id;

CREATE TABLE IF NOT EXISTS mallwatt.dim_areas
(
    area_id     String,
    mall_id     LowCardinality(String),
    name        String,
    floor       Int32,
    version     UInt64,
    is_deleted  UInt8 DEFAULT 0,
    loaded_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY area_id;

-- One prepaid account per merchant (the merchant id is the account id), plus one landlord
-- account per mall ('<mall>-LANDLORD', business_type 'common') that common-area meters bill.
CREATE TABLE IF NOT EXISTS mallwatt.dim_accounts
(
    account_id      String,
    mall_id         LowCardinality(String),
    name            String,
    business_type   LowCardinality(String),
    area_id         String,
    level           LowCardinality(String),
    leased_area_m2  Float64,
    tariff_id       String,
    protected       Bool,
    vacant          Bool,
    is_landlord     Bool,
    version         UInt64,
    is_deleted      UInt8 DEFAULT 0,
    loaded_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY account_id;

-- Circuits with everything a report groups by: purpose, meter, account, mall, pool.
CREATE TABLE IF NOT EXISTS mallwatt.dim_circuits
(
    circuit_id       String,
    meter_id         String,
    mall_id          LowCardinality(String),
    account_id       String,
    purpose          LowCardinality(String),
    meter_model      LowCardinality(String),
    gateway_id       String,
    max_kw           Float64,
    poll_interval_s  Float64,
    is_common        Bool,
    pool_ids         Array(String),
    version          UInt64,
    is_deleted       UInt8 DEFAULT 0,
    loaded_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY circuit_id;

CREATE TABLE IF NOT EXISTS mallwatt.dim_pools
(
    pool_id       String,
    mall_id       LowCardinality(String),
    name          String,
    method        LowCardinality(String),
    meter_ids     Array(String),
    excluded      Array(String),
    fixed_shares  Map(String, Float64),
    version       UInt64,
    is_deleted    UInt8 DEFAULT 0,
    loaded_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY pool_id;
