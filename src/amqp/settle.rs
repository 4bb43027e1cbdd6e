//! Acknowledging deliveries, in order, off the routing path.
//!
//! The router must never await the broker, so it hands each delivery's
//! settlement to this task. Consecutive acks are coalesced into one
//! `basic.ack(multiple)`; rejects (dead-lettering) go through the same
//! ordered queue, so a coalesced ack can never cover a delivery that is
//! still to be rejected.

use lapin::{
    options::{BasicAckOptions, BasicRejectOptions},
    Acker,
};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// What to tell the broker about one delivery.
#[derive(Debug)]
enum Op {
    Ack(Acker),
    Reject { acker: Acker },
    Flush(oneshot::Sender<()>),
}

/// The acknowledgement owed for one delivery; dropping it unsent leaves the
/// delivery unacknowledged (the broker redelivers it after a reconnect).
#[derive(Debug)]
pub struct Settlement {
    acker: Acker,
    queue: mpsc::UnboundedSender<Op>,
}

impl Settlement {
    /// The message was handed to every recipient's queue: ack it.
    pub fn ack(self) {
        let _ = self.queue.send(Op::Ack(self.acker));
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
        }
    }

    /// Rejects a delivery without requeue, so it is dead-lettered.
    pub fn reject(&self, acker: Acker) {
        let _ = self.queue.send(Op::Reject { acker });
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
    while rx.recv_many(&mut batch, 256).await > 0 {
        for op in batch.drain(..) {
            match op {
                Op::Ack(acker) => pending = Some(acker),
                Op::Reject { acker } => {
                    send_ack(pending.take()).await;
                    if let Err(e) = acker.reject(BasicRejectOptions { requeue: false }).await {
                        debug!(error = %e, "reject failed; the broker will redeliver");
                    }
                }
                Op::Flush(done) => {
                    send_ack(pending.take()).await;
                    let _ = done.send(());
                }
            }
        }
        send_ack(pending.take()).await;
    }
}

async fn send_ack(pending: Option<Acker>) {
    if let Some(acker) = pending {
        if let Err(e) = acker.ack(BasicAckOptions { multiple: true }).await {
            debug!(error = %e, "ack failed; the broker will redeliver");
        }
    }
}
