use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{EventStore, RecordedEvent, StoreError};

/// How long a subscriber waits for a notification before it reads anyway. Notifications make
/// delivery fast; the poll bounds the delay when one is lost (a dropped LISTEN connection) or
/// when events were held back behind a transaction that has since finished.
pub const SUBSCRIPTION_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Follows the global log from a checkpoint: each event after it is delivered once, in
/// position order. Resuming from the last delivered position loses nothing and repeats nothing.
pub struct Subscription<S: EventStore + ?Sized> {
    store: Arc<S>,
    checkpoint: u64,
    batch_size: u32,
    appended: watch::Receiver<u64>,
}

impl<S: EventStore + ?Sized> Subscription<S> {
    /// Delivers events with positions above `checkpoint`.
    pub fn new(store: Arc<S>, checkpoint: u64, batch_size: u32) -> Self {
        assert!(
            batch_size > 0,
            "a subscription batch holds at least one event"
        );
        let appended = store.append_notifications();
        Self {
            store,
            checkpoint,
            batch_size: batch_size.min(crate::READ_BATCH_MAX),
            appended,
        }
    }

    /// The position of the last event delivered (or the starting checkpoint).
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Waits until at least one new event is readable, then returns the next batch.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, StoreError> {
        loop {
            // Mark notifications seen before reading, so an append that lands between the
            // read and the wait still wakes us.
            self.appended.borrow_and_update();
            let events = self
                .store
                .read_all(self.checkpoint, self.batch_size)
                .await?;
            if let Some(last) = events.last() {
                assert!(last.position > self.checkpoint, "read_all went backwards");
                self.checkpoint = last.position;
                return Ok(events);
            }
            tokio::select! {
                changed = self.appended.changed() => {
                    if changed.is_err() {
                        // The store is gone; fall back to polling until the caller drops us.
                        tokio::time::sleep(SUBSCRIPTION_POLL_INTERVAL).await;
                    }
                }
                () = tokio::time::sleep(SUBSCRIPTION_POLL_INTERVAL) => {}
            }
        }
    }
}
