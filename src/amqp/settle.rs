//! Acknowledging deliveries, in order, off the routing path.
//!
//! The router must never await the broker, so it hands each delivery's
//! settlement to this task. Consecutive acks are coalesced into one
//! `basic.ack(multiple)`; rejects (dead-lettering) go through the same
//! ordered queue, so a coalesced ack can never cover a delivery that is
//! still to be rejected.
//!
//! A delivery with receipts is settled only once they are confirmed
//! (`AckAfter`/`RejectAfter`, in the same ordered queue); if they are not,
//! nothing more is acked on this connection, so no `multiple` ack can
//! cover it, and it comes back after the reconnect.

use lapin::{
    options::{BasicAckOptions, BasicRejectOptions},
    Acker,
};
use std::time::Duration;

use tokio::{sync::oneshot, time::Instant};
use tracing::debug;

use crate::{
    amqp::{ack_queue, receipt_publisher::DeliveryReceipts},
    message::Notification,
    receipts::Outcome,
    router::Completion,
};

/// What to tell the broker about one delivery.
#[derive(Debug)]
enum Op {
    Ack(Acker),
    /// Ack once the receipts' confirm says `true`.
    AckAfter(Acker, oneshot::Receiver<bool>),
    Reject {
        acker: Acker,
    },
    RejectAfter(Acker, oneshot::Receiver<bool>),
    Flush(oneshot::Sender<()>),
}

impl Op {
    /// Whether the settling task should see it before the owed ack is
    /// due: rejects dead-letter promptly, and a flush is waited for.
    fn urgent(&self) -> bool {
        matches!(self, Op::Reject { .. } | Op::RejectAfter(..) | Op::Flush(_))
    }
}

/// The settling task's queue.
#[derive(Clone, Debug)]
struct Queue(ack_queue::Sender<Op>);

impl Queue {
    fn send(&self, op: Op) -> bool {
        let urgent = op.urgent();
        self.0.send(op, urgent)
    }
}

/// The acknowledgement owed for one delivery; dropping it unsent leaves the
/// delivery unacknowledged (the broker redelivers it after a reconnect).
#[derive(Debug)]
pub struct Settlement {
    acker: Acker,
    queue: Queue,
    /// This connection's receipt publisher, for messages that get receipts.
    receipts: Option<DeliveryReceipts>,
}

impl Settlement {
    /// Publishes the message's receipts through `receipts` before it is acked.
    pub fn with_receipts(mut self, receipts: DeliveryReceipts) -> Self {
        self.receipts = Some(receipts);
        self
    }
}

/// The router's completion of a delivery: its receipts, then its ack.
impl Completion for Settlement {
    fn receipts_wanted(&self, n: &Notification) -> bool {
        self.receipts.as_ref().is_some_and(|r| r.rules().wanted(n))
    }

    /// The message was handed to every recipient's queue: publish its
    /// receipts (if any), then ack it once they are confirmed.
    fn routed(self: Box<Self>, n: &Notification, outcome: Option<Outcome>) {
        let confirmed = outcome.and_then(|o| self.receipts.as_ref()?.submit(n, &o));
        let op = match confirmed {
            Some(confirmed) => Op::AckAfter(self.acker, confirmed),
            None => Op::Ack(self.acker),
        };
        let _ = self.queue.send(op);
    }

    /// Nothing to route: ack it.
    fn done(self: Box<Self>) {
        let _ = self.queue.send(Op::Ack(self.acker));
    }
}

/// Handle to the settling task of one broker connection (one per
/// connection: a delivery tag means nothing on another channel).
#[derive(Clone)]
pub struct Settler {
    queue: Queue,
}

/// How long an ack may wait for later ones to join it (one
/// `basic.ack(multiple)` for all): at a steady pace every delivery came
/// alone and got an ack frame, a lapin task and an I/O write of its own
/// (docs/performance.md, "Cost per notification").
pub const ACK_DELAY: Duration = Duration::from_millis(25);

impl Settler {
    /// Starts a settling task; it ends when the last handle and
    /// settlement are gone. Acks wait up to [`ACK_DELAY`] to be coalesced,
    /// or until `ack_every` deliveries are owed (a quarter of the prefetch
    /// keeps the broker's window open).
    pub fn spawn(ack_every: usize) -> Self {
        let ack_every = ack_every.max(1);
        let (tx, rx) = ack_queue::channel(ack_every);
        tokio::spawn(run(rx, ack_every));
        Self { queue: Queue(tx) }
    }

    /// The settlement to pass along with a delivery.
    pub fn settlement(&self, acker: Acker) -> Settlement {
        Settlement {
            acker,
            queue: self.queue.clone(),
            receipts: None,
        }
    }

    /// Rejects a delivery without requeue, so it is dead-lettered.
    pub fn reject(&self, acker: Acker) {
        let _ = self.queue.send(Op::Reject { acker });
    }

    /// Rejects a delivery once its `invalid` receipt is confirmed.
    pub fn reject_after(&self, acker: Acker, confirmed: oneshot::Receiver<bool>) {
        let _ = self.queue.send(Op::RejectAfter(acker, confirmed));
    }

    /// Waits until everything queued before was sent to the broker.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Op::Flush(tx)) {
            let _ = rx.await;
        }
    }
}

/// The ack owed: the newest delivery to ack (acking it with `multiple`
/// covers the earlier ones), how many it covers, and since when.
#[derive(Default)]
struct Owed {
    newest: Option<Acker>,
    count: usize,
    since: Option<Instant>,
}

impl Owed {
    fn add(&mut self, acker: Acker) {
        self.newest = Some(acker);
        self.count += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    fn take(&mut self) -> Option<Acker> {
        self.count = 0;
        self.since = None;
        self.newest.take()
    }

    /// When the owed ack must go out, if one is owed.
    fn due(&self) -> Option<Instant> {
        self.since.map(|since| since + ACK_DELAY)
    }
}

async fn run(mut rx: ack_queue::Receiver<Op>, ack_every: usize) {
    let mut batch = Vec::with_capacity(256);
    let mut owed = Owed::default();
    // Set when receipts were not confirmed: from then on nothing is
    // settled on this connection (its deliveries come back).
    let mut broken = false;
    while rx.recv(&mut batch, 256, owed.due()).await.is_some() {
        for op in batch.drain(..) {
            match op {
                Op::Ack(acker) if !broken => owed.add(acker),
                Op::AckAfter(acker, confirmed) if !broken => {
                    if confirmed_yet(confirmed, &mut owed).await {
                        owed.add(acker);
                    } else {
                        broken = true;
                    }
                }
                Op::Reject { acker } if !broken => reject(&mut owed, acker).await,
                Op::RejectAfter(acker, confirmed) if !broken => {
                    if confirmed_yet(confirmed, &mut owed).await {
                        reject(&mut owed, acker).await;
                    } else {
                        broken = true;
                    }
                }
                Op::Flush(done) => {
                    send_ack(owed.take()).await;
                    let _ = done.send(());
                }
                Op::Ack(_) | Op::AckAfter(..) | Op::Reject { .. } | Op::RejectAfter(..) => {}
            }
        }
        if owed.count >= ack_every || owed.due().is_some_and(|due| due <= Instant::now()) {
            send_ack(owed.take()).await;
        }
    }
    send_ack(owed.take()).await;
}

/// Whether a delivery's receipts were confirmed. While they are still on
/// their way, the acks before it go out first: holding them would keep
/// the prefetch window full and stall the deliveries behind.
async fn confirmed_yet(mut confirmed: oneshot::Receiver<bool>, owed: &mut Owed) -> bool {
    match confirmed.try_recv() {
        Ok(ok) => ok,
        Err(oneshot::error::TryRecvError::Closed) => false,
        Err(oneshot::error::TryRecvError::Empty) => {
            send_ack(owed.take()).await;
            confirmed.await.unwrap_or(false)
        }
    }
}

/// Sends the pending ack first, so that it never covers this delivery.
async fn reject(owed: &mut Owed, acker: Acker) {
    send_ack(owed.take()).await;
    if let Err(e) = acker.reject(BasicRejectOptions { requeue: false }).await {
        debug!(error = %e, "reject failed; the broker will redeliver");
    }
}

async fn send_ack(pending: Option<Acker>) {
    if let Some(acker) = pending {
        if let Err(e) = acker.ack(BasicAckOptions { multiple: true }).await {
            debug!(error = %e, "ack failed; the broker will redeliver");
        }
    }
}
