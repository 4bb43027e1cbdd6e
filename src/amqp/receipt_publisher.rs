//! Publishing delivery receipts before their message is acked.
//!
//! One [`DeliveryReceipts`] task per consumer connection, on a confirm-mode
//! channel of that connection: the router hands it a message's receipts
//! (after the frames went to the sockets) together with a oneshot that the
//! settler waits on before it acks that delivery. The task publishes
//! whatever gathered while the previous batch was being confirmed (many
//! publishes in flight), awaits the confirms, then answers each message in
//! order. A failed publish answers `false`: the settler acks nothing from
//! then on and the consumer reconnects, so the message comes back (at least
//! once; a redelivered message may repeat receipts).

use std::{sync::Arc, time::Duration};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Channel, Connection, PublisherConfirm,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    message::{self, DecodeLimits, Notification},
    metrics::Metrics,
    receipts::{Outcome, Receipt, Receipts, RECEIPT_TYPE},
};

/// The most messages whose receipts are published before their confirms
/// are awaited together.
const BATCH: usize = 256;
/// How long one batch's publishes and confirms may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Where receipts go on the broker: `amqp.exchange` with
/// `receipts.routing_key`, and each message's `reply_to` queue.
#[derive(Debug, Clone)]
pub struct Destination {
    pub exchange: String,
    pub routing_key: String,
}

/// Publishes `receipts` (persistent) and waits for every confirm; `Err`
/// says why one was not confirmed.
pub async fn publish_confirmed(
    channel: &Channel,
    to: &Destination,
    receipts: &[&Receipt],
) -> Result<(), String> {
    let work = async {
        let mut confirms: Vec<PublisherConfirm> = Vec::with_capacity(receipts.len());
        for receipt in receipts {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_type(RECEIPT_TYPE.into());
            let body = receipt.body.as_bytes();
            confirms.push(
                channel
                    .basic_publish(
                        to.exchange.as_str().into(),
                        to.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        body,
                        properties.clone(),
                    )
                    .await?,
            );
            if let Some(queue) = &receipt.reply_to {
                let properties = match &receipt.correlation_id {
                    Some(id) => properties.with_correlation_id(id.as_str().into()),
                    None => properties,
                };
                confirms.push(
                    channel
                        .basic_publish(
                            "".into(),
                            queue.as_ref().into(),
                            BasicPublishOptions::default(),
                            body,
                            properties,
                        )
                        .await?,
                );
            }
        }
        let mut nacked = 0;
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                nacked += 1;
            }
        }
        Ok::<_, lapin::Error>(nacked)
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, work).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(nacked)) => Err(format!("the broker refused {nacked} receipts (nack)")),
        Ok(Err(e)) => Err(format!("publishing receipts failed: {e}")),
        Err(_) => Err(format!(
            "the broker did not confirm receipts within {CONFIRM_TIMEOUT:?}"
        )),
    }
}

/// One message's receipts and who waits for their confirm.
struct Job {
    receipts: Vec<Receipt>,
    done: oneshot::Sender<bool>,
}

/// Handle to one connection's receipt task; cloned into each settlement.
#[derive(Clone)]
pub struct DeliveryReceipts {
    receipts: Arc<Receipts>,
    /// Unbounded, but never longer than `amqp.prefetch`: each job is an
    /// unacked delivery.
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for DeliveryReceipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryReceipts")
    }
}

impl DeliveryReceipts {
    /// Starts the task on `channel` (in confirm mode). `failed` is
    /// cancelled on the first publish that fails, so the consumer
    /// reconnects.
    pub fn spawn(
        channel: Channel,
        to: Destination,
        receipts: Arc<Receipts>,
        metrics: Arc<Metrics>,
        failed: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, channel, to, metrics, failed));
        Self { receipts, jobs: tx }
    }

    /// Opens a confirm-mode channel on the consumer's `connection` and
    /// starts the task on it: receipts share the connection's fate, so a
    /// lost connection fails its unconfirmed receipts and unacked messages
    /// together.
    pub async fn open(
        connection: &Connection,
        to: Destination,
        receipts: Arc<Receipts>,
        metrics: Arc<Metrics>,
        failed: CancellationToken,
    ) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self::spawn(channel, to, receipts, metrics, failed))
    }

    /// The `invalid` receipt of a delivery about to be dead-lettered, queued;
    /// `None` when it gets none. A receipt that came back to the bridge's
    /// own queue (AMQP `type` [`RECEIPT_TYPE`]) is never answered, so a
    /// topic or fanout exchange cannot make receipts loop.
    pub fn invalid(
        &self,
        delivery: &lapin::message::Delivery,
        reason: &message::DecodeError,
        limits: &DecodeLimits,
    ) -> Option<oneshot::Receiver<bool>> {
        let properties = &delivery.properties;
        if properties.kind().as_ref().map(|k| k.as_str()) == Some(RECEIPT_TYPE) {
            return None;
        }
        let message_id = properties.message_id().as_ref().map(|id| id.as_str());
        let (id, receipt) = message::refused_fields(&delivery.data, message_id, limits);
        let reason = reason.to_string();
        let receipt = self
            .receipts
            .invalid(id.as_deref(), &reason, reply_to(delivery), receipt)?;
        self.submit_receipts(vec![receipt])
    }

    /// The rules: which messages get receipts, and their bodies.
    pub fn rules(&self) -> &Receipts {
        &self.receipts
    }

    /// Queues a routed message's receipts; the answer is `true` once all
    /// are confirmed. `None` when it gets none (ack it at once).
    pub fn submit(&self, n: &Notification, outcome: &Outcome) -> Option<oneshot::Receiver<bool>> {
        self.submit_receipts(self.receipts.for_delivery(n, outcome))
    }

    /// Queues receipts already made (an `invalid` one, say).
    pub fn submit_receipts(&self, receipts: Vec<Receipt>) -> Option<oneshot::Receiver<bool>> {
        if receipts.is_empty() {
            return None;
        }
        let (done, confirmed) = oneshot::channel();
        // A closed task answers nothing: the receiver errs, which the
        // settler takes as "not confirmed".
        let _ = self.jobs.send(Job { receipts, done });
        Some(confirmed)
    }
}

/// A delivery's AMQP `reply_to`, if it names a queue.
pub fn reply_to(delivery: &lapin::message::Delivery) -> Option<Arc<str>> {
    delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|q| q.as_str())
        .filter(|q| !q.is_empty())
        .map(Arc::from)
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Job>,
    channel: Channel,
    to: Destination,
    metrics: Arc<Metrics>,
    failed: CancellationToken,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let ok = !failed.is_cancelled()
            && {
                let all: Vec<&Receipt> = batch.iter().flat_map(|job| &job.receipts).collect();
                match publish_confirmed(&channel, &to, &all).await {
                    Ok(()) => {
                        for receipt in &all {
                            metrics.receipt_sent(receipt.status);
                        }
                        true
                    }
                    Err(reason) => {
                        warn!(%reason, "receipts not confirmed: their messages stay unacked and come back after a reconnect");
                        failed.cancel();
                        false
                    }
                }
            };
        for job in batch.drain(..) {
            let _ = job.done.send(ok);
        }
    }
}
