//! The exchanges, queues and bindings the bridge needs, declared at startup
//! and after every reconnect.
//!
//! RabbitMQ refuses a declaration that differs from an existing one, so
//! exchanges are checked passively first and used as they are when they
//! exist (older services declared `notifications_exchange` non-durable);
//! only missing ones are created.

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
    Channel, Connection, ExchangeKind,
};

use crate::config::AmqpConfig;

/// The dead-letter exchange every instance's queue points at.
pub const DEAD_LETTER_EXCHANGE: &str = "notifications_dlx";
/// Where rejected messages end up, with body, properties and routing key.
pub const DEAD_LETTER_QUEUE: &str = "notifications.dead";

/// The queue the consumer takes messages from: one per instance, or in
/// cluster mode one shared by the cluster.
#[derive(Debug, Clone)]
pub struct IngestQueue {
    pub name: String,
    pub arguments: FieldTable,
}

impl IngestQueue {
    /// One instance's own queue (`amqp.queue`): it sees every message.
    pub fn own(config: &AmqpConfig) -> Self {
        Self {
            name: config.queue_name(),
            arguments: queue_arguments(),
        }
    }

    /// The cluster's `<cluster.name>.ingest`: a quorum queue (replicated
    /// on a RabbitMQ cluster, survives a node) with single active
    /// consumer, so one instance at a time stores and fans out, in order,
    /// and the broker hands over to another when it dies.
    pub fn shared(name: String) -> Self {
        let mut arguments = queue_arguments();
        arguments.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
        Self { name, arguments }
    }
}

/// Declares the topology and returns a channel ready for consuming.
pub async fn declare(
    connection: &Connection,
    config: &AmqpConfig,
    ingest: &IngestQueue,
) -> lapin::Result<Channel> {
    let mut channel = connection.create_channel().await?;
    channel = ensure_exchange(
        connection,
        channel,
        &config.exchange,
        exchange_kind(&config.exchange_type),
    )
    .await?;
    channel = ensure_exchange(
        connection,
        channel,
        DEAD_LETTER_EXCHANGE,
        ExchangeKind::Fanout,
    )
    .await?;
    channel
        .queue_declare(
            DEAD_LETTER_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let queue = &ingest.name;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            ingest.arguments.clone(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            config.exchange.as_str().into(),
            config.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(channel)
}

/// The only argument of an instance queue: dead-letter to the DLX.
pub fn queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    args
}

fn exchange_kind(name: &str) -> ExchangeKind {
    match name {
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Direct,
    }
}

/// Uses `name` as it is when it exists; creates it (durable) when it does
/// not. A failed passive declare closes the channel, so a fresh one is
/// returned in that case.
async fn ensure_exchange(
    connection: &Connection,
    channel: Channel,
    name: &str,
    kind: ExchangeKind,
) -> lapin::Result<Channel> {
    let passive = channel
        .exchange_declare(
            name.into(),
            kind.clone(),
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match passive {
        Ok(()) => Ok(channel),
        Err(e) if is_not_found(&e) => {
            tracing::info!(exchange = name, kind = ?kind, "exchange missing; creating it (durable)");
            let channel = connection.create_channel().await?;
            channel
                .exchange_declare(
                    name.into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok(channel)
        }
        Err(e) => Err(e),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(err)
            if matches!(err.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}
