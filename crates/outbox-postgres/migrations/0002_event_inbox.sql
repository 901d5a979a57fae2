-- outbox migration 2: the consumer inbox.
-- A row per (consumer, event) processed, written in the same transaction as the handler's
-- changes: a second delivery of the same event finds the row and is skipped.

CREATE TABLE event_inbox (
    consumer     TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    event_type   TEXT,
    topic        TEXT,
    partition_no INTEGER,
    msg_offset   BIGINT,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- retention sweeps delete the oldest rows in small batches
CREATE INDEX event_inbox_processed_idx ON event_inbox (processed_at);
