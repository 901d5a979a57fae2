use outbox_core::{PartitionLease, RelayStore};
use outbox_postgres::{PgRelayStore, Schema};
use sqlx::PgPool;
use std::time::Instant;

#[tokio::main]
async fn main() {
    let pool = PgPool::connect("postgres://postgres@127.0.0.1:5432/test")
        .await
        .unwrap();
    let schema = Schema::new("xp").unwrap();
    let store = PgRelayStore::new(pool.clone(), &schema);
    let held: Vec<PartitionLease> = (0..64)
        .map(|p| PartitionLease {
            partition: p,
            fence: 1,
        })
        .collect();
    let raw = "SELECT e.seq, e.event_id, e.aggregate_type, e.aggregate_id, e.partition_no, e.event_type, e.topic, e.message_key, e.headers::text, e.payload, e.attempts, EXTRACT(EPOCH FROM clock_timestamp() - e.created_at)::float8 AS age FROM xp.event_outbox e WHERE e.status = 'pending' ORDER BY e.seq LIMIT $1";
    let bare =
        "SELECT e.seq FROM xp.event_outbox e WHERE e.status = 'pending' ORDER BY e.seq LIMIT $1";
    for round in 0..3 {
        let t = Instant::now();
        for _ in 0..50 {
            let b = store.claim(&held, 2000).await.unwrap();
            assert_eq!(b.len(), 2000);
        }
        let claim = t.elapsed() / 50;
        let t = Instant::now();
        for _ in 0..50 {
            let r = sqlx::query(raw)
                .bind(2000i64)
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(r.len(), 2000);
        }
        let rawt = t.elapsed() / 50;
        let t = Instant::now();
        for _ in 0..50 {
            let r: Vec<i64> = sqlx::query_scalar(bare)
                .bind(2000i64)
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(r.len(), 2000);
        }
        let baret = t.elapsed() / 50;
        let full = "SELECT e.seq, e.event_id, e.aggregate_type, e.aggregate_id, e.partition_no, e.event_type, e.topic, e.message_key, e.headers::text, e.payload, e.attempts, EXTRACT(EPOCH FROM clock_timestamp() - e.created_at)::float8 AS age FROM xp.event_outbox e WHERE e.status = 'pending' AND e.seq NOT IN (SELECT unnest($2::int8[])) AND NOT EXISTS (SELECT 1 FROM xp.event_outbox b WHERE b.status = 'pending' AND b.retry_at IS NOT NULL AND b.aggregate_type = e.aggregate_type AND b.aggregate_id = e.aggregate_id AND b.seq <= e.seq AND b.retry_at > now()) ORDER BY e.seq LIMIT $1";
        let t = Instant::now();
        for _ in 0..50 {
            let r = sqlx::query(full)
                .bind(2000i64)
                .bind(Vec::<i64>::new())
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(r.len(), 2000);
        }
        println!("claim sql without decode {:?}", t.elapsed() / 50);
        let ex: Vec<i64> = sqlx::query_scalar(bare)
            .bind(4000i64)
            .fetch_all(&pool)
            .await
            .unwrap();
        let t = Instant::now();
        for _ in 0..50 {
            let b = store.claim_excluding(&held, 2000, &ex).await.unwrap();
            assert_eq!(b.len(), 2000);
        }
        let excl = t.elapsed() / 50;
        println!("round {round}: claim {claim:?}  raw rows same cols {rawt:?}  seq only {baret:?}  claim excluding 4000 {excl:?}");
    }
}
