//! `--receipts` (unicast): the bridge runs with `receipts.enabled`, and a
//! durable queue bound to `notifications.result` takes the receipts the way
//! a fallback worker's would (persistent messages on a durable queue, so
//! the broker writes them). The bench drains it and reports how many came.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    Connection, ConnectionProperties,
};

use crate::{bridge::Names, report::Report};

/// The receipts queue and its draining task.
pub struct Sink {
    connection: Connection,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Declares the queue (durable, deleted when the bench's consumer goes)
    /// and binds it; call after the bridge declared its exchange.
    pub async fn bind(amqp_url: &str, names: &Names) -> anyhow::Result<Self> {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .context("receipts sink: cannot connect")?;
        let channel = connection.create_channel().await?;
        let queue = format!("bench.{}.receipts", names.run_id);
        let options = QueueDeclareOptions {
            durable: true,
            auto_delete: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                names.exchange.as_str().into(),
                "notifications.result".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await?;
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(_)) = consumer.next().await {
                count.fetch_add(1, Relaxed);
            }
        });
        Ok(Self {
            connection,
            received,
            task,
        })
    }

    /// Waits (up to 10 s) for `expected` receipts, reports the count and
    /// closes the queue.
    pub async fn finish(self, r: &mut Report, expected: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.received.load(Relaxed) < expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = self.received.load(Relaxed);
        r.add(
            "receipts_received",
            "receipts received (one per message)",
            got,
            format!("{got} of {expected}"),
        );
        self.task.abort();
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}
