-- outbox migration 1 (MySQL/MariaDB): the outbox table and the relay's lease tables.
-- Times are integer milliseconds since the Unix epoch (the database clock). Text compares
-- byte for byte (utf8mb4_bin), as in PostgreSQL and SQLite.

CREATE TABLE event_outbox (
    seq             BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id        CHAR(36)     CHARACTER SET ascii NOT NULL,
    aggregate_type  VARCHAR(512) NOT NULL,
    aggregate_id    VARCHAR(512) NOT NULL,
    -- relay partition of the aggregate (FNV-1a 64 of type, 0x00, id; modulo 64)
    partition_no    SMALLINT     NOT NULL CHECK (partition_no >= 0 AND partition_no < 64),
    event_type      VARCHAR(512) NOT NULL,
    topic           VARCHAR(255) NOT NULL,
    message_key     TEXT         NOT NULL,
    headers         LONGTEXT     NOT NULL,
    payload         LONGBLOB     NOT NULL,
    idempotency_key VARCHAR(512),
    status          VARCHAR(16)  CHARACTER SET ascii NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'published', 'dead')),
    attempts        INT          NOT NULL DEFAULT 0,
    retry_at        BIGINT,
    last_error      MEDIUMTEXT,
    created_at      BIGINT       NOT NULL,
    published_at    BIGINT,
    dead_at         BIGINT,
    UNIQUE KEY event_outbox_event_id_key (event_id),
    -- the relay's claim scan (pending events in sequence order) and the dead letters
    KEY event_outbox_status_idx (status, seq),
    -- aggregates blocked by a head event waiting for its retry: retry_at is NULL otherwise
    KEY event_outbox_retry_idx (retry_at),
    KEY event_outbox_published_idx (status, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Idempotency keys outlive the events they admitted (published events are deleted), so a
-- repeated business fact can never be enqueued twice.
CREATE TABLE event_outbox_idempotency (
    idempotency_key VARCHAR(512) NOT NULL PRIMARY KEY,
    event_id        CHAR(36)     CHARACTER SET ascii NOT NULL,
    created_at      BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per relay partition; a relay works only on partitions it holds a lease on.
-- fence grows whenever a partition changes hands and guards every change a relay makes.
CREATE TABLE event_outbox_partition (
    partition_no SMALLINT NOT NULL PRIMARY KEY CHECK (partition_no >= 0 AND partition_no < 64),
    owner        CHAR(36) CHARACTER SET ascii,
    lease_until  BIGINT   NOT NULL DEFAULT 0,
    fence        BIGINT   NOT NULL DEFAULT 0
) ENGINE = InnoDB;
INSERT INTO event_outbox_partition (partition_no) VALUES
    (0),
    (1),
    (2),
    (3),
    (4),
    (5),
    (6),
    (7),
    (8),
    (9),
    (10),
    (11),
    (12),
    (13),
    (14),
    (15),
    (16),
    (17),
    (18),
    (19),
    (20),
    (21),
    (22),
    (23),
    (24),
    (25),
    (26),
    (27),
    (28),
    (29),
    (30),
    (31),
    (32),
    (33),
    (34),
    (35),
    (36),
    (37),
    (38),
    (39),
    (40),
    (41),
    (42),
    (43),
    (44),
    (45),
    (46),
    (47),
    (48),
    (49),
    (50),
    (51),
    (52),
    (53),
    (54),
    (55),
    (56),
    (57),
    (58),
    (59),
    (60),
    (61),
    (62),
    (63);

-- Relays alive on this table (for each relay's fair share of partitions), with what each
-- is doing (in flight, published in the last minute, per topic) as JSON.
CREATE TABLE event_outbox_relay (
    relay_id   CHAR(36)     CHARACTER SET ascii NOT NULL PRIMARY KEY,
    name       VARCHAR(255) NOT NULL,
    started_at BIGINT       NOT NULL,
    expires_at BIGINT       NOT NULL,
    activity   MEDIUMTEXT   NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Writers of one aggregate take turns on its bucket's row until they commit, so that
-- sequence order is commit order (MySQL's named locks live as long as the session, not the
-- transaction). 1,024 buckets: unrelated aggregates rarely share one, and a shared one only
-- makes two writers take turns.
CREATE TABLE event_outbox_write_lock (
    bucket SMALLINT NOT NULL PRIMARY KEY
) ENGINE = InnoDB;
INSERT INTO event_outbox_write_lock (bucket)
SELECT a.n * 32 + b.n FROM
    (SELECT 0 AS n UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
     UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
     UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
     UNION ALL SELECT 14 UNION ALL SELECT 15 UNION ALL SELECT 16 UNION ALL SELECT 17
     UNION ALL SELECT 18 UNION ALL SELECT 19 UNION ALL SELECT 20 UNION ALL SELECT 21
     UNION ALL SELECT 22 UNION ALL SELECT 23 UNION ALL SELECT 24 UNION ALL SELECT 25
     UNION ALL SELECT 26 UNION ALL SELECT 27 UNION ALL SELECT 28 UNION ALL SELECT 29
     UNION ALL SELECT 30 UNION ALL SELECT 31) AS a
CROSS JOIN
    (SELECT 0 AS n UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
     UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
     UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
     UNION ALL SELECT 14 UNION ALL SELECT 15 UNION ALL SELECT 16 UNION ALL SELECT 17
     UNION ALL SELECT 18 UNION ALL SELECT 19 UNION ALL SELECT 20 UNION ALL SELECT 21
     UNION ALL SELECT 22 UNION ALL SELECT 23 UNION ALL SELECT 24 UNION ALL SELECT 25
     UNION ALL SELECT 26 UNION ALL SELECT 27 UNION ALL SELECT 28 UNION ALL SELECT 29
     UNION ALL SELECT 30 UNION ALL SELECT 31) AS b;
