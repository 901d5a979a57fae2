//! Every case against every store and transport: PostgreSQL, SQLite and MySQL/MariaDB, Kafka
//! NATS JetStream and RabbitMQ (real servers) and the in-process bus.

use outbox_conformance::cases;
use outbox_conformance::stores::{MySqlStore, PgStore, SqliteStore};
use outbox_conformance::transports::{
    BusTransport, KafkaTransport, NatsTransport, RabbitTransport,
};
use outbox_conformance::{init_logs, Store, Transport};

async fn run(store: Box<dyn Store>, transport: Box<dyn Transport>, case: cases::Case) {
    init_logs();
    case(store.as_ref(), transport.as_ref()).await;
    store.cleanup().await;
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[tokio::test]
            async fn postgres_kafka() {
                run(PgStore::boxed().await, KafkaTransport::boxed(), cases::$case).await
            }

            #[tokio::test]
            async fn postgres_bus() {
                run(PgStore::boxed().await, BusTransport::boxed(), cases::$case).await
            }

            #[tokio::test]
            async fn sqlite_kafka() {
                run(SqliteStore::boxed().await, KafkaTransport::boxed(), cases::$case).await
            }

            #[tokio::test]
            async fn sqlite_bus() {
                run(SqliteStore::boxed().await, BusTransport::boxed(), cases::$case).await
            }

            #[tokio::test]
            async fn mysql_kafka() {
                run(MySqlStore::boxed().await, KafkaTransport::boxed(), cases::$case).await
            }

            #[tokio::test]
            async fn postgres_nats() {
                run(PgStore::boxed().await, NatsTransport::boxed().await, cases::$case).await
            }

            #[tokio::test]
            async fn sqlite_nats() {
                run(SqliteStore::boxed().await, NatsTransport::boxed().await, cases::$case).await
            }

            #[tokio::test]
            async fn mysql_nats() {
                run(MySqlStore::boxed().await, NatsTransport::boxed().await, cases::$case).await
            }

            #[tokio::test]
            async fn postgres_rabbitmq() {
                run(PgStore::boxed().await, RabbitTransport::for_case(stringify!($case)).await, cases::$case).await
            }

            #[tokio::test]
            async fn sqlite_rabbitmq() {
                run(SqliteStore::boxed().await, RabbitTransport::for_case(stringify!($case)).await, cases::$case).await
            }

            #[tokio::test]
            async fn mysql_rabbitmq() {
                run(MySqlStore::boxed().await, RabbitTransport::for_case(stringify!($case)).await, cases::$case).await
            }

            #[tokio::test]
            async fn mysql_bus() {
                run(MySqlStore::boxed().await, BusTransport::boxed(), cases::$case).await
            }
        }
    )*};
}

conformance!(
    atomicity,
    order_per_aggregate,
    retry_then_dead_letter,
    outage,
    inbox_dedupe,
    consumer_order_across_restart
);

/// Store-level: the transport plays no part.
mod claim_excluding {
    use super::*;

    #[tokio::test]
    async fn postgres() {
        run(
            PgStore::boxed().await,
            BusTransport::boxed(),
            cases::claim_excluding,
        )
        .await
    }

    #[tokio::test]
    async fn sqlite() {
        run(
            SqliteStore::boxed().await,
            BusTransport::boxed(),
            cases::claim_excluding,
        )
        .await
    }

    #[tokio::test]
    async fn mysql() {
        run(
            MySqlStore::boxed().await,
            BusTransport::boxed(),
            cases::claim_excluding,
        )
        .await
    }
}

/// Store-level cases with a test publisher in place of a transport.
macro_rules! store_level {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[tokio::test]
            async fn postgres() {
                run(PgStore::boxed().await, BusTransport::boxed(), cases::$case).await
            }

            #[tokio::test]
            async fn sqlite() {
                run(SqliteStore::boxed().await, BusTransport::boxed(), cases::$case).await
            }

            #[tokio::test]
            async fn mysql() {
                run(MySqlStore::boxed().await, BusTransport::boxed(), cases::$case).await
            }
        }
    )*};
}

store_level!(
    one_stuck_partition,
    foreign_event_id_header,
    restarted_instance_takes_its_partitions_back
);

/// Brokers with a durable process of their own, killed and restarted under load.
mod broker_killed_and_restarted {
    use super::*;

    #[tokio::test]
    async fn postgres_nats() {
        run(
            PgStore::boxed().await,
            NatsTransport::boxed().await,
            cases::broker_killed_and_restarted,
        )
        .await
    }

    #[tokio::test]
    async fn sqlite_nats() {
        run(
            SqliteStore::boxed().await,
            NatsTransport::boxed().await,
            cases::broker_killed_and_restarted,
        )
        .await
    }

    #[tokio::test]
    async fn mysql_nats() {
        run(
            MySqlStore::boxed().await,
            NatsTransport::boxed().await,
            cases::broker_killed_and_restarted,
        )
        .await
    }

    async fn rabbitmq() -> Box<dyn Transport> {
        RabbitTransport::for_case("broker_killed_and_restarted").await
    }

    // RabbitMQ with one group on the topic; the two-group row below is ignored: in 3 runs of
    // about 210, one group missed everything after the kill (what its queue held before it
    // and what was published right after the restart) while the other group received it all;
    // the node's log shows the queue recovered, and it stayed empty. See docs/guarantees.md,
    // Limits.
    #[tokio::test]
    async fn postgres_rabbitmq() {
        run(
            PgStore::boxed().await,
            rabbitmq().await,
            cases::broker_killed_and_restarted_one_group,
        )
        .await
    }

    #[tokio::test]
    async fn sqlite_rabbitmq() {
        run(
            SqliteStore::boxed().await,
            rabbitmq().await,
            cases::broker_killed_and_restarted_one_group,
        )
        .await
    }

    #[tokio::test]
    async fn mysql_rabbitmq() {
        run(
            MySqlStore::boxed().await,
            rabbitmq().await,
            cases::broker_killed_and_restarted_one_group,
        )
        .await
    }

    #[tokio::test]
    #[ignore = "RabbitMQ limit: a group's queue can come back empty from a node kill (Limits)"]
    async fn postgres_rabbitmq_two_groups() {
        run(
            PgStore::boxed().await,
            rabbitmq().await,
            cases::broker_killed_and_restarted,
        )
        .await
    }
}
