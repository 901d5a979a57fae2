-- outbox migration 1: the outbox table and the relay's lease tables.
-- Applied by outbox_postgres::migrate with search_path set to the configured schema;
-- to apply by hand: SET search_path TO <schema>; then run this file.

CREATE TABLE event_outbox (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    -- relay partition of the aggregate (FNV-1a 64 of type, 0x00, id; modulo 64)
    partition_no    SMALLINT    NOT NULL CHECK (partition_no >= 0 AND partition_no < 64),
    event_type      TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    message_key     TEXT        NOT NULL,
    headers         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    payload         BYTEA       NOT NULL,
    idempotency_key TEXT,
    status          TEXT        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'published', 'dead')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    retry_at        TIMESTAMPTZ,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    published_at    TIMESTAMPTZ,
    dead_at         TIMESTAMPTZ
);

CREATE UNIQUE INDEX event_outbox_event_id_key ON event_outbox (event_id);
-- the relay's claim scan: pending events in sequence order
CREATE INDEX event_outbox_pending_idx ON event_outbox (seq) WHERE status = 'pending';
-- aggregates blocked by a head event waiting for its retry (few rows)
CREATE INDEX event_outbox_retry_idx ON event_outbox (aggregate_type, aggregate_id, seq)
    WHERE status = 'pending' AND retry_at IS NOT NULL;
CREATE INDEX event_outbox_dead_idx ON event_outbox (seq) WHERE status = 'dead';
CREATE INDEX event_outbox_published_idx ON event_outbox (published_at) WHERE status = 'published';

-- Idempotency keys outlive the events they admitted (published events are deleted), so a
-- repeated business fact can never be enqueued twice.
CREATE TABLE event_outbox_idempotency (
    idempotency_key TEXT        PRIMARY KEY,
    event_id        UUID        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per relay partition; a relay works only on partitions it holds a lease on.
-- fence grows whenever a partition changes hands and guards every change a relay makes.
CREATE TABLE event_outbox_partition (
    partition_no SMALLINT    PRIMARY KEY CHECK (partition_no >= 0 AND partition_no < 64),
    owner        UUID,
    lease_until  TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    fence        BIGINT      NOT NULL DEFAULT 0
);
INSERT INTO event_outbox_partition (partition_no) SELECT generate_series(0, 63);

-- Relays alive on this table (for each relay's fair share of partitions).
CREATE TABLE event_outbox_relay (
    relay_id   UUID        PRIMARY KEY,
    name       TEXT        NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
