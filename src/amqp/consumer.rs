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
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
    ConnectionProperties,
};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    amqp::{
        receipt_publisher::{self, DeliveryReceipts, Destination},
        settle::Settler,
        topology,
    },
    config::AmqpConfig,
    inbox::stage::InboxStage,
    message,
    metrics::{Limit, Metrics},
    readiness::Readiness,
    receipts::Receipts,
    router::{RouteRequest, Router},
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

/// One connection's life. `Ok` means shutdown was asked for; `Err` carries
/// the reason the broker connection was lost.
async fn consume_once(ctx: &ConsumerContext, connected_before: &mut bool) -> Result<(), String> {
    let config = &ctx.config;
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("notify-bridge {}", ctx.queue.name).into());
    let connection = tokio::select! {
        _ = ctx.shutdown.cancelled() => return Ok(()),
        c = timeout(CONNECT_TIMEOUT, super::connect::connect(config, properties)) => match c {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("cannot connect to the broker: {e}")),
            Err(_) => return Err("cannot connect to the broker: timed out".into()),
        },
    };
    let channel = match timeout(
        CONNECT_TIMEOUT,
        topology::declare(&connection, config, &ctx.queue),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("cannot declare the topology: {e}")),
        Err(_) => return Err("cannot declare the topology: timed out".into()),
    };
    let queue = &ctx.queue.name;
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
    let receipts = match timeout(CONNECT_TIMEOUT, receipts).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("cannot open the receipts channel: {e}")),
        Err(_) => return Err("cannot open the receipts channel: timed out".into()),
    };
    let mut consumer = match timeout(CONNECT_TIMEOUT, setup).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("cannot consume from {queue}: {e}")),
        Err(_) => return Err(format!("cannot consume from {queue}: timed out")),
    };
    if *connected_before {
        ctx.metrics.amqp_reconnects.inc();
    }
    *connected_before = true;
    ctx.metrics.amqp_connected.set(1);
    ctx.readiness.set_ready();
    info!(
        queue = %queue,
        exchange = %config.exchange,
        routing_key = %config.routing_key,
        prefetch = config.prefetch,
        "consuming"
    );

    let settler = Settler::spawn(usize::from(config.prefetch) / 4);
    let limits = message::DecodeLimits::from_config(config);
    let mut health_check = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break Ok(()),
            _ = receipts_failed.cancelled() => {
                break Err("receipts were not confirmed; reconnecting so their messages come back".to_string());
            }
            _ = health_check.tick() => {
                if !connection.status().connected() {
                    break Err("broker connection lost".to_string());
                }
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    let message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
                    match message::decode(&delivery.data, message_id, &limits) {
                        Ok(mut notification) => {
                            notification.reply_to = receipt_publisher::reply_to(&delivery);
                            let settlement = settler.settlement(delivery.acker).with_receipts(receipts.clone());
                            ctx.downstream.submit(RouteRequest::new(notification, Some(Box::new(settlement)))).await;
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
                            match receipts.invalid(&delivery, &reason, &limits) {
                                Some(confirmed) => settler.reject_after(delivery.acker, confirmed),
                                None => settler.reject(delivery.acker),
                            }
                        }
                    }
                }
                Some(Err(e)) => break Err(format!("broker connection lost: {e}")),
                None => break Err("the broker cancelled the consumer".to_string()),
            },
        }
    };
    match &result {
        Ok(()) => {
            // Stop taking new deliveries, settle what was routed, then close:
            // anything still unacknowledged returns to the queue.
            let _ = timeout(
                Duration::from_secs(2),
                channel.basic_cancel("notify-bridge".into(), BasicCancelOptions::default()),
            )
            .await;
            let _ = timeout(Duration::from_secs(2), async {
                ctx.router.barrier().await;
                settler.flush().await;
            })
            .await;
            let _ = timeout(
                Duration::from_secs(2),
                connection.close(200, "notify-bridge shutting down".into()),
            )
            .await;
            info!("stopped consuming");
        }
        Err(reason) => {
            error!(%reason, "lost the broker");
            let _ = timeout(
                Duration::from_secs(1),
                connection.close(200, "reconnecting".into()),
            )
            .await;
        }
    }
    result
}
