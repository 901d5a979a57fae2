-- outbox migration 2 (MySQL/MariaDB): the consumer inbox.
-- A row per (consumer, event) processed, written in the same transaction as the handler's
-- changes: a second delivery of the same event finds the row and is skipped.

CREATE TABLE event_inbox (
    consumer     VARCHAR(255) NOT NULL,
    event_id     CHAR(36)     CHARACTER SET ascii NOT NULL,
    event_type   VARCHAR(512),
    topic        VARCHAR(255),
    partition_no INT,
    msg_offset   BIGINT,
    processed_at BIGINT       NOT NULL,
    PRIMARY KEY (consumer, event_id),
    -- retention sweeps delete the oldest rows in small batches
    KEY event_inbox_processed_idx (processed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
