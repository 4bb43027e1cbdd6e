//! Publishing delivery receipts before their message is acked.
//!
//! One [`DeliveryReceipts`] per consumer connection, publishing on a
//! connection of its own in confirm mode: the router hands it a message's
//! receipts (after the frames went to the sockets) together with a oneshot
//! that the settler waits on before it acks that delivery. One task
//! publishes whatever gathered (many publishes in flight, the next batch
//! going out while earlier ones are confirmed); a second awaits each
//! batch's confirms in publishing order and answers each message in
//! order. A failed publish answers `false`: the settler acks nothing from
//! then on and the consumer reconnects, so the message comes back (at least
//! once; a redelivered message may repeat receipts).

use std::{sync::Arc, time::Duration};

use lapin::{options::BasicPublishOptions, BasicProperties, Channel, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    config::AmqpConfig,
    message::{self, DecodeLimits, Notification},
    metrics::Metrics,
    receipts::{Outcome, Receipt, Receipts, RECEIPT_TYPE},
};

/// The most messages whose receipts are published as one batch (their
/// confirms are awaited together).
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
        let confirms = publish(channel, to, receipts.iter().copied()).await?;
        confirm(confirms).await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, work).await {
        Ok(result) => result,
        Err(_) => Err(timed_out()),
    }
}

fn timed_out() -> String {
    format!("the broker did not confirm receipts within {CONFIRM_TIMEOUT:?}")
}

/// Publishes each receipt to `to` (and to its `reply_to` queue); the
/// confirms to wait for. The publishes are polled together: lapin queues a
/// publish's frames (and numbers it) when first polled and then waits for
/// its I/O loop to write them, so awaiting them one by one would cost one
/// round trip through that loop per receipt.
async fn publish<'a>(
    channel: &Channel,
    to: &Destination,
    receipts: impl Iterator<Item = &'a Receipt>,
) -> Result<Vec<PublisherConfirm>, String> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(RECEIPT_TYPE.into());
    let options = BasicPublishOptions::default();
    let mut publishes = Vec::new();
    for receipt in receipts {
        let body = receipt.body.as_bytes();
        let exchange = to.exchange.as_str().into();
        let key = to.routing_key.as_str().into();
        publishes.push(channel.basic_publish(exchange, key, options, body, properties.clone()));
        if let Some(queue) = &receipt.reply_to {
            let reply = match &receipt.correlation_id {
                Some(id) => properties.clone().with_correlation_id(id.as_str().into()),
                None => properties.clone(),
            };
            publishes.push(channel.basic_publish(
                "".into(),
                queue.as_ref().into(),
                options,
                body,
                reply,
            ));
        }
    }
    futures_util::future::try_join_all(publishes)
        .await
        .map_err(|e| format!("publishing receipts failed: {e}"))
}

/// Waits for every confirm; a nack is an error too.
async fn confirm(confirms: Vec<PublisherConfirm>) -> Result<(), String> {
    let mut nacked = 0;
    for confirm in confirms {
        let confirmation = confirm
            .await
            .map_err(|e| format!("publishing receipts failed: {e}"))?;
        if !confirmation.is_ack() {
            nacked += 1;
        }
    }
    match nacked {
        0 => Ok(()),
        n => Err(format!("the broker refused {n} receipts (nack)")),
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
    /// Opens a connection of its own (named after the consumer's) with a
    /// confirm channel and starts the task on it. Its own connection, not a
    /// channel of the consumer's: the broker's flow control on a busy
    /// publishing connection would hold back the consumer's acks too.
    pub async fn open(
        amqp: &AmqpConfig,
        name: &str,
        to: Destination,
        receipts: Arc<Receipts>,
        metrics: Arc<Metrics>,
        failed: CancellationToken,
    ) -> Result<Self, lapin::Error> {
        let (connection, channel) = super::connect::confirm_channel(amqp, name.into()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            run(rx, channel, to, metrics, failed).await;
            let _ = connection.close(200, "consumer gone".into()).await;
        });
        Ok(Self { receipts, jobs: tx })
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

/// Publishes batches as they gather and hands their confirms to
/// [`confirm_in_order`]: the next batch goes out while the previous one is
/// still being confirmed (many in flight).
async fn run(
    mut rx: mpsc::UnboundedReceiver<Job>,
    channel: Channel,
    to: Destination,
    metrics: Arc<Metrics>,
    failed: CancellationToken,
) {
    let (confirming, confirms) = mpsc::unbounded_channel();
    let confirmer = tokio::spawn(confirm_in_order(confirms, metrics, failed.clone()));
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let published = if failed.is_cancelled() {
            Err("an earlier receipt failed".to_string())
        } else {
            let all = batch.iter().flat_map(|job| &job.receipts);
            publish(&channel, &to, all).await
        };
        let jobs = std::mem::take(&mut batch);
        let _ = confirming.send((jobs, published, tokio::time::Instant::now()));
    }
    drop(confirming);
    let _ = confirmer.await;
}

type Published = (
    Vec<Job>,
    Result<Vec<PublisherConfirm>, String>,
    tokio::time::Instant,
);

/// Awaits each published batch's confirms in publishing order and answers
/// its jobs; after a failure every later job is answered `false`.
async fn confirm_in_order(
    mut batches: mpsc::UnboundedReceiver<Published>,
    metrics: Arc<Metrics>,
    failed: CancellationToken,
) {
    while let Some((jobs, published, at)) = batches.recv().await {
        let result = match published {
            Err(reason) => Err(reason),
            Ok(_) if failed.is_cancelled() => Err("an earlier receipt failed".to_string()),
            Ok(confirms) => {
                let deadline = at + CONFIRM_TIMEOUT;
                match tokio::time::timeout_at(deadline, confirm(confirms)).await {
                    Ok(result) => result,
                    Err(_) => Err(timed_out()),
                }
            }
        };
        let ok = match result {
            Ok(()) => {
                for receipt in jobs.iter().flat_map(|job| &job.receipts) {
                    metrics.receipt_sent(receipt.status);
                }
                true
            }
            Err(reason) => {
                if !failed.is_cancelled() {
                    warn!(%reason, "receipts not confirmed: their messages stay unacked and come back after a reconnect");
                    failed.cancel();
                }
                false
            }
        };
        for job in jobs {
            let _ = job.done.send(ok);
        }
    }
}
