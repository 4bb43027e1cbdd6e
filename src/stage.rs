//! The ordered commit stage: deliveries from the consumer pass through here,
//! in broker order, on their way to the router. Each batch's entries are
//! committed in one transaction (group commit: while one commit runs, the
//! next batch gathers; a store with a costly commit, PostgreSQL, also lets
//! a small batch gather for [`Inbox::gather_window`] first), then the batch
//! is routed, and only routing queues the acks. A message that is not
//! stored waits behind stored ones, so it never overtakes them.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, Instrument};

use crate::{
    inbox::{Inbox, NewMessage},
    message::Target,
    metrics::Metrics,
    readiness::Readiness,
    router::{RouteRequest, Router},
};

/// The most deliveries committed in one transaction.
const BATCH: usize = 256;

/// A batch this large is committed at once, whatever the store's gather
/// window: its commit's fixed cost is already shared by enough messages
/// (and a machine too slow to commit faster gathers it without waiting).
const GATHER_BELOW: usize = 8;

/// Where a committed batch goes: this instance's router, or in cluster
/// mode whole batches to the fanout task (`cluster::fanout`), which sends
/// them to the instances holding their recipients. A channel, so that the
/// stage knows nothing of the cluster: the data walks one way.
#[derive(Clone)]
pub enum Committed {
    Router(Router),
    /// Bounded: the stage waits while the fanout is behind (backpressure).
    Batches(mpsc::Sender<Vec<RouteRequest>>),
}

/// Handle to the stage task.
#[derive(Clone)]
pub struct InboxStage {
    requests: mpsc::Sender<RouteRequest>,
}

impl InboxStage {
    /// Starts the stage; `capacity` bounds the deliveries waiting for it.
    pub fn spawn(
        inbox: Inbox,
        next: Committed,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
        capacity: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stage = run(rx, inbox, next, metrics, readiness, shutdown);
        tokio::spawn(stage.instrument(tracing::info_span!("inbox_stage")));
        Self { requests: tx }
    }

    /// Queues a delivery; waits only when the stage is full (backpressure).
    pub async fn submit(&self, request: RouteRequest) {
        let _ = self.requests.send(request).await;
    }
}

/// The users a message is stored for: `user_id` / `user_ids` targets with
/// `store` not false; never channels, broadcasts or single connections.
fn storage_users(request: &RouteRequest) -> &[crate::message::UserId] {
    let n = &request.notification;
    if !n.store {
        return &[];
    }
    match &n.target {
        Target::User(user) => std::slice::from_ref(user),
        Target::Users(users) => users,
        Target::Channel(_) | Target::Broadcast | Target::Connection(_) => &[],
    }
}

async fn run(
    mut rx: mpsc::Receiver<RouteRequest>,
    inbox: Inbox,
    next: Committed,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<RouteRequest> = Vec::with_capacity(BATCH);
    let window = inbox.gather_window();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        gather(&mut rx, &mut batch, window).await;
        // One item per stored message, with its users: the payload is
        // copied (and stored) once, however many users it is for.
        let messages: Vec<NewMessage> = batch
            .iter()
            .filter(|request| !storage_users(request).is_empty())
            .map(|request| {
                let n = &request.notification;
                NewMessage {
                    id: n.id.clone(),
                    event: n.event.clone(),
                    payload: n.payload.get().to_string(),
                    users: storage_users(request)
                        .iter()
                        .map(|u| u.to_string())
                        .collect(),
                }
            })
            .collect();
        let mut seqs = if messages.is_empty() {
            Vec::new()
        } else {
            match commit(&inbox, messages, &metrics, &readiness, &shutdown).await {
                Some(seqs) => seqs,
                // Shutting down with the store failing: leave the batch
                // unacknowledged; the broker redelivers it.
                None => return,
            }
        }
        .into_iter();
        let filled = batch.drain(..).map(|mut request| {
            let users = storage_users(&request).to_vec();
            if !users.is_empty() {
                let mut for_message = seqs.next().unwrap_or_default().into_iter();
                request.stored = users
                    .into_iter()
                    .map(|user| (user, for_message.next().flatten()))
                    .collect();
            }
            request
        });
        match &next {
            Committed::Router(router) => {
                for request in filled {
                    router.route(request).await;
                }
            }
            Committed::Batches(fanout) => {
                let _ = fanout.send(filled.collect()).await;
            }
        }
    }
}

/// Lets a small batch grow, for at most `window` (none: not at all) and
/// only until it holds [`GATHER_BELOW`] deliveries, before it is
/// committed. Each commit has a fixed cost on the database server (about
/// 0.6 ms of its CPU in the cluster bench, whatever the batch's size),
/// paid by every instance sharing it: at 2,000 msg/s a 1 ms window takes
/// batches from 3 to 6–8 messages and the server's CPU per notification
/// down by a third, and with it the contention that made the cluster's
/// tail. Returning as soon as the batch is large enough keeps the window
/// from adding to a commit cycle that is already slow (docs/performance.md).
async fn gather<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, window: Option<Duration>) {
    let Some(window) = window else { return };
    let deadline = tokio::time::Instant::now() + window;
    while batch.len() < GATHER_BELOW {
        let room = BATCH - batch.len();
        match tokio::time::timeout_at(deadline, rx.recv_many(batch, room)).await {
            Ok(n) if n > 0 => {}
            // The window ended, or every sender is gone.
            _ => return,
        }
    }
}

/// Commits until it works: a failing store stops consumption (nothing is
/// acked, readiness says why) instead of dropping messages.
async fn commit(
    inbox: &Inbox,
    messages: Vec<NewMessage>,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Option<Vec<Vec<Option<u64>>>> {
    let messages = Arc::new(messages);
    let mut backoff = Duration::from_millis(200);
    let mut failing = false;
    loop {
        let started = std::time::Instant::now();
        match inbox.append(messages.clone()).await {
            Ok(seqs) => {
                if failing {
                    readiness.set_store_ok();
                }
                metrics.inbox_commit_seconds.observe(started.elapsed());
                metrics
                    .inbox_stored
                    .add(seqs.iter().flatten().filter(|s| s.is_some()).count() as u64);
                return Some(seqs);
            }
            Err(e) => {
                error!(error = %e, retry_in = ?backoff, "inbox commit failed; consumption paused");
                readiness.set_store_failing(format!("inbox store failing: {e}"));
                failing = true;
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// Longer than the store's, so that the timer's 1 ms ticks order the
    /// sends and the window's end.
    const WINDOW: Option<Duration> = Some(Duration::from_millis(5));

    #[tokio::test(start_paused = true)]
    async fn a_small_batch_takes_what_arrives_within_the_window() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut batch = vec![0];
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            tx.send(1).await.unwrap();
            tokio::time::sleep(Duration::from_millis(8)).await;
            tx.send(2).await.unwrap();
        });
        let started = Instant::now();
        gather(&mut rx, &mut batch, WINDOW).await;
        assert_eq!(batch, [0, 1], "the one sent within the window joins");
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        late.await.unwrap();
        assert_eq!(
            rx.recv().await,
            Some(2),
            "a later one is left for the next batch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_batch_or_no_window_is_committed_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.send(99).await.unwrap();
        let started = Instant::now();
        let mut large: Vec<i32> = (0..GATHER_BELOW as i32).collect();
        gather(&mut rx, &mut large, WINDOW).await;
        let mut small = vec![0];
        gather(&mut rx, &mut small, None).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!((large.len(), small), (GATHER_BELOW, vec![0]));
        assert_eq!(rx.recv().await, Some(99));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_fills_within_the_window_is_committed_then() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut batch = vec![0];
        let filler = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            for i in 1..GATHER_BELOW as i32 + 3 {
                tx.send(i).await.unwrap();
            }
        });
        let started = Instant::now();
        gather(&mut rx, &mut batch, WINDOW).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(2),
            "no wait past the batch filling"
        );
        assert!(batch.len() >= GATHER_BELOW, "{batch:?}");
        filler.await.unwrap();
    }
}
