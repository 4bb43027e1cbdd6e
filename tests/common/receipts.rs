//! A test's own queue for receipts (tests/receipts.rs, tests/cluster.rs).

#![allow(dead_code)]

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    options::QueueBindOptions, types::FieldTable, BasicProperties, Connection,
    ConnectionProperties, Consumer,
};
use serde_json::Value;

use super::{amqp_url, unique, Bridge};

/// How long a receipt may take.
const WAIT: Duration = Duration::from_secs(10);

/// A queue of the test's own that receives what it is bound to or named for.
pub struct ReceiptQueue {
    _connection: Connection,
    pub channel: lapin::Channel,
    pub name: String,
    pub consumer: Consumer,
}

impl ReceiptQueue {
    /// An exclusive queue bound to the bridge's exchange with
    /// `notifications.result`.
    pub async fn results(bridge: &Bridge) -> Self {
        let queue = Self::declare(FieldTable::default()).await;
        queue
            .channel
            .queue_bind(
                queue.name.as_str().into(),
                bridge.config.amqp.exchange.as_str().into(),
                bridge.config.receipts.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        queue
    }

    pub async fn declare(arguments: FieldTable) -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let (name, consumer) =
            super::exclusive_watch(&channel, &unique("receipts"), arguments).await;
        Self {
            _connection: connection,
            channel,
            name,
            consumer,
        }
    }

    /// The next receipt's body (with `at` checked and removed) and its
    /// AMQP properties.
    pub async fn next(&mut self) -> (Value, BasicProperties) {
        let delivery = tokio::time::timeout(WAIT, self.consumer.next())
            .await
            .expect("a receipt in time")
            .expect("consumer open")
            .expect("delivery");
        let mut body: Value = serde_json::from_slice(&delivery.data).expect("JSON receipt");
        let at = body
            .as_object_mut()
            .expect("an object")
            .remove("at")
            .unwrap_or_else(|| panic!("no `at` in {body}"));
        let at = at.as_str().expect("`at` is text");
        assert!(at.len() == 20 && at.ends_with('Z'), "{at}");
        (body, delivery.properties)
    }

    pub async fn body(&mut self) -> Value {
        self.next().await.0
    }

    pub async fn assert_empty(&mut self, wait: Duration) {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(wait, self.consumer.next()).await {
            panic!("unexpected receipt {}", String::from_utf8_lossy(&d.data));
        }
    }
}
