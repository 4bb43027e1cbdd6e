//! The consume loop: connect, declare, consume, decode, hand to the router;
//! on any broker failure, mark the instance not ready, back off (capped
//! exponential) and start over, while WebSocket clients stay connected.
//!
//! Nothing is acknowledged before the router handed it to every recipient's
//! queue; deliveries unacknowledged when a connection dies come back from
//! the broker.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
    ConnectionProperties,
};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::{
    amqp::{
        receipt_publisher::{self, DeliveryReceipts, Destination},
        settle::Settler,
        topology,
    },
    config::AmqpConfig,
    message,
    metrics::{Limit, Metrics},
    readiness::Readiness,
    receipts::Receipts,
    router::{RouteRequest, Router},
    stage::InboxStage,
};

/// How long one connection attempt (TCP, AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first reconnect delay; it doubles up to `amqp.reconnect_max_backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// Where decoded deliveries go: straight to the router, or through the
/// inbox's commit stage first.
#[derive(Clone)]
pub enum Downstream {
    Router(Router),
    Inbox(InboxStage),
}

impl Downstream {
    async fn submit(&self, request: RouteRequest) {
        match self {
            Downstream::Router(router) => router.route(request).await,
            Downstream::Inbox(stage) => stage.submit(request).await,
        }
    }
}

/// What the consume loop needs; cheap to clone.
#[derive(Clone)]
pub struct ConsumerContext {
    pub config: Arc<AmqpConfig>,
    /// This instance's queue, or the cluster's shared one.
    pub queue: Arc<topology::IngestQueue>,
    pub downstream: Downstream,
    /// For the shutdown barrier: everything routed before it is settled.
    pub router: Router,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub shutdown: CancellationToken,
    /// Which messages get delivery receipts, and `receipts.routing_key`.
    pub receipts: Arc<Receipts>,
    pub receipts_routing_key: String,
}

/// Runs until `shutdown` is cancelled, reconnecting as needed.
pub async fn run(ctx: ConsumerContext) {
    let mut backoff = INITIAL_BACKOFF;
    let mut connected_before = false;
    loop {
        if ctx.shutdown.is_cancelled() {
            break;
        }
        let started = Instant::now();
        let outcome = consume_once(&ctx, &mut connected_before).await;
        ctx.metrics.amqp_connected.set(0);
        match outcome {
            Ok(()) => break,
            Err(reason) => {
                ctx.readiness.set_not_ready(reason.clone());
                // A connection that lived a while earns a fresh backoff.
                if started.elapsed() > ctx.config.reconnect_max_backoff {
                    backoff = INITIAL_BACKOFF;
                }
                warn!(%reason, retry_in = ?backoff, "broker unavailable; WebSocket clients stay connected");
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(ctx.config.reconnect_max_backoff);
    }
    ctx.readiness.set_not_ready("shutting down");
}

/// Waits up to [`CONNECT_TIMEOUT`] for one setup step; the error names the
/// step (`what`), as readiness and the log show it.
async fn step<T, E: std::fmt::Display>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match timeout(CONNECT_TIMEOUT, work).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(format!("cannot {what}: {e}")),
        Err(_) => Err(format!("cannot {what}: timed out")),
    }
}

/// One broker connection, set up and consuming.
struct Connected {
    connection: lapin::Connection,
    channel: lapin::Channel,
    receipts: DeliveryReceipts,
    /// Cancelled when receipts were not confirmed.
    receipts_failed: CancellationToken,
}

/// One connection's life, in a `consumer` span naming the queue. `Ok`
/// means shutdown was asked for; `Err` carries the reason the broker
/// connection was lost.
async fn consume_once(ctx: &ConsumerContext, connected_before: &mut bool) -> Result<(), String> {
    let span = tracing::info_span!("consumer", queue = %ctx.queue.name);
    async {
        let (connected, consumer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            connected = connect(ctx) => connected?,
        };
        if *connected_before {
            ctx.metrics.amqp_reconnects.inc();
        }
        *connected_before = true;
        ctx.metrics.amqp_connected.set(1);
        ctx.readiness.set_ready();
        let config = &ctx.config;
        info!(exchange = %config.exchange, routing_key = %config.routing_key, prefetch = config.prefetch, "consuming");
        let settler = Settler::spawn(usize::from(config.prefetch) / 4);
        let result = consume(ctx, &connected, consumer, &settler).await;
        stop(ctx, &connected, &settler, &result).await;
        result
    }
    .instrument(span)
    .await
}

/// Connects, declares the topology, opens the receipts' channel and starts
/// consuming, each step within [`CONNECT_TIMEOUT`].
async fn connect(ctx: &ConsumerContext) -> Result<(Connected, lapin::Consumer), String> {
    let config = &ctx.config;
    let queue = &ctx.queue.name;
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("notify-bridge {queue}").into());
    let connection = step(
        "connect to the broker",
        super::connect::connect(config, properties),
    )
    .await?;
    let declare = topology::declare(&connection, config, &ctx.queue);
    let channel = step("declare the topology", declare).await?;
    let receipts_failed = CancellationToken::new();
    let receipts_name = format!("notify-bridge receipts {queue}");
    let receipts = DeliveryReceipts::open(
        config,
        &receipts_name,
        Destination {
            exchange: config.exchange.clone(),
            routing_key: ctx.receipts_routing_key.clone(),
        },
        ctx.receipts.clone(),
        ctx.metrics.clone(),
        receipts_failed.clone(),
    );
    let receipts = step("open the receipts channel", receipts).await?;
    let setup = async {
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                queue.as_str().into(),
                "notify-bridge".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    };
    let consumer = step(&format!("consume from {queue}"), setup).await?;
    let connected = Connected {
        connection,
        channel,
        receipts,
        receipts_failed,
    };
    Ok((connected, consumer))
}

/// Hands each delivery on until shutdown (`Ok`) or the connection fails.
async fn consume(
    ctx: &ConsumerContext,
    connected: &Connected,
    mut consumer: lapin::Consumer,
    settler: &Settler,
) -> Result<(), String> {
    let limits = message::DecodeLimits::from_config(&ctx.config);
    let mut health_check = tokio::time::interval(Duration::from_secs(1));
    // Registered once, not once per delivery: either ends the loop.
    let shutdown = ctx.shutdown.cancelled();
    let receipts_failed = connected.receipts_failed.cancelled();
    tokio::pin!(shutdown, receipts_failed);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = &mut receipts_failed => {
                return Err("receipts were not confirmed; reconnecting so their messages come back".to_string());
            }
            _ = health_check.tick() => {
                if !connected.connection.status().connected() {
                    return Err("broker connection lost".to_string());
                }
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => on_delivery(ctx, delivery, settler, &connected.receipts, &limits).await,
                Some(Err(e)) => return Err(format!("broker connection lost: {e}")),
                None => return Err("the broker cancelled the consumer".to_string()),
            },
        }
    }
}

/// Decodes one delivery and hands it on (acked once routed), or rejects it
/// to the dead-letter exchange (after its `invalid` receipt, if any).
async fn on_delivery(
    ctx: &ConsumerContext,
    delivery: Delivery,
    settler: &Settler,
    receipts: &DeliveryReceipts,
    limits: &message::DecodeLimits,
) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str());
    match message::decode(&delivery.data, message_id, limits) {
        Ok(mut notification) => {
            notification.reply_to = receipt_publisher::reply_to(&delivery);
            let settlement = settler
                .settlement(delivery.acker)
                .with_receipts(receipts.clone());
            let request = RouteRequest::new(notification, Some(Box::new(settlement)));
            ctx.downstream.submit(request).await;
        }
        Err(reason) => {
            ctx.metrics.messages_invalid.inc();
            if matches!(reason, message::DecodeError::TooManyRecipients { .. }) {
                ctx.metrics.refused(Limit::MaxRecipients);
            }
            warn!(
                %reason,
                routing_key = %delivery.routing_key,
                bytes = delivery.data.len(),
                "invalid message rejected to {}", topology::DEAD_LETTER_EXCHANGE
            );
            match receipts.invalid(&delivery, &reason, limits) {
                Some(confirmed) => settler.reject_after(delivery.acker, confirmed),
                None => settler.reject(delivery.acker),
            }
        }
    }
}

/// Closes the connection. At shutdown, first stop taking new deliveries
/// and settle what was routed: anything still unacknowledged returns to
/// the queue.
async fn stop(
    ctx: &ConsumerContext,
    connected: &Connected,
    settler: &Settler,
    result: &Result<(), String>,
) {
    let connection = &connected.connection;
    match result {
        Ok(()) => {
            let cancel = connected
                .channel
                .basic_cancel("notify-bridge".into(), BasicCancelOptions::default());
            let _ = timeout(Duration::from_secs(2), cancel).await;
            let _ = timeout(Duration::from_secs(2), async {
                ctx.router.barrier().await;
                settler.flush().await;
            })
            .await;
            let close = connection.close(200, "notify-bridge shutting down".into());
            let _ = timeout(Duration::from_secs(2), close).await;
            info!("stopped consuming");
        }
        Err(reason) => {
            error!(%reason, "lost the broker");
            let close = connection.close(200, "reconnecting".into());
            let _ = timeout(Duration::from_secs(1), close).await;
        }
    }
}
