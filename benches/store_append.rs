//! Store append throughput on both backends, next to raw sqlx INSERTs of rows of the same size
//! in the same run: 1 and 16 concurrent writers, batches of 1 and of 100 events.
//!
//! cargo bench --bench store_append            (DATABASE_URL names the PostgreSQL server;
//!                                               a scratch database is created and dropped)
//! CHARTLOG_BENCH_SCALE=4 cargo bench --bench store_append   (4x the events per case)
//!
//! Events are sealed and signed before the clock starts: this measures the store, not crypto
//! (benches/crypto.rs measures that).

use std::time::{Duration, Instant};

use chartlog_crypto::{EventHash, SealedEvent};
use chartlog_domain::StreamId;
use chartlog_store::conformance::EventFactory;
use chartlog_store::postgres::PostgresEventStore;
use chartlog_store::sqlite::SqliteEventStore;
use chartlog_store::{EventStore, StreamHead};
use sqlx::{Connection, Executor, PgConnection, PgPool, QueryBuilder, SqlitePool};
use uuid::Uuid;

const PAYLOAD_BYTES: usize = 1024;

#[derive(Clone, Copy)]
struct Case {
    writers: usize,
    batch: usize,
    appends_per_writer: usize,
}

fn cases(scale: usize) -> Vec<Case> {
    vec![
        Case {
            writers: 1,
            batch: 1,
            appends_per_writer: 600 * scale,
        },
        Case {
            writers: 16,
            batch: 1,
            appends_per_writer: 150 * scale,
        },
        Case {
            writers: 1,
            batch: 100,
            appends_per_writer: 40 * scale,
        },
        Case {
            writers: 16,
            batch: 100,
            appends_per_writer: 6 * scale,
        },
    ]
}

/// Each writer's appends, sealed and chained up front.
fn prepare(factory: &EventFactory, case: Case) -> Vec<Vec<Vec<SealedEvent>>> {
    let payload = vec![0x5a_u8; PAYLOAD_BYTES];
    (0..case.writers)
        .map(|_| {
            let stream = StreamId::patient(chartlog_domain::PatientId::from_uuid(Uuid::new_v4()));
            let mut head = StreamHead {
                version: 0,
                hash: EventHash::GENESIS,
            };
            (0..case.appends_per_writer)
                .map(|_| {
                    let batch: Vec<SealedEvent> = (0..case.batch)
                        .map(|_| {
                            let event =
                                factory.event(&stream, head.version + 1, head.hash, &payload);
                            head = StreamHead {
                                version: head.version + 1,
                                hash: event.hash,
                            };
                            event
                        })
                        .collect();
                    batch
                })
                .collect()
        })
        .collect()
}

async fn run_store<S: EventStore + Clone>(
    store: &S,
    work: Vec<Vec<Vec<SealedEvent>>>,
) -> (u64, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|appends| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut events = 0u64;
                for batch in appends {
                    let stream = batch[0].header.stream_id.clone();
                    let expected = batch[0].header.stream_version - 1;
                    store
                        .append(&stream, expected, &batch)
                        .await
                        .expect("append");
                    events += batch.len() as u64;
                }
                events
            })
        })
        .collect();
    let mut events = 0;
    for task in tasks {
        events += task.await.expect("writer");
    }
    (events, started.elapsed())
}

/// The same rows' bytes, inserted with plain sqlx: one INSERT per batch of 1 (autocommit), or
/// one multi-row INSERT in a transaction per batch of 100.
macro_rules! raw_insert {
    ($pool:expr, $case:expr, $row_bytes:expr, $db:ty) => {{
        let case: Case = $case;
        let started = Instant::now();
        let tasks: Vec<_> = (0..case.writers)
            .map(|writer| {
                let pool = $pool.clone();
                tokio::spawn(async move {
                    let body = vec![0x5a_u8; $row_bytes];
                    let stream = format!("raw-{writer}-{}", Uuid::new_v4());
                    for _ in 0..case.appends_per_writer {
                        let mut builder: QueryBuilder<$db> =
                            QueryBuilder::new("INSERT INTO bench_raw_rows (stream_id, body) ");
                        builder.push_values(0..case.batch, |mut row, _| {
                            row.push_bind(stream.clone()).push_bind(body.clone());
                        });
                        if case.batch == 1 {
                            builder.build().execute(&pool).await.expect("raw insert");
                        } else {
                            let mut tx = pool.begin().await.expect("begin");
                            builder.build().execute(&mut *tx).await.expect("raw insert");
                            tx.commit().await.expect("commit");
                        }
                    }
                    (case.appends_per_writer * case.batch) as u64
                })
            })
            .collect();
        let mut rows = 0;
        for task in tasks {
            rows += task.await.expect("raw writer");
        }
        (rows, started.elapsed())
    }};
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn report(backend: &str, case: Case, store: (u64, Duration), raw: (u64, Duration)) {
    let store_rate = per_second(store.0, store.1);
    let raw_rate = per_second(raw.0, raw.1);
    println!(
        "| {backend:<10} | {:>7} | {:>5} | {:>8} | {:>12.0} | {:>12.0} | {:>5.2}x |",
        case.writers,
        case.batch,
        store.0,
        store_rate,
        raw_rate,
        store_rate / raw_rate
    );
}

/// Bytes of one stored event row, so raw rows carry the same weight.
fn event_row_bytes(event: &SealedEvent) -> usize {
    // ciphertext + hashes + signature + ids + the short text columns, roughly as stored.
    event.ciphertext.len() + 32 + 32 + 64 + 16 * 4 + 8 * 4 + 64
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let scale: usize = std::env::var("CHARTLOG_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let factory = EventFactory::new();
    let row_bytes = event_row_bytes(&factory.event(
        &StreamId::parse("probe").expect("stream id"),
        1,
        EventHash::GENESIS,
        &[0; PAYLOAD_BYTES],
    ));

    println!("store append vs raw INSERT, {PAYLOAD_BYTES}-byte payloads, events/s");
    println!("| backend    | writers | batch |   events |  store ev/s  |   raw rows/s | ratio |");
    println!("|------------|---------|-------|----------|--------------|--------------|-------|");

    for case in cases(scale) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteEventStore::open(&dir.path().join("bench.db"))
            .await
            .expect("sqlite");
        let store_result = run_store(&store, prepare(&factory, case)).await;
        let pool: SqlitePool = store.pool().clone();
        pool.execute("CREATE TABLE bench_raw_rows (id INTEGER PRIMARY KEY, stream_id TEXT NOT NULL, body BLOB NOT NULL)")
            .await
            .expect("raw table");
        let raw_result = raw_insert!(pool, case, row_bytes, sqlx::Sqlite);
        report("sqlite", case, store_result, raw_result);
        pool.close().await;
    }

    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("DATABASE_URL is not set: PostgreSQL cases skipped");
        return;
    };
    let scratch = format!("chartlog_bench_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&url)
        .await
        .expect("connect to DATABASE_URL");
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {scratch}")))
        .await
        .expect("create scratch database");
    let scratch_url = match url.rfind('/') {
        Some(slash) => format!("{}/{scratch}", &url[..slash]),
        None => panic!("DATABASE_URL has no database path"),
    };
    let store = PostgresEventStore::connect(&scratch_url)
        .await
        .expect("postgres");
    let pool: PgPool = store.pool().clone();
    pool.execute("CREATE TABLE bench_raw_rows (id bigserial PRIMARY KEY, stream_id text NOT NULL, body bytea NOT NULL)")
        .await
        .expect("raw table");
    for case in cases(scale) {
        // Each case runs twice and reports the second pass: the first pays for what a fresh
        // database costs whoever writes first (the checkpoint after CREATE DATABASE makes
        // every first page touch log a full page; relations grow from nothing).
        let mut measured = None;
        for _pass in 0..2 {
            let store_result = run_store(&store, prepare(&factory, case)).await;
            let raw_result = raw_insert!(pool, case, row_bytes, sqlx::Postgres);
            measured = Some((store_result, raw_result));
        }
        let (store_result, raw_result) = measured.expect("two passes ran");
        report("postgres", case, store_result, raw_result);
    }
    store.close().await;
    admin
        .execute("SELECT 1")
        .await
        .expect("admin connection alive");
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {scratch} WITH (FORCE)"
        )))
        .await
        .expect("drop scratch database");
}
