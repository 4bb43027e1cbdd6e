//! notify-bridge delivers notifications from RabbitMQ to the WebSockets of
//! the users they are addressed to.
//!
//! Follow one message from the broker to a browser:
//!
//! ```text
//! AMQP delivery ─▶ amqp::consumer ─▶ message::decode ─▶ [inbox::stage]
//!              ─▶ router (one task) ─▶ session queue ─▶ ws::session ─▶ socket
//! ```
//!
//! What is where:
//!
//! - [`config`]: figment layers (defaults, TOML, environment) to a typed,
//!   validated [`config::Config`].
//! - [`message`]: the notification on the wire, decoded and validated once,
//!   its frame serialized once.
//! - [`amqp`]: topology, the consume loop with reconnects, ordered acks.
//! - [`router`]: the one task that knows who is connected and fans out.
//! - [`ws`]: the WebSocket server: handshake and auth, limits, sessions.
//! - [`auth`]: JWT verification and minting.
//! - [`inbox`]: the per-user store of notifications (when enabled): the
//!   commit stage between consumer and router, replay on reconnect.
//! - [`http`]: the side port: REST send (republished with publisher
//!   confirms), admin, health, readiness, metrics, OpenAPI.
//! - [`receipts`]: delivery receipts (what became of each message), sent
//!   through `amqp::receipt_publisher` before the ack.
//! - [`metrics`], [`readiness`]: shared state operators read.
//! - [`memory`]: hands freed heap pages back after a crowd disconnects.
//! - [`shutdown`]: the signal every task watches.
//! - [`tls`]: wss and https, certificates re-read on SIGHUP.
//!
//! [`run`] starts it all and returns the bound addresses, so tests can bind
//! port 0.

pub mod amqp;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod connection_id;
pub mod error;
pub mod http;
pub mod inbox;
pub mod log_limit;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod outbound;
pub mod query;
pub mod readiness;
pub mod receipts;
pub mod router;
pub mod shutdown;
pub mod tickets;
pub mod tls;
pub mod ws;

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
};

use anyhow::Context;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    amqp::{
        consumer::{self, ConsumerContext, Downstream},
        publisher::Publisher,
        topology::IngestQueue,
    },
    auth::Authenticator,
    cluster::{fanout::Fanout, Cluster},
    config::{AuthMode, Config},
    connection_id::ConnectionNames,
    http::{demo::DemoSettings, ApiKeys, HttpState},
    inbox::{
        stage::{Committed, InboxStage},
        Inbox,
    },
    metrics::Metrics,
    readiness::Readiness,
    router::Router,
    ws::{limits::ConnectionLimits, WsContext},
};

/// A started bridge.
pub struct Running {
    /// Where the WebSocket listener is bound.
    pub ws_addr: SocketAddr,
    /// Where the HTTP side port is bound.
    pub http_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub router: Router,
    done: JoinHandle<()>,
}

impl Running {
    /// Waits until the bridge has shut down (after `shutdown` was cancelled).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Starts the bridge; it stops when `shutdown` is cancelled.
///
/// Fails only for what must stop startup: listeners that cannot bind, keys
/// that cannot be read. An unreachable broker is not an error: the bridge
/// serves sockets and keeps reconnecting.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let auth = Arc::new(Authenticator::from_config(&config.auth)?);
    let metrics = Arc::new(Metrics::default());
    let receipts = Arc::new(receipts::Receipts::new(&config.receipts));
    let mut inbox = if config.inbox.enabled {
        Some(Inbox::open(&config.inbox).await?)
    } else {
        None
    };
    if let Some(inbox) = inbox.as_mut().filter(|_| receipts.reads_wanted()) {
        inbox.report_reads(amqp::read_receipts::spawn(
            config.amqp.clone(),
            amqp::receipt_publisher::Destination {
                exchange: config.amqp.exchange.clone(),
                routing_key: config.receipts.routing_key.clone(),
            },
            receipts.clone(),
            metrics.clone(),
        ));
    }
    let tls = tls::ListenersTls::from_config(&config)?;
    amqp::connect::check(&config.amqp)?;
    tls::reload_on_sighup(tls.certs(), shutdown.clone());
    if config.auth.mode == AuthMode::None {
        warn!("auth.mode = \"none\": ANY client can connect as ANY user. Local development only!");
    }
    let ws_listener = TcpListener::bind(config.websocket.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on websocket.listen = {}",
                config.websocket.listen
            )
        })?;
    let http_listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
    let ws_addr = ws_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let readiness = Arc::new(Readiness::default());
    if let Some(store) = inbox.as_ref().and_then(Inbox::postgres) {
        watch_database(store, readiness.clone(), shutdown.clone());
    }
    let instance = config
        .cluster
        .enabled
        .then(|| config.cluster.resolved_instance_id());
    let (router, router_task) =
        Router::spawn_named(metrics.clone(), ConnectionNames::new(instance.as_deref()));
    let cluster = match (&inbox, config.cluster.enabled) {
        (Some(inbox), true) => {
            Some(start_cluster(&config, inbox, &router, &metrics, &readiness, &shutdown).await?)
        }
        _ => None,
    };

    let (downstream, queue) = wire_consumer(
        &config, &inbox, &cluster, &router, &metrics, &readiness, &shutdown,
    );
    let consumer_task = tokio::spawn(consumer::run(ConsumerContext {
        config: Arc::new(config.amqp.clone()),
        queue: Arc::new(queue),
        downstream,
        router: router.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
        receipts,
        receipts_routing_key: config.receipts.routing_key.clone(),
    }));

    let sessions = TaskTracker::new();
    let ws_ctx = Arc::new(WsContext {
        limits: ConnectionLimits::new(
            config.websocket.max_connections,
            config.websocket.max_connections_per_user,
        ),
        settings: config.websocket.clone(),
        auth: auth.clone(),
        router: router.clone(),
        metrics: metrics.clone(),
        next_connection_id: AtomicU64::new(0),
        shutdown: shutdown.clone(),
        sessions: sessions.clone(),
        inbox: inbox.clone(),
        cluster: cluster.clone(),
        tls: tls.websocket.clone(),
    });
    let ws_task = tokio::spawn(ws::serve(ws_listener, ws_ctx));
    tokio::spawn(memory::reclaim_after_disconnects(
        metrics.clone(),
        shutdown.clone(),
    ));

    let keys = ApiKeys::from_config(&config.http);
    if !keys.sender_possible() {
        warn!(
            "no API key configured: POST /api/notifications/send refuses everything with 401. \
             Set http.api_keys (NOTIFY_BRIDGE_HTTP__API_KEYS=key1,key2), or \
             http.allow_anonymous = true for local development"
        );
    } else if config.http.allow_anonymous {
        warn!(
            "http.allow_anonymous = true: anyone who reaches the side port can send notifications"
        );
    }
    if config.http.dev_tokens {
        warn!(
            "http.dev_tokens = true: GET /api/dev/token gives anyone who reaches the side port \
             a valid token for ANY user. Local development only!"
        );
    }
    let http_state = Arc::new(HttpState {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        router: router.clone(),
        publisher: Publisher::new(config.amqp.clone()),
        keys,
        limits: message::DecodeLimits::from_config(&config.amqp),
        demo: DemoSettings {
            ws_addr,
            ws_path: config.websocket.path.clone(),
            auth_mode: config.auth.mode,
            dev_tokens: config.http.dev_tokens,
            inbox: config.inbox.enabled,
            auth: config.auth.clone(),
        },
        auth,
        inbox,
        cluster,
    });
    let http_task = tokio::spawn(http::serve(
        http_listener,
        http_state,
        (&config.http).into(),
        tls.http.clone(),
        shutdown.clone(),
    ));

    info!(%ws_addr, path = %config.websocket.path, %http_addr,
        wss = tls.websocket.is_some(), https = tls.http.is_some(), "notify-bridge listening");

    let shutdown_timeout = config.shutdown_timeout;
    let drain_router = router.clone();
    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        info!("shutting down: closing clients with 1001");
        let drain = async {
            let _ = ws_task.await;
            let _ = consumer_task.await;
            drain_router.close_all(1001, "server shutting down").await;
            sessions.close();
            sessions.wait().await;
            let _ = http_task.await;
        };
        if tokio::time::timeout(shutdown_timeout, drain).await.is_err() {
            warn!(timeout = ?shutdown_timeout, "shutdown_timeout reached; exiting anyway");
        }
        drop(drain_router);
        router_task.abort();
        info!("stopped");
    });

    Ok(Running {
        ws_addr,
        http_addr,
        metrics,
        readiness,
        router,
        done,
    })
}

/// Joins the cluster: the instance's heartbeat and presence, its live link.
async fn start_cluster(
    config: &Config,
    inbox: &Inbox,
    router: &Router,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Cluster>> {
    let store = inbox
        .postgres()
        .context("cluster mode needs inbox.store = \"postgres\"")?;
    let cluster = Cluster::start(
        &config.cluster,
        &config.amqp,
        config.auth.ticket_ttl,
        &store,
        router.clone(),
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .await
    .context("cannot join the cluster")?;
    info!(cluster = %cluster.names.cluster, instance = %cluster.names.instance, "cluster mode");
    Ok(cluster)
}

/// Where the consumer reads (this instance's queue, or the cluster's
/// shared one) and where its deliveries go (the router, the commit stage,
/// or the commit stage and then the cluster's fanout).
fn wire_consumer(
    config: &Config,
    inbox: &Option<Inbox>,
    cluster: &Option<Arc<Cluster>>,
    router: &Router,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    shutdown: &CancellationToken,
) -> (Downstream, IngestQueue) {
    let Some(inbox) = inbox else {
        return (
            Downstream::Router(router.clone()),
            IngestQueue::own(&config.amqp),
        );
    };
    let (next, queue) = match cluster {
        Some(cluster) => (
            Committed::Cluster(
                Fanout {
                    link: cluster.link.clone(),
                    presence: cluster.presence.clone(),
                    store: inbox.postgres().expect("cluster mode runs on PostgreSQL"),
                }
                .spawn(),
            ),
            IngestQueue::shared(cluster.names.ingest_queue()),
        ),
        None => (
            Committed::Router(router.clone()),
            IngestQueue::own(&config.amqp),
        ),
    };
    let stage = InboxStage::spawn(
        inbox.clone(),
        next,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
        usize::from(config.amqp.prefetch),
    );
    (Downstream::Inbox(stage), queue)
}

/// A PostgreSQL inbox that did not answer at startup: `/readyz` is 503
/// until it does (and is migrated), retried with the broker's backoff.
fn watch_database(
    store: Arc<inbox::PgStore>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    if store.is_migrated() {
        return;
    }
    readiness.set_store_failing("the inbox database does not answer yet");
    tokio::spawn(async move {
        let mut backoff = std::time::Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match store.client().await {
                Ok(_) => {
                    info!("inbox store open (PostgreSQL)");
                    readiness.set_store_ok();
                    return;
                }
                Err(e) => {
                    readiness
                        .set_store_failing(format!("the inbox database does not answer: {e:#}"));
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                }
            }
        }
    });
}
