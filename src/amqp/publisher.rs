//! Confirm-mode publishing for the HTTP side port: a REST call is answered
//! 202 only after the broker confirmed the message, so a caller that got
//! 202 knows it is queued, and one that got 503 knows nothing was.
//!
//! The publisher has its own connection (a failing publish never disturbs
//! the consumer), opened lazily and re-opened after a failure. Every await
//! on the broker has a timeout: an HTTP caller never hangs.

use std::{sync::Mutex, time::Duration};

use lapin::{options::BasicPublishOptions, BasicProperties, Channel, Connection};
use tokio::time::timeout;

use crate::config::AmqpConfig;

/// How long connecting, or one publish and its confirm, may take.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a message could not be queued; the HTTP layer answers 503 with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishError(pub String);

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PublishError {}

/// Publishes onto the notifications exchange with publisher confirms.
pub struct Publisher {
    config: AmqpConfig,
    /// The open confirm channel, if any (with its connection, kept alive).
    open: Mutex<Option<(Connection, Channel)>>,
    /// Serialises reconnects, so a burst of requests opens one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl Publisher {
    pub fn new(config: AmqpConfig) -> Self {
        Self {
            config,
            open: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Publishes `body` as received, with `id` as its AMQP `message_id`,
    /// and waits for the broker's confirm.
    pub async fn publish(&self, body: &[u8], id: &str) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let confirmed = timeout(BROKER_TIMEOUT, async {
            channel
                .basic_publish(
                    self.config.exchange.as_str().into(),
                    self.config.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        match confirmed {
            Ok(Ok(confirmation)) if confirmation.is_ack() => {
                if confirmation.take_message().is_some() {
                    // Mandatory and returned: no queue is bound, nobody
                    // would ever see it.
                    Err(PublishError(format!(
                        "the broker routed the message to no queue (is a bridge bound to {} with {}?)",
                        self.config.exchange, self.config.routing_key
                    )))
                } else {
                    Ok(())
                }
            }
            Ok(Ok(_)) => Err(PublishError("the broker refused the message (nack)".into())),
            Ok(Err(e)) => {
                self.forget(&channel);
                Err(PublishError(format!("publish failed: {e}")))
            }
            Err(_) => {
                self.forget(&channel);
                Err(PublishError("the broker did not confirm within 5 s".into()))
            }
        }
    }

    /// The open confirm channel, opening one if needed.
    async fn channel(&self) -> Result<Channel, PublishError> {
        if let Some(channel) = self.usable() {
            return Ok(channel);
        }
        let _single_flight = self.connecting.lock().await;
        if let Some(channel) = self.usable() {
            return Ok(channel);
        }
        let name = format!("notify-bridge publisher {}", self.config.queue_name());
        let opened = timeout(
            BROKER_TIMEOUT,
            super::connect::confirm_channel(&self.config, name),
        )
        .await;
        match opened {
            Ok(Ok((connection, channel))) => {
                *self.open.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((connection, channel.clone()));
                Ok(channel)
            }
            Ok(Err(e)) => Err(PublishError(format!("broker unavailable: {e}"))),
            Err(_) => Err(PublishError("broker unavailable: connect timed out".into())),
        }
    }

    fn usable(&self) -> Option<Channel> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.as_ref()
            .filter(|(connection, channel)| {
                connection.status().connected() && channel.status().connected()
            })
            .map(|(_, channel)| channel.clone())
    }

    /// Drops a channel that failed, so the next call opens a fresh one.
    fn forget(&self, failed: &Channel) {
        let stale = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if open.as_ref().is_some_and(|(_, c)| c.id() == failed.id()) {
                open.take()
            } else {
                None
            }
        };
        if let Some((connection, _)) = stale {
            tokio::spawn(async move {
                let _ = timeout(BROKER_TIMEOUT, connection.close(200, "reopening".into())).await;
            });
        }
    }
}
