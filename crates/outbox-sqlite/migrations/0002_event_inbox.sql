-- outbox migration 2 (SQLite): the consumer inbox.

CREATE TABLE event_inbox (
    consumer     TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT,
    topic        TEXT,
    partition_no INTEGER,
    msg_offset   INTEGER,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX event_inbox_processed_idx ON event_inbox (processed_at);
