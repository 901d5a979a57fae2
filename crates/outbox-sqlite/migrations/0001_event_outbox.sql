-- outbox migration 1 (SQLite): the outbox table and the relay's lease tables.
-- Times are integer milliseconds since the Unix epoch.

CREATE TABLE event_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    partition_no    INTEGER NOT NULL CHECK (partition_no >= 0 AND partition_no < 64),
    event_type      TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    message_key     TEXT    NOT NULL,
    headers         TEXT    NOT NULL DEFAULT '{}',
    payload         BLOB    NOT NULL,
    idempotency_key TEXT,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'published', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    retry_at        INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    published_at    INTEGER,
    dead_at         INTEGER
);

CREATE UNIQUE INDEX event_outbox_event_id_key ON event_outbox (event_id);
CREATE INDEX event_outbox_pending_idx ON event_outbox (seq) WHERE status = 'pending';
CREATE INDEX event_outbox_retry_idx ON event_outbox (aggregate_type, aggregate_id, seq)
    WHERE status = 'pending' AND retry_at IS NOT NULL;
CREATE INDEX event_outbox_dead_idx ON event_outbox (seq) WHERE status = 'dead';
CREATE INDEX event_outbox_published_idx ON event_outbox (published_at) WHERE status = 'published';

CREATE TABLE event_outbox_idempotency (
    idempotency_key TEXT    PRIMARY KEY,
    event_id        TEXT    NOT NULL,
    created_at      INTEGER NOT NULL
);

CREATE TABLE event_outbox_partition (
    partition_no INTEGER PRIMARY KEY CHECK (partition_no >= 0 AND partition_no < 64),
    owner        TEXT,
    lease_until  INTEGER NOT NULL DEFAULT 0,
    fence        INTEGER NOT NULL DEFAULT 0
);
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 63)
INSERT INTO event_outbox_partition (partition_no) SELECT i FROM n;

CREATE TABLE event_outbox_relay (
    relay_id   TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL,
    started_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
