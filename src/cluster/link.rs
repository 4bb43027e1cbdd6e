//! An instance's link to the cluster on the broker: its own queue on the
//! live exchange (bound by its instance id, broadcast, and the channels its
//! sessions subscribe to: no per-user bindings), consumed into the router;
//! the channel it publishes live messages and calls on; and the replies to
//! its calls. It reconnects on its own, like the ingest consumer.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex as SyncMutex, RwLock,
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::{sync::mpsc, time::timeout};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    channel_key, instance_key,
    live::{DisconnectCall, DisconnectReply, Kind, ListCall, LiveCounts, LiveNotification},
    ClusterNames, BROADCAST_KEY,
};
use crate::{
    amqp::settle::Settler, config::AmqpConfig, frames, message::UserId, metrics::Metrics,
    readiness::Readiness, router::Router,
};

/// Live messages in flight to this instance's router at most.
const PREFETCH: u16 = 1000;
/// An instance's queue outlives a dead instance this long, then goes.
const QUEUE_EXPIRES_MS: i64 = 60_000;
/// Live messages a queue holds for a slow or reconnecting instance; the
/// oldest go first past it (stored ones are repaired from the inbox).
const QUEUE_MAX_LENGTH: i64 = 100_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The link's shared state: the handle sessions, the fanout and the admin
/// routes use.
pub struct LiveLink {
    names: ClusterNames,
    /// The broker and its TLS settings (`amqp.url`, `amqp.tls_ca_file`).
    amqp: AmqpConfig,
    channel: RwLock<Option<Channel>>,
    /// Channels with subscribers here, and how many; bound while > 0.
    bindings: tokio::sync::Mutex<HashMap<String, usize>>,
    reply_queue: RwLock<Option<ShortString>>,
    calls: SyncMutex<HashMap<String, mpsc::UnboundedSender<Vec<u8>>>>,
    next_call: AtomicU64,
}

fn link_down() -> anyhow::Error {
    anyhow::anyhow!("the cluster's live link is down")
}

impl LiveLink {
    pub fn new(names: ClusterNames, amqp: AmqpConfig) -> Arc<Self> {
        Arc::new(Self {
            names,
            amqp,
            channel: RwLock::new(None),
            bindings: tokio::sync::Mutex::new(HashMap::new()),
            reply_queue: RwLock::new(None),
            calls: SyncMutex::new(HashMap::new()),
            next_call: AtomicU64::new(0),
        })
    }

    fn current(&self) -> Option<Channel> {
        self.channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes one live message on the live exchange. Not confirmed: the
    /// live hop is best effort by design; what is stored is repaired from
    /// the inbox when a frame is missing (docs/cluster.md).
    pub async fn publish(&self, routing_key: &str, kind: Kind, body: &[u8]) -> anyhow::Result<()> {
        self.publish_with(routing_key, kind, body, BasicProperties::default())
            .await
    }

    async fn publish_with(
        &self,
        routing_key: &str,
        kind: Kind,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let channel = self.current().ok_or_else(link_down)?;
        channel
            .basic_publish(
                self.names.live_exchange().as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_type(kind.as_str().into()),
            )
            .await?;
        Ok(())
    }

    /// Sends a call and gathers up to `answers` replies within `wait`.
    pub async fn call(
        &self,
        routing_key: &str,
        kind: Kind,
        body: &[u8],
        answers: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        let reply_to = self
            .reply_queue
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(link_down)?;
        let id = format!("call-{}", self.next_call.fetch_add(1, Ordering::Relaxed));
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.calls_map().insert(id.clone(), tx);
        let properties = BasicProperties::default()
            .with_reply_to(reply_to)
            .with_correlation_id(id.as_str().into());
        let sent = self.publish_with(routing_key, kind, body, properties).await;
        let mut replies = Vec::new();
        if sent.is_ok() {
            let _ = timeout(wait, async {
                while replies.len() < answers {
                    match rx.recv().await {
                        Some(reply) => replies.push(reply),
                        None => break,
                    }
                }
            })
            .await;
        }
        self.calls_map().remove(&id);
        sent.map(|()| replies)
    }

    fn calls_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Vec<u8>>>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session here subscribed to `channel`: once this returns, the
    /// channel's live messages come to this instance.
    pub async fn join_channel(&self, channel: &str) {
        let mut bindings = self.bindings.lock().await;
        let count = bindings.entry(channel.to_string()).or_default();
        *count += 1;
        if *count == 1 {
            if let Some(live) = self.current() {
                if let Err(e) = self.bind(&live, &channel_key(channel)).await {
                    // The channel is gone with the connection; the next
                    // connection binds every channel again.
                    warn!(error = %e, "cannot bind a channel; it is bound again on reconnect");
                }
            }
        }
    }

    /// A session here left `channel`.
    pub async fn leave_channel(&self, channel: &str) {
        let mut bindings = self.bindings.lock().await;
        let Some(count) = bindings.get_mut(channel) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        bindings.remove(channel);
        let key = channel_key(channel);
        // Another channel may share the (cut) key.
        if bindings.keys().any(|other| channel_key(other) == key) {
            return;
        }
        if let Some(live) = self.current() {
            let _ = live
                .queue_unbind(
                    self.names.live_queue().as_str().into(),
                    self.names.live_exchange().as_str().into(),
                    key.as_str().into(),
                    FieldTable::default(),
                )
                .await;
        }
    }

    async fn bind(&self, channel: &Channel, key: &str) -> lapin::Result<()> {
        channel
            .queue_bind(
                self.names.live_queue().as_str().into(),
                self.names.live_exchange().as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Keeps the link up until shutdown; `/readyz` is 503 while it is down.
    pub async fn run(
        self: Arc<Self>,
        router: Router,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
        max_backoff: Duration,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = tokio::time::Instant::now();
            let outcome = self
                .serve_once(&router, &metrics, &readiness, &shutdown)
                .await;
            *self.channel.write().unwrap_or_else(|e| e.into_inner()) = None;
            *self.reply_queue.write().unwrap_or_else(|e| e.into_inner()) = None;
            let Err(reason) = outcome else { break };
            readiness.set_live_failing(format!("cluster live queue: {reason}"));
            if started.elapsed() > max_backoff {
                backoff = Duration::from_millis(200);
            }
            warn!(%reason, retry_in = ?backoff, "cluster live link lost");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    /// Declares this instance's queue and bindings, then consumes.
    async fn connect(
        &self,
    ) -> lapin::Result<(Connection, Channel, lapin::Consumer, lapin::Consumer)> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("notify-bridge live {}", self.names.instance).into());
        let connection = crate::amqp::connect::connect(&self.amqp, properties).await?;
        let channel = connection.create_channel().await?;
        let exchange = self.names.live_exchange();
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(QUEUE_MAX_LENGTH),
        );
        let queue = self.names.live_queue();
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
            .await?;
        self.bind(&channel, &instance_key(&self.names.instance))
            .await?;
        self.bind(&channel, BROADCAST_KEY).await?;
        let replies = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let live = channel
            .basic_consume(
                queue.as_str().into(),
                "notify-bridge-live".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let answers = channel
            .basic_consume(
                replies.name().clone(),
                "notify-bridge-replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        // The channels subscribed while the link was down, under the lock
        // that joins take: none is missed, none bound twice.
        let bindings = self.bindings.lock().await;
        for channel_name in bindings.keys() {
            self.bind(&channel, &channel_key(channel_name)).await?;
        }
        *self.channel.write().unwrap_or_else(|e| e.into_inner()) = Some(channel.clone());
        *self.reply_queue.write().unwrap_or_else(|e| e.into_inner()) = Some(replies.name().clone());
        drop(bindings);
        Ok((connection, channel, live, answers))
    }

    async fn serve_once(
        &self,
        router: &Router,
        metrics: &Arc<Metrics>,
        readiness: &Readiness,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let (connection, _channel, mut live, mut answers) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = timeout(CONNECT_TIMEOUT, self.connect()) => match c {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out connecting".into()),
            },
        };
        readiness.set_live_ok();
        info!(queue = %self.names.live_queue(), "consuming the cluster's live messages");
        let settler = Settler::spawn(usize::from(PREFETCH) / 4);
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = health.tick() => if !connection.status().connected() {
                    break Err("connection lost".to_string());
                },
                delivery = live.next() => match delivery {
                    Some(Ok(delivery)) => self.dispatch(delivery, &settler, router, metrics).await,
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Err("the broker cancelled the consumer".into()),
                },
                answer = answers.next() => match answer {
                    Some(Ok(answer)) => self.answered(answer),
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Err("the broker cancelled the replies' consumer".into()),
                },
            }
        };
        let _ = timeout(Duration::from_secs(1), connection.close(200, "bye".into())).await;
        result
    }

    fn answered(&self, answer: Delivery) {
        let Some(id) = answer.properties.correlation_id() else {
            return;
        };
        if let Some(waiting) = self.calls_map().get(id.as_str()) {
            let _ = waiting.send(answer.data);
        }
    }

    /// One live message: a notification goes to the router (acked after
    /// hand-off, as from the ingest queue); the rest are handled here and
    /// acked in order behind it.
    async fn dispatch(
        &self,
        delivery: Delivery,
        settler: &Settler,
        router: &Router,
        metrics: &Metrics,
    ) {
        let settlement = settler.settlement(delivery.acker.clone());
        let kind = delivery
            .properties
            .kind()
            .as_ref()
            .and_then(|k| Kind::parse(k.as_str()));
        let outcome = match kind {
            Some(Kind::Notify) => match notifications_of(&delivery.data) {
                Ok(mut requests) => {
                    metrics.cluster_live_received.add(requests.len() as u64);
                    // Acked once the last of them was handed over.
                    if let Some(last) = requests.last_mut() {
                        last.settlement = Some(Box::new(settlement));
                    } else {
                        router.settle_after(settlement).await;
                    }
                    for request in requests {
                        router.route(request).await;
                    }
                    return;
                }
                Err(e) => Err(e),
            },
            Some(Kind::Counts) => self.on_counts(&delivery.data, router).await,
            Some(Kind::List) => self.on_list(&delivery, router).await,
            Some(Kind::Disconnect) => self.on_disconnect(&delivery, router).await,
            Some(Kind::Reply) | None => Err("unknown kind".to_string()),
        };
        if let Err(reason) = outcome {
            warn!(%reason, kind = ?delivery.properties.kind(), "unusable live message dropped");
        }
        router.settle_after(settlement).await;
    }

    async fn on_counts(&self, body: &[u8], router: &Router) -> Result<(), String> {
        let counts: LiveCounts = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let user = UserId::new(&counts.user).ok_or("an empty user id")?;
        let frame = frames::inbox_counts(crate::inbox::Counts {
            total: counts.total,
            unread: counts.unread,
            version: counts.version,
        });
        router.to_user_versioned(user, frame, counts.version).await;
        Ok(())
    }

    async fn on_list(&self, call: &Delivery, router: &Router) -> Result<(), String> {
        let body: ListCall = serde_json::from_slice(&call.data).map_err(|e| e.to_string())?;
        let user = body.user_id.as_deref().and_then(UserId::new);
        let list = router.list(user).await;
        self.reply(call, &serde_json::to_vec(&list).map_err(|e| e.to_string())?)
            .await
    }

    async fn on_disconnect(&self, call: &Delivery, router: &Router) -> Result<(), String> {
        let body: DisconnectCall = serde_json::from_slice(&call.data).map_err(|e| e.to_string())?;
        let found = match router.names().parse(&body.id) {
            Some(id) => router.disconnect(id).await,
            None => false,
        };
        let reply = serde_json::to_vec(&DisconnectReply { found }).map_err(|e| e.to_string())?;
        self.reply(call, &reply).await
    }

    /// Answers a call through the default exchange, to its reply queue.
    async fn reply(&self, call: &Delivery, body: &[u8]) -> Result<(), String> {
        let (Some(reply_to), Some(id)) =
            (call.properties.reply_to(), call.properties.correlation_id())
        else {
            return Err("a call without reply_to or correlation_id".into());
        };
        let channel = self.current().ok_or("link down")?;
        channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_correlation_id(id.clone())
                    .with_type(Kind::Reply.as_str().into()),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A live message's notifications (a JSON array, one per notification of
/// the writer's batch for this instance), as route requests in order.
fn notifications_of(body: &[u8]) -> Result<Vec<crate::router::RouteRequest>, String> {
    serde_json::from_slice::<Vec<LiveNotification>>(body)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(LiveNotification::into_request)
        .collect()
}
