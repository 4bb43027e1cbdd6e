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
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::{amqp::receipt_publisher::DeliveryReceipts, message::Notification, receipts::Outcome};

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

/// The acknowledgement owed for one delivery; dropping it unsent leaves the
/// delivery unacknowledged (the broker redelivers it after a reconnect).
#[derive(Debug)]
pub struct Settlement {
    acker: Acker,
    queue: mpsc::UnboundedSender<Op>,
    /// This connection's receipt publisher, for messages that get receipts.
    receipts: Option<DeliveryReceipts>,
}

impl Settlement {
    /// The message was handed to every recipient's queue: ack it.
    pub fn ack(self) {
        let _ = self.queue.send(Op::Ack(self.acker));
    }

    /// Publishes the message's receipts through `receipts` before it is acked.
    pub fn with_receipts(mut self, receipts: DeliveryReceipts) -> Self {
        self.receipts = Some(receipts);
        self
    }

    /// Whether routing must work out `n`'s per-recipient outcome.
    pub fn receipts_wanted(&self, n: &Notification) -> bool {
        self.receipts.as_ref().is_some_and(|r| r.rules().wanted(n))
    }

    /// The message was handed to every recipient's queue: publish its
    /// receipts (if any), then ack it once they are confirmed. Never waits.
    pub fn routed(self, n: &Notification, outcome: Option<Outcome>) {
        let confirmed = outcome.and_then(|o| self.receipts.as_ref()?.submit(n, &o));
        let op = match confirmed {
            Some(confirmed) => Op::AckAfter(self.acker, confirmed),
            None => Op::Ack(self.acker),
        };
        let _ = self.queue.send(op);
    }
}

/// Handle to the settling task of one broker connection (one per
/// connection: a delivery tag means nothing on another channel).
#[derive(Clone)]
pub struct Settler {
    queue: mpsc::UnboundedSender<Op>,
}

impl Settler {
    /// Starts a settling task; it ends when the last handle and
    /// settlement are gone.
    pub fn spawn() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx));
        Self { queue: tx }
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
        if self.queue.send(Op::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut batch = Vec::with_capacity(256);
    // The newest ack not yet sent; acking it with `multiple` covers the
    // earlier ones.
    let mut pending: Option<Acker> = None;
    // Set when receipts were not confirmed: from then on nothing is
    // settled on this connection (its deliveries come back).
    let mut broken = false;
    while rx.recv_many(&mut batch, 256).await > 0 {
        for op in batch.drain(..) {
            match op {
                Op::Ack(acker) if !broken => pending = Some(acker),
                Op::AckAfter(acker, confirmed) if !broken => {
                    if confirmed_yet(confirmed, &mut pending).await {
                        pending = Some(acker);
                    } else {
                        broken = true;
                    }
                }
                Op::Reject { acker } if !broken => reject(&mut pending, acker).await,
                Op::RejectAfter(acker, confirmed) if !broken => {
                    if confirmed_yet(confirmed, &mut pending).await {
                        reject(&mut pending, acker).await;
                    } else {
                        broken = true;
                    }
                }
                Op::Flush(done) => {
                    send_ack(pending.take()).await;
                    let _ = done.send(());
                }
                Op::Ack(_) | Op::AckAfter(..) | Op::Reject { .. } | Op::RejectAfter(..) => {}
            }
        }
        send_ack(pending.take()).await;
    }
}

/// Whether a delivery's receipts were confirmed. While they are still on
/// their way, the acks before it go out first: holding them would keep
/// the prefetch window full and stall the deliveries behind.
async fn confirmed_yet(
    mut confirmed: oneshot::Receiver<bool>,
    pending: &mut Option<Acker>,
) -> bool {
    match confirmed.try_recv() {
        Ok(ok) => ok,
        Err(oneshot::error::TryRecvError::Closed) => false,
        Err(oneshot::error::TryRecvError::Empty) => {
            send_ack(pending.take()).await;
            confirmed.await.unwrap_or(false)
        }
    }
}

/// Sends the pending ack first, so that it never covers this delivery.
async fn reject(pending: &mut Option<Acker>, acker: Acker) {
    send_ack(pending.take()).await;
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
