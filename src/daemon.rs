//! Starting the bridge: every task wired to the others, and the shutdown
//! drain that stops them in order.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
};

use anyhow::Context;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    amqp,
    amqp::{
        consumer::{self, ConsumerContext, Downstream},
        publisher::Publisher,
        topology::IngestQueue,
    },
    auth::Authenticator,
    cluster::{fanout::Fanout, Cluster},
    config::{AuthMode, Config},
    connection_id::ConnectionNames,
    http,
    http::{demo::DemoSettings, ApiKeys, HttpState},
    inbox,
    inbox::Inbox,
    memory, message,
    metrics::Metrics,
    readiness::Readiness,
    receipts,
    router::Router,
    stage::{Committed, InboxStage},
    tls, ws,
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
    done: JoinHandle<Result<(), TaskEnded>>,
}

impl Running {
    /// Waits until the bridge has shut down: after `shutdown` was
    /// cancelled, or with an error when a task the delivery path needs
    /// ended first (a panic), so that the process exits non-zero and its
    /// supervisor restarts it instead of it staying up delivering nothing.
    pub async fn wait(self) -> Result<(), TaskEnded> {
        self.done.await.unwrap_or(Err(TaskEnded {
            task: "drain",
            detail: "the shutdown task itself failed".into(),
        }))
    }
}

/// A task on the delivery path (the router or the consume loop) ended
/// before shutdown: only a bug does that, and the bridge stops.
#[derive(Debug)]
pub struct TaskEnded {
    pub task: &'static str,
    pub detail: String,
}

impl std::fmt::Display for TaskEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} task ended before shutdown: {}",
            self.task, self.detail
        )
    }
}

impl std::error::Error for TaskEnded {}

/// Starts the bridge; it stops when `shutdown` is cancelled.
///
/// Fails only for what must stop startup: listeners that cannot bind, keys
/// that cannot be read. An unreachable broker is not an error: the bridge
/// serves sockets and keeps reconnecting.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let auth = Arc::new(Authenticator::from_config(&config.auth)?);
    let metrics = Arc::new(Metrics::default());
    let receipts = Arc::new(receipts::Receipts::new(&config.receipts));
    let inbox = open_inbox(&config, &receipts, &metrics).await?;
    let tls = tls::ListenersTls::from_config(&config)?;
    amqp::connect::check(&config.amqp)?;
    tls::reload_on_sighup(tls.certs(), shutdown.clone());
    let (ws_listener, http_listener) = bind(&config).await?;
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

    let shared = Shared {
        auth,
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        router: router.clone(),
        inbox,
        cluster,
        shutdown: shutdown.clone(),
    };
    let consumer_task = spawn_consumer(&config, &shared, receipts);
    let sessions = TaskTracker::new();
    let ws_task = spawn_ws(&config, &shared, ws_listener, &tls, &sessions);
    tokio::spawn(memory::reclaim_after_disconnects(
        metrics.clone(),
        shutdown.clone(),
    ));
    let http_task = spawn_http(&config, shared, http_listener, ws_addr, &tls);

    info!(%ws_addr, path = %config.websocket.path, %http_addr,
        wss = tls.websocket.is_some(), https = tls.http.is_some(), "notify-bridge listening");

    let tasks = Tasks {
        ws: ws_task,
        consumer: consumer_task,
        http: http_task,
        router: router_task,
        sessions,
    };
    let done = tokio::spawn(drain(
        tasks,
        router.clone(),
        shutdown,
        config.shutdown_timeout,
    ));
    Ok(Running {
        ws_addr,
        http_addr,
        metrics,
        readiness,
        router,
        done,
    })
}

/// What most tasks share; each takes clones.
struct Shared {
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    router: Router,
    inbox: Option<Inbox>,
    cluster: Option<Arc<Cluster>>,
    shutdown: CancellationToken,
}

/// The consume loop, feeding the router (through the inbox stage and, in
/// cluster mode, the fanout).
fn spawn_consumer(
    config: &Config,
    shared: &Shared,
    receipts: Arc<receipts::Receipts>,
) -> JoinHandle<()> {
    let (downstream, queue) = wire_consumer(
        config,
        &shared.inbox,
        &shared.cluster,
        &shared.router,
        &shared.metrics,
        &shared.readiness,
        &shared.shutdown,
    );
    tokio::spawn(consumer::run(ConsumerContext {
        config: Arc::new(config.amqp.clone()),
        queue: Arc::new(queue),
        downstream,
        router: shared.router.clone(),
        metrics: shared.metrics.clone(),
        readiness: shared.readiness.clone(),
        shutdown: shared.shutdown.clone(),
        receipts,
        receipts_routing_key: config.receipts.routing_key.clone(),
    }))
}

/// The WebSocket accept loop; its sessions go into `sessions`.
fn spawn_ws(
    config: &Config,
    shared: &Shared,
    listener: TcpListener,
    tls: &tls::ListenersTls,
    sessions: &TaskTracker,
) -> JoinHandle<()> {
    let ws_ctx = Arc::new(WsContext {
        limits: ConnectionLimits::new(
            config.websocket.max_connections,
            config.websocket.max_connections_per_user,
        ),
        settings: config.websocket.clone(),
        auth: shared.auth.clone(),
        router: shared.router.clone(),
        metrics: shared.metrics.clone(),
        next_connection_id: AtomicU64::new(0),
        shutdown: shared.shutdown.clone(),
        sessions: sessions.clone(),
        inbox: shared.inbox.clone(),
        cluster: shared.cluster.clone(),
        tls: tls.websocket.clone(),
    });
    tokio::spawn(ws::serve(listener, ws_ctx))
}

/// The HTTP side port.
fn spawn_http(
    config: &Config,
    shared: Shared,
    listener: TcpListener,
    ws_addr: SocketAddr,
    tls: &tls::ListenersTls,
) -> JoinHandle<()> {
    let keys = ApiKeys::from_config(&config.http);
    warn_development_settings(config, &keys);
    let shutdown = shared.shutdown.clone();
    let http_state = Arc::new(HttpState {
        metrics: shared.metrics,
        readiness: shared.readiness,
        router: shared.router,
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
        auth: shared.auth,
        inbox: shared.inbox,
        cluster: shared.cluster,
    });
    tokio::spawn(http::serve(
        listener,
        http_state,
        (&config.http).into(),
        tls.http.clone(),
        shutdown,
    ))
}

/// The inbox when `inbox.enabled`, reporting read-state changes to the
/// `read` receipt publisher when receipts want them.
async fn open_inbox(
    config: &Config,
    receipts: &Arc<receipts::Receipts>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Inbox>> {
    if !config.inbox.enabled {
        return Ok(None);
    }
    let mut inbox = Inbox::open(&config.inbox).await?;
    if receipts.reads_wanted() {
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
    Ok(Some(inbox))
}

/// The WebSocket listener and the HTTP side port.
async fn bind(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let ws = TcpListener::bind(config.websocket.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on websocket.listen = {}",
                config.websocket.listen
            )
        })?;
    let http = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
    Ok((ws, http))
}

/// Says loudly at startup what is only meant for local development.
fn warn_development_settings(config: &Config, keys: &ApiKeys) {
    if config.auth.mode == AuthMode::None {
        warn!("auth.mode = \"none\": ANY client can connect as ANY user. Local development only!");
    }
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
}

/// The long-lived tasks the shutdown waits for.
struct Tasks {
    ws: JoinHandle<()>,
    consumer: JoinHandle<()>,
    http: JoinHandle<()>,
    router: JoinHandle<()>,
    sessions: TaskTracker,
}

/// Once `shutdown` is cancelled: stop accepting and consuming, close every
/// client with 1001 and wait for their close frames, within `timeout`. If
/// the router or the consume loop ends first, stop at once with its error.
async fn drain(
    mut tasks: Tasks,
    router: Router,
    shutdown: CancellationToken,
    timeout: std::time::Duration,
) -> Result<(), TaskEnded> {
    if let Some(ended) = delivery_task_ended(&mut tasks, &shutdown).await {
        error!(task = ended.task, detail = %ended.detail,
            "a task on the delivery path ended: stopping; unacknowledged deliveries go back to the broker");
        shutdown.cancel();
        for task in [&tasks.ws, &tasks.consumer, &tasks.http, &tasks.router] {
            task.abort();
        }
        return Err(ended);
    }
    info!("shutting down: closing clients with 1001");
    let Tasks {
        ws,
        consumer,
        http,
        router: router_task,
        sessions,
    } = tasks;
    let drain = async {
        let _ = ws.await;
        let _ = consumer.await;
        router.close_all(1001, "server shutting down").await;
        sessions.close();
        sessions.wait().await;
        let _ = http.await;
    };
    if tokio::time::timeout(timeout, drain).await.is_err() {
        warn!(?timeout, "shutdown_timeout reached; exiting anyway");
    }
    drop(router);
    router_task.abort();
    info!("stopped");
    Ok(())
}

/// Waits for `shutdown`; `Some` if the router or the consume loop ended
/// first, which they do only by panicking.
async fn delivery_task_ended(tasks: &mut Tasks, shutdown: &CancellationToken) -> Option<TaskEnded> {
    let (task, result) = tokio::select! {
        // Shutdown first: the consume loop ends by itself once it is asked.
        biased;
        _ = shutdown.cancelled() => return None,
        result = &mut tasks.router => ("router", result),
        result = &mut tasks.consumer => ("consume loop", result),
    };
    let detail = match result {
        Err(e) if e.is_panic() => "it panicked (the panic is logged above)".to_string(),
        Err(e) => e.to_string(),
        Ok(()) => "it returned".to_string(),
    };
    Some(TaskEnded { task, detail })
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
            Committed::Batches(
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Tasks that run until aborted, but for the router and the consume
    /// loop given.
    fn tasks(router: JoinHandle<()>, consumer: JoinHandle<()>) -> Tasks {
        let forever = || tokio::spawn(std::future::pending::<()>());
        Tasks {
            ws: forever(),
            consumer,
            http: forever(),
            router,
            sessions: TaskTracker::new(),
        }
    }

    #[tokio::test]
    async fn a_panicking_router_stops_the_bridge_with_an_error() {
        let (router, _join) = Router::spawn(Arc::new(Metrics::default()));
        let shutdown = CancellationToken::new();
        let panicking = tokio::spawn(async { panic!("a bug in the router") });
        let consumer = tokio::spawn(std::future::pending::<()>());
        let drained = drain(
            tasks(panicking, consumer),
            router,
            shutdown.clone(),
            Duration::from_secs(1),
        );
        let ended = tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .expect("the drain must not wait for a shutdown that nobody asks for")
            .expect_err("a panicked router is a failure");
        assert_eq!(ended.task, "router");
        assert!(ended.detail.contains("panicked"), "{ended}");
        assert!(shutdown.is_cancelled(), "the rest of the bridge stops too");
    }

    /// On SIGTERM the consume loop ends by itself, often before the drain
    /// looks: that is a clean stop, every time.
    #[tokio::test]
    async fn a_consume_loop_that_ended_for_a_requested_shutdown_is_a_clean_stop() {
        for _ in 0..20 {
            let (router, _join) = Router::spawn(Arc::new(Metrics::default()));
            let shutdown = CancellationToken::new();
            shutdown.cancel();
            let consumer = tokio::spawn(async {});
            tokio::task::yield_now().await;
            let router_task = tokio::spawn(std::future::pending::<()>());
            let drained = drain(
                tasks(router_task, consumer),
                router,
                shutdown,
                Duration::from_millis(20),
            );
            assert!(drained.await.is_ok());
        }
    }
}
