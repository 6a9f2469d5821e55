//! Integrity verification: recompute every hash, check every signature and every chain link.
//!
//! Needs no data key, so an erased patient's stream verifies like any other. Memory grows with
//! the number of streams (one head each), never with the number of events.

use std::collections::HashMap;

use chartlog_crypto::{EventHash, IntegrityError, SealedEvent, SignatureVerifier, verify_chain};
use chartlog_domain::StreamId;

use crate::{EventStore, RecordedEvent, StoreError, StreamHead};

/// Events read and verified per page.
pub const VERIFY_PAGE_EVENTS: u32 = 2_000;

/// The first break found in one stream.
#[derive(Debug)]
pub struct StreamBreak {
    pub stream: StreamId,
    /// The stream version at which verification first failed.
    pub version: u64,
    /// The global position of the offending event (0 when the break is a missing tail).
    pub position: u64,
    pub problem: BreakKind,
}

/// What is wrong at a break.
#[derive(Debug)]
pub enum BreakKind {
    /// A changed byte, a bad signature, a broken link or a version gap.
    Integrity(IntegrityError),
    /// The stream table names a later head than the last event found: events were removed
    /// from the end of the stream.
    TruncatedTail {
        recorded_version: u64,
        found_version: u64,
    },
    /// The event sits at or before the previous version's global position. The chain links
    /// versions, not positions, so this is the only sign of events of one stream reordered in
    /// the global log after the last signed checkpoint, where nothing else vouches for it.
    PositionOutOfOrder { previous_position: u64 },
}

/// What a verification saw.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub streams: u64,
    pub events: u64,
    /// At most one break per stream: after its first break a stream is not checked further.
    pub breaks: Vec<StreamBreak>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Verifies one stream from its first event to its recorded head: what a patient asking "is my
/// record intact?" needs, without reading anyone else's events. Besides each event's hash,
/// signature and link, its global position must come after the previous version's: appends to
/// one stream commit one after another, so the log can never hold them in another order
/// ([`verify_log`] checks the same by reading the log in that order).
pub async fn verify_stream<S: EventStore + ?Sized>(
    store: &S,
    verifier: &SignatureVerifier,
    stream: &StreamId,
) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport {
        streams: 1,
        ..VerifyReport::default()
    };
    let mut head = StreamHead {
        version: 0,
        hash: EventHash::GENESIS,
    };
    let mut last_position: Option<u64> = None;
    loop {
        let page = store
            .read_stream(stream, head.version + 1, VERIFY_PAGE_EVENTS)
            .await?;
        if page.is_empty() {
            break;
        }
        let events: Vec<SealedEvent> = page.iter().map(|r| r.event.clone()).collect();
        report.events += events.len() as u64;
        let ordered = positions_increase(last_position, &page);
        if !ordered || check(verifier, head, &events).is_err() {
            // Find the first offending event one by one, to name it.
            let mut at = head;
            let mut previous_position = last_position;
            for recorded in &page {
                let problem = match check(verifier, at, std::slice::from_ref(&recorded.event)) {
                    Err(error) => Some(BreakKind::Integrity(error)),
                    Ok(()) => previous_position
                        .filter(|&previous| recorded.position <= previous)
                        .map(|previous| BreakKind::PositionOutOfOrder {
                            previous_position: previous,
                        }),
                };
                if let Some(problem) = problem {
                    report.breaks.push(StreamBreak {
                        stream: stream.clone(),
                        version: at.version + 1,
                        position: recorded.position,
                        problem,
                    });
                    return Ok(report);
                }
                at = StreamHead {
                    version: recorded.event.header.stream_version,
                    hash: recorded.event.hash,
                };
                previous_position = Some(recorded.position);
            }
            unreachable!("a page that fails as a whole fails at some event");
        }
        let last = &events[events.len() - 1];
        head = StreamHead {
            version: last.header.stream_version,
            hash: last.hash,
        };
        last_position = page.last().map(|recorded| recorded.position);
    }
    check_recorded_head(store, stream, head, &mut report).await?;
    Ok(report)
}

/// Verifies the whole store: every stream's chain and signatures, in one pass over the global
/// log, and every stream's recorded head against the last event found (a truncated tail).
pub async fn verify_log<S: EventStore + ?Sized>(
    store: &S,
    verifier: &SignatureVerifier,
) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let mut heads: HashMap<StreamId, Option<StreamHead>> = HashMap::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, VERIFY_PAGE_EVENTS).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        report.events += page.len() as u64;
        for recorded in &page {
            let stream = &recorded.event.header.stream_id;
            let entry = heads.entry(stream.clone()).or_insert(Some(StreamHead {
                version: 0,
                hash: EventHash::GENESIS,
            }));
            // None: the stream broke earlier; its first break is already reported.
            let Some(head) = *entry else { continue };
            match check(verifier, head, std::slice::from_ref(&recorded.event)) {
                Ok(()) => {
                    *entry = Some(StreamHead {
                        version: recorded.event.header.stream_version,
                        hash: recorded.event.hash,
                    });
                }
                Err(error) => {
                    report.breaks.push(StreamBreak {
                        stream: stream.clone(),
                        version: head.version + 1,
                        position: recorded.position,
                        problem: BreakKind::Integrity(error),
                    });
                    *entry = None;
                }
            }
        }
    }
    report.streams = heads.len() as u64;
    for (stream, head) in heads {
        let Some(head) = head else { continue };
        if store.stream_head(&stream).await? == Some(head) {
            continue;
        }
        // The global log can hold back events that committed while it was read (they show once
        // every older transaction has finished); the stream itself has no such lag. Check the
        // stream on its own before calling its tail missing.
        let alone = verify_stream(store, verifier, &stream).await?;
        report.events += alone.events.saturating_sub(head.version);
        report.breaks.extend(alone.breaks);
    }
    Ok(report)
}

/// Whether each event of `page` sits after the one before it in the global log (the first
/// after `previous`, the last position of the page before).
fn positions_increase(previous: Option<u64>, page: &[RecordedEvent]) -> bool {
    let mut previous = previous;
    page.iter().all(|recorded| {
        let after = previous.is_none_or(|previous| recorded.position > previous);
        previous = Some(recorded.position);
        after
    })
}

fn check(
    verifier: &SignatureVerifier,
    head: StreamHead,
    events: &[SealedEvent],
) -> Result<(), IntegrityError> {
    verify_chain(head.hash, head.version + 1, events)?;
    verifier.verify_batch(events)
}

/// The stream table records each stream's head when it is appended; events missing after the
/// last one read (a deleted tail) show up as a head that names a later version.
async fn check_recorded_head<S: EventStore + ?Sized>(
    store: &S,
    stream: &StreamId,
    found: StreamHead,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let recorded = store.stream_head(stream).await?;
    let recorded = recorded.unwrap_or(StreamHead {
        version: 0,
        hash: EventHash::GENESIS,
    });
    if recorded != found {
        report.breaks.push(StreamBreak {
            stream: stream.clone(),
            version: found.version + 1,
            position: 0,
            problem: BreakKind::TruncatedTail {
                recorded_version: recorded.version,
                found_version: found.version,
            },
        });
    }
    Ok(())
}
