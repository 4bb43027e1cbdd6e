//! The side port's listener (CONTRACT.md, "Limits on hostile input", HTTP
//! side port): at most `http.max_connections` connections at once, each a
//! hyper HTTP/1.1 connection whose request head must arrive within
//! `http.request_timeout` (which also closes a keep-alive connection that
//! idles that long), under hyper-util's graceful shutdown. `axum::serve`
//! offers neither timer nor cap, so idle or half-sent connections could
//! pile up until the process ran out of file descriptors and the WebSocket
//! listener could not accept any more.
//!
//! With `http.tls_cert_file`/`tls_key_file` the port speaks https: the TLS
//! handshake runs in the connection's own task and must finish within
//! `http.request_timeout`, before the head timer starts.

use std::{
    convert::Infallible,
    future::Future,
    io::{Read, Write},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use axum::{response::Response, Router as Routes};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use super::{
    activity::{Activity, Watched},
    deadline::BodyDeadline,
};
use crate::{
    config::HttpConfig,
    log_limit::{LogLimit, LOG_INTERVAL},
    metrics::{Limit, Metrics},
    tls::{ListenerTls, ServerStream},
};

/// How long the accept loop waits after a failed `accept`: the listener
/// stays readable while the process is out of file descriptors, so retrying
/// at once would spin a core until a socket closes.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The part of `[http]` the listener enforces, on its own so that the
/// listener needs nothing else of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SidePortLimits {
    /// `http.request_timeout`: for the head, again for the body, and for an
    /// idle keep-alive connection.
    pub request_timeout: Duration,
    /// `http.max_connections`.
    pub max_connections: usize,
}

impl From<&HttpConfig> for SidePortLimits {
    fn from(config: &HttpConfig) -> Self {
        Self {
            request_timeout: config.request_timeout,
            max_connections: config.max_connections,
        }
    }
}

/// The rate-limited WARN lines of the accept loop and its connections.
struct Logs {
    refused: LogLimit,
    head_timeout: LogLimit,
    accept_failed: LogLimit,
}

/// What the accept loop shares with the connections it starts.
struct SidePort {
    app: Routes,
    limits: SidePortLimits,
    metrics: Arc<Metrics>,
    deadline: Arc<BodyDeadline>,
    /// One permit per open connection, `http.max_connections` in all.
    open: Arc<Semaphore>,
    builder: http1::Builder,
    graceful: GracefulShutdown,
    /// The 503 for a connection past the cap, rendered once.
    refusal: Vec<u8>,
    logs: Arc<Logs>,
    /// https when set.
    tls: Option<Arc<ListenerTls>>,
    shutdown: CancellationToken,
}

/// Accepts and serves connections until `shutdown`, then stops accepting,
/// lets every connection finish the request it is in (idle ones close at
/// once) and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Routes,
    limits: SidePortLimits,
    metrics: Arc<Metrics>,
    tls: Option<Arc<ListenerTls>>,
    shutdown: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout);
    let port = SidePort {
        app,
        limits,
        deadline: Arc::new(BodyDeadline::new(limits.request_timeout, metrics.clone())),
        metrics,
        open: Arc::new(Semaphore::new(
            limits.max_connections.min(Semaphore::MAX_PERMITS),
        )),
        builder,
        graceful: GracefulShutdown::new(),
        refusal: refusal_response(limits.max_connections),
        logs: Arc::new(Logs {
            refused: LogLimit::new(LOG_INTERVAL),
            head_timeout: LogLimit::new(LOG_INTERVAL),
            accept_failed: LogLimit::new(LOG_INTERVAL),
        }),
        tls,
        shutdown: shutdown.clone(),
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote_addr)) => match port.open.clone().try_acquire_owned() {
                Ok(permit) => port.start(stream, remote_addr, permit),
                Err(_) => port.refuse(stream, remote_addr),
            },
            Err(e) => {
                if let Some(unlogged) = port.logs.accept_failed.event() {
                    warn!(error = %e, failed_since_last_log = unlogged,
                        "side port: accept failed (out of file descriptors?); retrying every {ACCEPT_ERROR_BACKOFF:?}");
                }
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
    drop(listener);
    port.graceful.shutdown().await;
}

impl SidePort {
    /// Serves one connection on its own task, holding `permit` until it
    /// closes.
    fn start(&self, tcp: TcpStream, remote_addr: SocketAddr, permit: OwnedSemaphorePermit) {
        let activity = Arc::new(Activity::default());
        let service = service(&self.app, &self.deadline, &activity);
        let (builder, watcher) = (self.builder.clone(), self.graceful.watcher());
        let (metrics, logs) = (self.metrics.clone(), self.logs.clone());
        let (tls, shutdown) = (self.tls.clone(), self.shutdown.clone());
        let timeout = self.limits.request_timeout;
        let connection = async move {
            let secured = secure(tcp, tls.as_deref(), timeout, &shutdown).await;
            let stream = match secured {
                Secured::Ready(stream) => stream,
                Secured::TimedOut => {
                    let what = "a TLS handshake did not finish";
                    return timed_out(what, timeout, &metrics, &logs);
                }
                Secured::Failed => return,
            };
            let io = TokioIo::new(Watched::new(stream, activity.clone()));
            let mut result = watcher.watch(builder.serve_connection(io, service)).await;
            drop(permit);
            if activity.idle_keep_alive() {
                result = Ok(());
            }
            closed(result, timeout, &metrics, &logs);
        };
        // Whatever the connection logs, and its requests' spans, name the peer.
        tokio::spawn(connection.instrument(info_span!("http_connection", %remote_addr)));
    }

    /// A connection past `http.max_connections`: answered, counted, closed.
    fn refuse(&self, stream: TcpStream, remote_addr: SocketAddr) {
        refuse(stream, &self.refusal);
        self.metrics.refused(Limit::HttpConnections);
        if let Some(unlogged) = self.logs.refused.event() {
            warn!(%remote_addr, limit = Limit::HttpConnections.label(),
                max_connections = self.limits.max_connections, refused_since_last_log = unlogged,
                "side port: connection refused, http.max_connections connections are open");
        }
    }
}

/// What became of a connection's TLS handshake.
enum Secured {
    Ready(ServerStream),
    /// Not finished within `http.request_timeout`: counted as a refusal,
    /// as a head that does not arrive is.
    TimedOut,
    /// Failed, or shutdown began (logged at DEBUG).
    Failed,
}

/// The TLS handshake when the port speaks https (the plain socket
/// otherwise), in the connection's own task.
async fn secure(
    tcp: TcpStream,
    tls: Option<&ListenerTls>,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Secured {
    let Some(tls) = tls else {
        return Secured::Ready(ServerStream::Plain(tcp));
    };
    tokio::select! {
        _ = shutdown.cancelled() => Secured::Failed,
        accepted = tokio::time::timeout(timeout, tls.accept(tcp)) => match accepted {
            Ok(Ok(stream)) => Secured::Ready(stream),
            Ok(Err(e)) => {
                debug!(error = %e, "side port: TLS handshake failed");
                Secured::Failed
            }
            Err(_) => Secured::TimedOut,
        },
    }
}

/// Something that did not arrive within `http.request_timeout` (a TLS
/// handshake, a request head): a refusal, counted, logged rate-limited.
fn timed_out(what: &str, timeout: Duration, metrics: &Metrics, logs: &Logs) {
    metrics.refused(Limit::HttpRequestTimeout);
    if let Some(unlogged) = logs.head_timeout.event() {
        warn!(
            limit = Limit::HttpRequestTimeout.label(),
            ?timeout,
            timed_out_since_last_log = unlogged,
            "side port: {what} within http.request_timeout; closed"
        );
    }
}

/// The routes as one connection's hyper service: each request's body under
/// its deadline, each answer noted in the connection's [`Activity`].
fn service(
    app: &Routes,
    deadline: &Arc<BodyDeadline>,
    activity: &Arc<Activity>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send,
> + Clone {
    let routes = TowerToHyperService::new(app.clone());
    let (deadline, activity) = (deadline.clone(), activity.clone());
    hyper::service::service_fn(move |request| {
        let (request, expired) = deadline.arm(request);
        let answer = hyper::service::Service::call(&routes, request);
        let (deadline, activity) = (deadline.clone(), activity.clone());
        async move {
            let response = answer.await?;
            activity.answered();
            Ok(deadline.answer(expired, response))
        }
    })
}

/// A connection has ended: a head that did not arrive in time is a refusal
/// (an idle keep-alive connection closed by the same timer is passed in as
/// `Ok`, see [`Activity`]).
fn closed(result: Result<(), hyper::Error>, timeout: Duration, metrics: &Metrics, logs: &Logs) {
    let Err(e) = result else {
        return;
    };
    if !e.is_timeout() {
        debug!(error = %e, "side port: connection failed");
        return;
    }
    timed_out("a request head did not arrive", timeout, metrics, logs);
}

/// The answer to a connection past `http.max_connections`: a complete 503
/// in the contract's error shape, small enough for an empty send buffer.
fn refusal_response(max_connections: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "error": "unavailable",
        "detail": format!(
            "the side port already has http.max_connections = {max_connections} connections open; retry shortly"
        ),
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Writes the 503 and closes, without a task and without waiting: what the
/// client has already sent is read and discarded first (closing a socket
/// with unread input sends a reset that can destroy the answer). The calls
/// go straight to the non-blocking socket, because tokio's `try_write` on a
/// socket accepted a moment ago may not know yet that it is writable.
fn refuse(stream: TcpStream, refusal: &[u8]) {
    let Ok(mut socket) = stream.into_std() else {
        return;
    };
    let mut sink = [0u8; 4096];
    let _ = socket.read(&mut sink);
    let _ = socket.write(refusal);
    let _ = socket.shutdown(std::net::Shutdown::Write);
}
