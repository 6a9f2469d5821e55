//! Concurrency:
//! - 64 writers race on ONE stream through `EventStore::append` with expected versions, from
//!   the stream's creation to version N (SQLite and PostgreSQL): every version has exactly one
//!   winner, every loser gets the version conflict, and the stream holds exactly the winners'
//!   events, gapless;
//! - 64 HTTPS clients race on one patient with If-Match: one 2xx per version, 412 for the rest;
//! - 32 clients write to 32 patients over HTTPS for a sustained period (SQLite and
//!   PostgreSQL, where the server gets the fewest connections it may have and keeps to
//!   them); a history checker then confirms that the global log and every projection
//!   (chart, record history, audit trail, de-identified views) hold every acknowledged event
//!   exactly once and in order, and then that the checker itself refuses damaged read models;
//! - concurrent requests with one Idempotency-Key record once, and all get its answer;
//! - two servers on one PostgreSQL database: a command is checked and decided on the fresh
//!   record when the other server moved it on since this one last saw it;
//! - a chart read holds the writes before it while the projection runner is held back.
//!
//! Full mode: `CHARTLOG_CONCURRENCY_SECONDS` sets how long the 32 clients write (default 3;
//! full 60), `CHARTLOG_RACE_VERSIONS` how many versions the 64 store writers fight over
//! (default 100; full 1000) and `CHARTLOG_RACE_HTTP_VERSIONS` the HTTPS race (default 20;
//! full 200).

#[allow(dead_code)]
#[path = "support/clinic.rs"]
mod clinic;
#[path = "support/fresh_postgres.rs"]
mod fresh_postgres;
#[allow(dead_code)]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chartlog_domain::{EventId, StreamId};
use chartlog_store::conformance::EventFactory;
use chartlog_store::postgres::{self, PostgresEventStore};
use chartlog_store::sqlite::SqliteEventStore;
use chartlog_store::{EventStore, StoreError};
use clinic::{Ack, Clinic, Database, Outcome, check_log, check_read_models};
use fresh_postgres::FreshPostgresDatabase;
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Server, TestDir};

const RACING_WRITERS: usize = 64;
const STREAM_WRITERS: usize = 32;
const OBSERVATIONS_PER_WRITER_MIN: usize = 3;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|raw| raw.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_writers_on_one_sqlite_stream_have_one_winner_per_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open the SQLite store");
    one_winner_per_version(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_writers_on_one_postgres_stream_have_one_winner_per_version() {
    let database = FreshPostgresDatabase::create().await;
    // A connection per writer, so all 64 are in the database at once rather than queued on
    // the pool.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(RACING_WRITERS as u32 + 4)
        .connect(&database.url)
        .await
        .expect("connect to the scratch database");
    chartlog_store::postgres::MIGRATOR
        .run(&pool)
        .await
        .expect("migrate");
    let store = PostgresEventStore::from_pool(pool.clone())
        .await
        .expect("store");
    one_winner_per_version(Arc::new(store)).await;
    pool.close().await;
    database.drop().await;
}

/// Who was told they won a version.
struct Win {
    version: u64,
    event_id: EventId,
    writer: usize,
}

/// Every writer loops: read the head, append one event at it, and on a conflict read again,
/// until the stream reaches `versions`. The race starts at the stream's creation (expected
/// version 0), which the conformance suite's single-round race does not cover.
///
/// Bugs this catches: a backend whose version check and insert are not atomic (two winners of
/// one version, or a winner whose event is not the one stored), one that reports success for
/// a refused append (a claimed event missing), one that lets a stale writer in at a later
/// version (a gap or a duplicate), and a loser told anything but `Conflict`.
async fn one_winner_per_version<S: EventStore>(store: Arc<S>) {
    let versions = env_number("CHARTLOG_RACE_VERSIONS", 100);
    let factory = Arc::new(EventFactory::new());
    let stream = StreamId::parse(&format!("race-{}", uuid::Uuid::new_v4())).expect("stream id");
    let start = Arc::new(tokio::sync::Barrier::new(RACING_WRITERS));
    let mut tasks = Vec::new();
    for writer in 0..RACING_WRITERS {
        let (store, factory, stream, start) = (
            store.clone(),
            factory.clone(),
            stream.clone(),
            start.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut conflicts = 0_u64;
            start.wait().await;
            loop {
                let head = store.stream_head(&stream).await.expect("stream head");
                let expected = head.map_or(0, |head| head.version);
                if expected >= versions {
                    return (wins, conflicts);
                }
                let batch = factory.batch(&stream, head, 1);
                match store.append(&stream, expected, &batch).await {
                    Ok(outcome) => {
                        assert_eq!(
                            (outcome.stream_version, outcome.first_position),
                            (expected + 1, outcome.last_position),
                            "writer {writer}: a one-event append at {expected} lands at the next \
                             version"
                        );
                        wins.push(Win {
                            version: outcome.stream_version,
                            event_id: batch[0].header.event_id,
                            writer,
                        });
                    }
                    Err(StoreError::Conflict {
                        stream: named,
                        expected: reported,
                        actual,
                    }) => {
                        assert_eq!(named, stream, "the conflict names the stream");
                        assert_eq!(
                            reported, expected,
                            "the conflict names the expected version"
                        );
                        assert!(
                            actual > expected,
                            "a conflict at {expected} must find the stream further on, not at \
                             {actual}"
                        );
                        conflicts += 1;
                    }
                    Err(other) => {
                        panic!("writer {writer}: a losing writer must get Conflict, got {other:?}")
                    }
                }
            }
        }));
    }
    let mut wins: BTreeMap<u64, Win> = BTreeMap::new();
    let mut conflicts = 0;
    let mut winners_per_writer = vec![0_u64; RACING_WRITERS];
    for task in tasks {
        let (won, lost) = task.await.expect("writer task");
        conflicts += lost;
        for win in won {
            winners_per_writer[win.writer] += 1;
            if let Some(other) = wins.insert(win.version, win) {
                panic!(
                    "two writers were told they won version {} (writer {} and another)",
                    other.version, other.writer
                );
            }
        }
    }
    assert!(
        conflicts > 0,
        "64 writers never collided: the race did not happen"
    );
    assert_eq!(
        wins.keys().copied().collect::<Vec<_>>(),
        (1..=versions).collect::<Vec<_>>(),
        "one winner for each version 1..={versions}"
    );

    let stored = store
        .read_stream(&stream, 1, chartlog_store::READ_BATCH_MAX)
        .await
        .expect("read the stream");
    let stored_versions: Vec<u64> = stored
        .iter()
        .map(|r| r.event.header.stream_version)
        .collect();
    assert_eq!(
        stored_versions,
        (1..=versions).collect::<Vec<_>>(),
        "the stream is 1..={versions} with no gap and nothing after"
    );
    for recorded in &stored {
        let header = &recorded.event.header;
        let win = &wins[&header.stream_version];
        assert_eq!(
            header.event_id, win.event_id,
            "version {} holds another event than writer {}'s, who was told it won",
            header.stream_version, win.writer
        );
    }
    let head = store
        .stream_head(&stream)
        .await
        .expect("head")
        .expect("a head");
    assert_eq!(
        (head.version, head.hash),
        (versions, stored[stored.len() - 1].event.hash)
    );
    eprintln!(
        "{RACING_WRITERS} writers, {versions} versions: {conflicts} conflicts; wins per writer \
         {winners_per_writer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_racing_with_if_match_over_https_have_one_winner_per_version() {
    let versions = env_number("CHARTLOG_RACE_HTTP_VERSIONS", 20);
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &["--idle-timeout-minutes", "120"]);
    let clinic = Clinic::new(&dir, &server);
    let token = clinic.physician_session(&dir, &server).await;
    let registered = clinic.register_patient(&token, 7).await;
    let patient = registered.patient;
    let target = registered.stream_version + versions;

    let start = Arc::new(tokio::sync::Barrier::new(RACING_WRITERS));
    let mut tasks = Vec::new();
    for writer in 0..RACING_WRITERS {
        let (clinic, token, start) = (clinic.clone(), token.clone(), start.clone());
        let mut known = registered.stream_version;
        tasks.push(tokio::spawn(async move {
            let name = format!("client-{writer}");
            let mut wins = Vec::new();
            let mut stale = 0_u64;
            start.wait().await;
            while known < target {
                match clinic
                    .record_observation(&token, patient, Some(known), known, &name)
                    .await
                {
                    Outcome::Acknowledged(ack) => {
                        assert_eq!(
                            ack.stream_version,
                            known + 1,
                            "{name}: If-Match \"{known}\" landed elsewhere: {ack:?}"
                        );
                        known = ack.stream_version;
                        wins.push(ack);
                    }
                    Outcome::Stale { current } => {
                        assert!(current > known, "{name}: 412 at {known} names {current}");
                        stale += 1;
                        known = current;
                    }
                    Outcome::Failed(reason) => panic!("{name}: nothing is crashing, yet {reason}"),
                }
            }
            (wins, stale)
        }));
    }
    let mut acks = vec![registered];
    let mut stale = 0;
    for task in tasks {
        let (wins, lost) = task.await.expect("client task");
        acks.extend(wins);
        stale += lost;
    }
    assert!(
        stale > 0,
        "64 clients never collided: the race did not happen"
    );
    // A client writes only with If-Match below `target`, so no write lands past it: the
    // winners must be exactly the versions after the registration, up to `target`.
    let mut won: Vec<u64> = acks[1..].iter().map(|ack| ack.stream_version).collect();
    won.sort_unstable();
    assert_eq!(
        won,
        (acks[0].stream_version + 1..=target).collect::<Vec<_>>(),
        "one acknowledged winner for every version up to {target}"
    );

    let database = Database::open(dir.data_dir(), None).await;
    let summary = check_log(&database, &acks).await;
    assert_eq!(
        summary.patient_events as u64, target,
        "the stream holds the winners' events and nothing else"
    );
    check_read_models(&database, &clinic, &token, &acks, &[patient]).await;
    database.close().await;
    eprintln!("{RACING_WRITERS} HTTPS clients, {versions} versions: {stale} answered 412");
}

/// Two servers on one PostgreSQL database, sharing a data directory (keys, certificate). A
/// server decides a command without If-Match on the record as it last left it and lets the
/// append's version check confirm it (crates/api/src/handlers/commands.rs, `execute`), so when
/// the other server has moved the record on, the command must be checked and decided again on
/// the fresh record. Bugs this catches: a plain command answered 412 or 409 because the cached
/// record was behind; one refused because the record it names (a condition) was recorded
/// through the other server; and one let in on a care relationship the other server ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_decided_on_the_fresh_record_when_another_server_moved_it_on() {
    let database = FreshPostgresDatabase::create().await;
    let dir = TestDir::new();
    let args = ["--database-url", database.url.as_str()];
    let first = Server::start(dir.data_dir(), &args);
    let at_first = Clinic::new(&dir, &first);
    let token = at_first.physician_session(&dir, &first).await;
    let patient = at_first.register_patient(&token, 11).await.patient;
    let acknowledged = |outcome: Outcome| match outcome {
        Outcome::Acknowledged(ack) => ack.stream_version,
        other => panic!("a plain observation was not recorded: {other:?}"),
    };
    assert_eq!(
        acknowledged(
            at_first
                .record_observation(&token, patient, None, 1, "first")
                .await
        ),
        3
    );

    let second = Server::start(dir.data_dir(), &args);
    let at_second = Clinic::new(&dir, &second);
    assert_eq!(
        acknowledged(
            at_second
                .record_observation(&token, patient, None, 2, "second")
                .await
        ),
        4
    );
    // The first server last saw version 3.
    assert_eq!(
        acknowledged(
            at_first
                .record_observation(&token, patient, None, 3, "first")
                .await
        ),
        5,
        "decided again on version 4"
    );

    let command = |command: &str| format!("/patients/{patient}/{command}");
    let recorded = at_second
        .expect(
            Method::POST,
            &command("record-condition"),
            Some(&token),
            Some(json!({
                "code": { "system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10" },
                "onset_at": "2026-01-05T00:00:00Z",
            })),
            StatusCode::OK,
        )
        .await;
    // Recorded through the other server: the first one's record does not hold it yet.
    at_first
        .expect(
            Method::POST,
            &command("resolve-condition"),
            Some(&token),
            Some(json!({
                "condition_id": recorded["record_id"],
                "resolved_at": "2026-11-27T09:00:00Z",
            })),
            StatusCode::OK,
        )
        .await;

    let session = at_second
        .expect(
            Method::GET,
            "/auth/session",
            Some(&token),
            None,
            StatusCode::OK,
        )
        .await;
    at_second
        .expect(
            Method::POST,
            &command("end-care-relationship"),
            Some(&token),
            Some(json!({ "clinician": session["user_id"] })),
            StatusCode::OK,
        )
        .await;
    // The first server still keeps the record from before the physician left the care team.
    match at_first
        .record_observation(&token, patient, None, 4, "first")
        .await
    {
        Outcome::Failed(reason) => assert!(reason.starts_with("403"), "{reason}"),
        other => panic!("let in on a care relationship that ended: {other:?}"),
    }

    let log = Database::open(dir.data_dir(), Some(&database.url)).await;
    let stream = StreamId::patient(chartlog_domain::PatientId::from_uuid(patient)).to_string();
    let versions: Vec<u64> = log
        .log()
        .await
        .iter()
        .filter(|row| row.stream_id == stream)
        .map(|row| row.stream_version)
        .collect();
    log.close().await;
    assert_eq!(
        versions,
        (1..=8).collect::<Vec<_>>(),
        "registration and care team, three observations, the condition recorded and resolved, \
         the relationship ended; nothing after the refusal"
    );
    drop((first, second));
    database.drop().await;
}

/// Sixteen identical requests with one Idempotency-Key, sent at once (a client retrying
/// after a timeout while its first attempt is still in flight) must record one observation,
/// and every attempt gets its answer. Bug this catches: a handler that looks the key up, runs
/// the command and only then stores the answer (instead of claiming the key first, see
/// crates/api/src/handlers/mod.rs, `idempotent`), so every request that looks before the
/// first one stores executes too (7 observations of 16 attempts, before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_idempotency_key_record_once() {
    const ATTEMPTS: usize = 16;
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &[]);
    let clinic = Clinic::new(&dir, &server);
    let token = clinic.physician_session(&dir, &server).await;
    let patient = clinic.register_patient(&token, 3).await.patient;
    let start = Arc::new(tokio::sync::Barrier::new(ATTEMPTS));
    let mut tasks = Vec::new();
    for _ in 0..ATTEMPTS {
        let (clinic, token, start) = (clinic.clone(), token.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            clinic
                .record_observation_idempotently(&token, patient, "visit-1-pulse")
                .await
        }));
    }
    let mut answers = std::collections::BTreeSet::new();
    for task in tasks {
        answers.insert(task.await.expect("request task"));
    }
    let database = Database::open(dir.data_dir(), None).await;
    let observations = database
        .log()
        .await
        .iter()
        .filter(|row| row.event_type == clinic::OBSERVATION_RECORDED)
        .count();
    database.close().await;
    assert_eq!(
        (observations, answers.len()),
        (1, 1),
        "one key, one observation, one answer for every attempt: {answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_on_sqlite_every_projection_sees_every_event_once_in_order() {
    every_projection_sees_every_event(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_on_postgres_every_projection_sees_every_event_once_in_order() {
    let database = FreshPostgresDatabase::create().await;
    every_projection_sees_every_event(Some(&database.url)).await;
    database.drop().await;
}

/// A chart read answers at the record's head even while the projection runner cannot move. An
/// open transaction anywhere in the cluster holds every reader of the global log below it (the
/// store's invariant on late commits), so the chart read model stays where it was; the
/// observations the physician records next are in the chart read straight after, folded from
/// the log by the read itself, and that chart is the one the projection gives once let go.
/// Bugs this catches: a read that waits for the runner and answers the read model's stale copy
/// (the version before the writes), a fold that differs from the projection's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_read_holds_the_writes_before_it_while_the_projections_are_held_back() {
    use sqlx::Connection as _;
    let database = FreshPostgresDatabase::create().await;
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &["--database-url", &database.url]);
    let clinic = Clinic::new(&dir, &server);
    let token = clinic.physician_session(&dir, &server).await;
    let registered = clinic.register_patient(&token, 7).await;
    let patient = registered.patient;
    // The read model holds the registration: the fold goes onto its copy.
    clinic.chart(&token, patient, registered.position).await;

    let mut holder = sqlx::PgConnection::connect(&database.url)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    // A transaction id, so the snapshot's xmin stays at or below it until it ends.
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut holder)
        .await
        .expect("take a transaction id");
    let mut last = None;
    for value in 1..=3 {
        match clinic
            .record_observation(&token, patient, None, value, "physician")
            .await
        {
            Outcome::Acknowledged(ack) => last = Some(ack),
            other => panic!("observation {value}: {other:?}"),
        }
    }
    let last = last.expect("three acknowledged");
    let chart_path = format!("/patients/{patient}/chart");
    let folded = clinic
        .expect(Method::GET, &chart_path, Some(&token), None, StatusCode::OK)
        .await;
    let observer = Database::open(dir.data_dir(), Some(&database.url)).await;
    let applied = observer.checkpoints().await["chart"];
    assert!(
        applied < last.position,
        "the runner is held back (at {applied}, the last write at {})",
        last.position
    );
    assert_eq!(
        folded["stream_version"],
        json!(last.stream_version),
        "{folded}"
    );
    let observations = folded["observations"].as_array().expect("observations");
    assert_eq!(observations.len(), 1, "the latest heart rate: {folded}");
    assert_eq!(
        observations[0]["value"]["quantity"]["value"],
        json!("43"),
        "the last one recorded: {folded}"
    );

    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("rollback");
    let projected = clinic.chart(&token, patient, last.position).await;
    assert_eq!(folded, projected, "the folded chart is the projection's");
    drop(holder);
    observer.close().await;
    database.drop().await;
}

/// Bugs this catches: a global-log reader that skips a late commit (an event missing from the
/// history, the chart, the audit trail and the de-identified view while the checkpoint moved
/// past it), a runner that re-applies a batch (a history primary-key failure that stalls the
/// checkpoint, or an observation counted twice), a runner that applies a stream out of order
/// (the chart's folded version behind the head), and an answer naming a position or version
/// other than where the event was stored.
async fn every_projection_sees_every_event(database_url: Option<&str>) {
    let seconds = env_number("CHARTLOG_CONCURRENCY_SECONDS", 3);
    let dir = TestDir::new();
    let mut args = vec!["--idle-timeout-minutes", "120"];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    // On PostgreSQL, the fewest connections a server may have, for 32 writers: requests wait
    // for a connection, and none fails or is lost for it.
    let connections = postgres::CONNECTIONS_MIN.to_string();
    if database_url.is_some() {
        args.extend(["--database-connections", connections.as_str()]);
    }
    let server = Server::start(dir.data_dir(), &args);
    let clinic = Clinic::new(&dir, &server);
    let token = clinic.physician_session(&dir, &server).await;
    let connection_count = database_url.map(ConnectionCount::start);

    let mut acks = Vec::new();
    let mut patients = Vec::new();
    for seed in 0..STREAM_WRITERS as u64 {
        let ack = clinic.register_patient(&token, seed).await;
        patients.push(ack.patient);
        acks.push(ack);
    }

    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (writer, patient) in patients.iter().copied().enumerate() {
        let (clinic, token) = (clinic.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("writer-{writer}");
            let mut acks: Vec<Ack> = Vec::new();
            let mut value = 0;
            // A floor of observations per writer, so a slow machine still races them all.
            while Instant::now() < until || acks.len() < OBSERVATIONS_PER_WRITER_MIN {
                value += 1;
                match clinic
                    .record_observation(&token, patient, None, value, &name)
                    .await
                {
                    Outcome::Acknowledged(ack) => {
                        // One writer per patient: each answer is the next version.
                        let previous = acks.last().map_or(2, |last| last.stream_version);
                        assert_eq!(ack.stream_version, previous + 1, "{ack:?}");
                        acks.push(ack);
                    }
                    other => panic!("{name}: nothing is crashing, yet {other:?}"),
                }
            }
            acks
        }));
    }
    for task in tasks {
        acks.extend(task.await.expect("writer task"));
    }
    let observations = acks.len() - STREAM_WRITERS;
    if let Some(count) = connection_count {
        let most = count.stop().await;
        // The pool's connections, and the projection runner's lock connection, which it keeps
        // outside the pool.
        assert!(
            (1..=i64::from(postgres::CONNECTIONS_MIN) + 1).contains(&most),
            "the server held {most} connections at once with --database-connections {connections}"
        );
    }

    let database = Database::open(dir.data_dir(), database_url).await;
    let summary = check_log(&database, &acks).await;
    assert_eq!(
        summary.patient_events,
        acks.len() + STREAM_WRITERS,
        "the log holds the acknowledged events (and each registration's care relationship), \
         nothing else"
    );
    check_read_models(&database, &clinic, &token, &acks, &patients).await;
    eprintln!(
        "{STREAM_WRITERS} writers for {seconds} s: {observations} observations acknowledged, \
         every one in the log and in every read model exactly once"
    );

    the_checker_has_teeth(&database, &clinic, &token, &acks, &patients).await;
    database.close().await;
}

/// The most connections to one PostgreSQL database seen at once, sampled every few
/// milliseconds from a connection of its own (not counted) until [`ConnectionCount::stop`].
struct ConnectionCount {
    stop: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<i64>,
}

impl ConnectionCount {
    fn start(database_url: &str) -> ConnectionCount {
        use sqlx::Connection as _;
        let stop = Arc::new(AtomicBool::new(false));
        let url = database_url.to_owned();
        let stopped = stop.clone();
        let sampler = tokio::spawn(async move {
            let mut connection = sqlx::PgConnection::connect(&url)
                .await
                .expect("connect to count connections");
            let mut most = 0;
            while !stopped.load(Ordering::Relaxed) {
                let now: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .fetch_one(&mut connection)
                .await
                .expect("count connections");
                most = most.max(now);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        });
        ConnectionCount { stop, sampler }
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.await.expect("connection sampler")
    }
}

/// A checker that never fails proves nothing. Each case below hands it what a specific bug
/// would leave behind and expects the named complaint; the read-model cases corrupt the rows
/// for real, later-checked models first, so each complaint comes from its own check.
async fn the_checker_has_teeth(
    database: &Database,
    clinic: &Clinic,
    token: &str,
    acks: &[Ack],
    patients: &[uuid::Uuid],
) {
    eprintln!("the checker's own test: the panics printed below are expected");
    let observation = acks
        .iter()
        .find(|ack| ack.event_type.is_some())
        .expect("an acknowledged observation")
        .clone();

    // A store that acknowledged an event it then lost.
    let mut lost = acks.to_vec();
    lost.push(Ack {
        position: u64::MAX / 2,
        ..observation.clone()
    });
    expect_complaint(check_log(database, &lost), "acknowledged event is missing").await;
    // A store that told two writers they won one version.
    let mut doubled = acks.to_vec();
    doubled.push(Ack {
        writer: "another writer".to_owned(),
        ..observation.clone()
    });
    expect_complaint(
        check_log(database, &doubled),
        "two writers were told they won one version",
    )
    .await;
    // A read model that does not show an acknowledged observation.
    let mut unseen = acks.to_vec();
    unseen.push(Ack {
        record_id: uuid::Uuid::new_v4(),
        position: 0,
        ..observation.clone()
    });
    expect_complaint(
        check_read_models(database, clinic, token, &unseen, patients),
        "acknowledged observation missing from the record history",
    )
    .await;

    let deidentified = match database {
        Database::Sqlite(..) => "DELETE FROM deid_observations",
        Database::Postgres(_) => "DELETE FROM deidentified.observations",
    };
    for (corruption, complaint) in [
        (deidentified, "de-identified observations"),
        (
            "DELETE FROM chartlog_chart_entries WHERE kind = 'observation'",
            "chart observations of",
        ),
        (
            "UPDATE chartlog_chart_patients SET stream_version = stream_version - 1",
            "folded to another version",
        ),
        (
            "DELETE FROM chartlog_history WHERE first_version = 1",
            "record history of",
        ),
    ] {
        database.corrupt(corruption).await;
        expect_complaint(
            check_read_models(database, clinic, token, acks, patients),
            complaint,
        )
        .await;
    }
}

async fn expect_complaint(check: impl std::future::Future, complaint: &str) {
    use futures::FutureExt as _;
    let outcome = std::panic::AssertUnwindSafe(check).catch_unwind().await;
    let Err(panic) = outcome else {
        panic!("the checker accepted a history it must refuse ({complaint})")
    };
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(
        message.contains(complaint),
        "the checker refused, but not with {complaint:?}: {message}"
    );
}
