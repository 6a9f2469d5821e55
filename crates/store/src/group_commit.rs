//! Forming groups for group commit: the queue the PostgreSQL backend's committer tasks share.
//!
//! A committer that is free waits for one request, then takes every request already queued
//! (or arriving while it yields to the scheduler), up to the limits, and commits them together
//! (see `postgres.rs`). There is no timer: a request that arrives while the queue is empty
//! leaves after one pass through the scheduler, so grouping adds no latency worth the name
//! when the store is quiet, and groups grow only as requests pile up behind commits in flight.
//! This module knows nothing of SQL, so the grouping rules are tested on their own.

use tokio::sync::mpsc;

/// A queued request, as the grouping sees it.
pub(crate) trait Groupable {
    /// How many events the request carries (at least 1).
    fn events(&self) -> usize;
    /// About how many bytes the request adds to the group's statement.
    fn bytes(&self) -> usize;
    /// Whether nobody waits for the answer any more (the caller gave up): such a request is
    /// dropped instead of committed, as a cancelled append that never reached the database.
    fn abandoned(&self) -> bool;
}

/// The limits of one group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLimits {
    /// The most requests in one group.
    pub requests: usize,
    /// The most events in one group, summed over its requests. A request carrying more than
    /// this still forms a group of its own.
    pub events: usize,
    /// The most bytes in one group, summed over its requests ([`Groupable::bytes`]). A request
    /// larger than this still forms a group of its own.
    pub bytes: usize,
}

/// The receiving end of the committers' queue. Shared by the committers behind a mutex: the
/// one holding it waits for the next group while the others commit theirs.
pub(crate) struct GroupQueue<R> {
    requests: mpsc::UnboundedReceiver<R>,
    /// A request taken from the channel that did not fit in the last group: it opens the next.
    carried: Option<R>,
    limits: GroupLimits,
}

impl<R: Groupable> GroupQueue<R> {
    pub(crate) fn new(requests: mpsc::UnboundedReceiver<R>, limits: GroupLimits) -> Self {
        assert!(
            limits.requests >= 1 && limits.events >= 1 && limits.bytes >= 1,
            "a group holds something"
        );
        Self {
            requests,
            carried: None,
            limits,
        }
    }

    /// Waits for a request, then adds every request already queued while the group stays
    /// within the limits, in arrival order. `None` once every sender is gone and the queue is
    /// empty.
    ///
    /// "Already queued" includes the requests of callers that are about to send: once the
    /// queue is drained, the committer yields to the scheduler once and drains again, until a
    /// yield brings nothing new. The callers a committed group just answered resubmit during
    /// those yields, so they join the next group instead of each taking a committer of its
    /// own. A yield is a pass through the scheduler's queue, not a timer: on an idle store it
    /// costs microseconds.
    pub(crate) async fn next_group(&mut self) -> Option<Vec<R>> {
        let first = loop {
            let request = match self.carried.take() {
                Some(request) => request,
                None => self.requests.recv().await?,
            };
            if !request.abandoned() {
                break request;
            }
        };
        let mut events = first.events();
        let mut bytes = first.bytes();
        let mut group = vec![first];
        loop {
            while group.len() < self.limits.requests {
                let Ok(request) = self.requests.try_recv() else {
                    break;
                };
                if request.abandoned() {
                    continue;
                }
                if events + request.events() > self.limits.events
                    || bytes + request.bytes() > self.limits.bytes
                {
                    // It opens the next group.
                    self.carried = Some(request);
                    return Some(group);
                }
                events += request.events();
                bytes += request.bytes();
                group.push(request);
            }
            if group.len() >= self.limits.requests {
                return Some(group);
            }
            // The queue is empty: give the callers on their way to it a chance to arrive.
            tokio::task::yield_now().await;
            if self.requests.is_empty() {
                return Some(group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Request {
        id: usize,
        events: usize,
        abandoned: bool,
    }

    /// Each test request weighs 100 bytes per event.
    const BYTES_PER_EVENT: usize = 100;

    impl Groupable for Request {
        fn events(&self) -> usize {
            self.events
        }
        fn abandoned(&self) -> bool {
            self.abandoned
        }
        fn bytes(&self) -> usize {
            self.events * BYTES_PER_EVENT
        }
    }

    const LIMITS: GroupLimits = GroupLimits {
        requests: 4,
        events: 10,
        bytes: 1_000_000,
    };

    fn queue(requests: &[(usize, bool)]) -> (GroupQueue<Request>, mpsc::UnboundedSender<Request>) {
        queue_with(requests, LIMITS)
    }

    fn queue_with(
        requests: &[(usize, bool)],
        limits: GroupLimits,
    ) -> (GroupQueue<Request>, mpsc::UnboundedSender<Request>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        for (id, &(events, abandoned)) in requests.iter().enumerate() {
            sender
                .send(Request {
                    id,
                    events,
                    abandoned,
                })
                .expect("queue open");
        }
        (GroupQueue::new(receiver, limits), sender)
    }

    async fn ids(queue: &mut GroupQueue<Request>) -> Vec<usize> {
        queue
            .next_group()
            .await
            .expect("a group")
            .iter()
            .map(|r| r.id)
            .collect()
    }

    #[tokio::test]
    async fn a_lone_request_leaves_at_once_without_waiting_for_company() {
        let (mut queue, _sender) = queue(&[(1, false)]);
        let group = tokio::time::timeout(std::time::Duration::from_secs(1), ids(&mut queue))
            .await
            .expect("no waiting for more requests");
        assert_eq!(group, [0]);
    }

    #[tokio::test]
    async fn groups_are_split_at_the_request_limit_in_arrival_order() {
        let (mut queue, _sender) = queue(&[(1, false); 10]);
        assert_eq!(ids(&mut queue).await, [0, 1, 2, 3]);
        assert_eq!(ids(&mut queue).await, [4, 5, 6, 7]);
        assert_eq!(ids(&mut queue).await, [8, 9]);
    }

    #[tokio::test]
    async fn groups_are_split_at_the_event_limit_and_the_overflow_opens_the_next() {
        let (mut queue, _sender) = queue(&[(4, false), (5, false), (2, false), (1, false)]);
        assert_eq!(
            ids(&mut queue).await,
            [0, 1],
            "4 + 5 fit in 10; + 2 would not"
        );
        assert_eq!(
            ids(&mut queue).await,
            [2, 3],
            "the request that did not fit comes first"
        );
    }

    #[tokio::test]
    async fn groups_are_split_at_the_byte_limit() {
        let limits = GroupLimits {
            bytes: 5 * BYTES_PER_EVENT,
            ..LIMITS
        };
        let (mut queue, _sender) = queue_with(
            &[(2, false), (3, false), (1, false), (9, false), (1, false)],
            limits,
        );
        assert_eq!(
            ids(&mut queue).await,
            [0, 1],
            "2 + 3 events weigh the limit"
        );
        assert_eq!(ids(&mut queue).await, [2], "1 + 9 would weigh more");
        assert_eq!(ids(&mut queue).await, [3], "a heavy request goes alone");
        assert_eq!(ids(&mut queue).await, [4]);
    }

    #[tokio::test]
    async fn callers_arriving_while_the_group_forms_join_it() {
        let (mut queue, sender) = queue(&[(1, false)]);
        // A caller that sends as soon as it is scheduled, like a writer a committed group has
        // just answered.
        let late = tokio::spawn(async move {
            sender
                .send(Request {
                    id: 1,
                    events: 1,
                    abandoned: false,
                })
                .expect("queue open");
            sender
        });
        assert_eq!(ids(&mut queue).await, [0, 1]);
        drop(late.await.expect("sender task"));
    }

    #[tokio::test]
    async fn a_request_at_or_over_the_event_limit_goes_alone() {
        let (mut queue, _sender) = queue(&[(1, false), (12, false), (10, false), (1, false)]);
        assert_eq!(ids(&mut queue).await, [0]);
        assert_eq!(ids(&mut queue).await, [1]);
        assert_eq!(ids(&mut queue).await, [2]);
        assert_eq!(ids(&mut queue).await, [3]);
    }

    #[tokio::test]
    async fn abandoned_requests_are_dropped() {
        let (mut queue, _sender) = queue(&[(1, true), (1, false), (9, true), (1, false)]);
        assert_eq!(ids(&mut queue).await, [1, 3]);
    }

    #[tokio::test]
    async fn the_queue_ends_when_every_sender_is_gone() {
        let (mut queue, sender) = queue(&[(1, false)]);
        drop(sender);
        assert_eq!(
            ids(&mut queue).await,
            [0],
            "what was queued is still served"
        );
        assert!(queue.next_group().await.is_none());
    }
}
