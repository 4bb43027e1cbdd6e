//! Publishing `read` receipts: a change from a tab or the HTTP API turned
//! stored entries read, after its commit; the receipts follow on their own
//! connection (opened lazily, re-opened after a failure), so a read never
//! waits for the broker and the consumer is never disturbed.
//!
//! Unlike delivery receipts there is no delivery to hold back: a receipt
//! whose publish keeps failing (three tries over about 6 s) is dropped
//! with a WARN. A `read_all` on a large inbox publishes its receipts in
//! batches of [`CHUNK`], each batch's confirms awaited together.

use std::{sync::Arc, time::Duration};

use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{
    amqp::receipt_publisher::{publish_confirmed, Destination},
    config::AmqpConfig,
    inbox::{ReadEntry, ReadSink},
    metrics::Metrics,
    receipts::Receipts,
};

/// Receipts published before their confirms are awaited.
pub const CHUNK: usize = 1000;
/// Changes waiting to be published; past it a change's receipts are
/// dropped (WARN) rather than held without bound while the broker is away.
const QUEUE: usize = 4096;
/// Publish tries per chunk before its receipts are dropped.
const TRIES: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Read = (String, Vec<ReadEntry>);

/// Starts the publishing task and returns the sink the inbox reports
/// newly read entries to.
pub fn spawn(
    amqp: AmqpConfig,
    to: Destination,
    receipts: Arc<Receipts>,
    metrics: Arc<Metrics>,
) -> ReadSink {
    let (tx, rx) = mpsc::channel::<Read>(QUEUE);
    tokio::spawn(run(rx, amqp, to, receipts, metrics));
    Arc::new(move |user: &str, entries: Vec<ReadEntry>| {
        if let Err(e) = tx.try_send((user.to_string(), entries)) {
            warn!(user, error = %e, "read receipts dropped: too many waiting for the broker");
        }
    })
}

async fn run(
    mut rx: mpsc::Receiver<Read>,
    amqp: AmqpConfig,
    to: Destination,
    receipts: Arc<Receipts>,
    metrics: Arc<Metrics>,
) {
    let mut open: Option<(Connection, Channel)> = None;
    while let Some((user, entries)) = rx.recv().await {
        for chunk in entries.chunks(CHUNK) {
            let made = receipts.read(&user, chunk);
            let all: Vec<_> = made.iter().collect();
            let mut tries = 0;
            loop {
                let result = match usable(&mut open, &amqp).await {
                    Ok(channel) => publish_confirmed(&channel, &to, &all).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        for receipt in &all {
                            metrics.receipt_sent(receipt.status);
                        }
                        break;
                    }
                    Err(reason) => {
                        open = None;
                        tries += 1;
                        if tries == TRIES {
                            warn!(%user, %reason, dropped = all.len(), "read receipts not published");
                            break;
                        }
                        debug!(%reason, "read receipts not published; trying again");
                        tokio::time::sleep(Duration::from_secs(1 << tries)).await;
                    }
                }
            }
        }
    }
}

/// The open confirm channel, opening a connection if there is none.
async fn usable(
    open: &mut Option<(Connection, Channel)>,
    amqp: &AmqpConfig,
) -> Result<Channel, String> {
    if let Some((connection, channel)) = open.as_ref() {
        if connection.status().connected() && channel.status().connected() {
            return Ok(channel.clone());
        }
    }
    let opened = tokio::time::timeout(
        CONNECT_TIMEOUT,
        super::connect::confirm_channel(amqp, "notify-bridge read receipts".into()),
    )
    .await;
    match opened {
        Ok(Ok((connection, channel))) => {
            *open = Some((connection, channel.clone()));
            Ok(channel)
        }
        Ok(Err(e)) => Err(format!("broker unavailable: {e}")),
        Err(_) => Err("broker unavailable: connect timed out".into()),
    }
}
