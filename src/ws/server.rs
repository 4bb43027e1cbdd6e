//! The accept loop: TCP accept, then in each connection's own task the TLS
//! handshake (wss, when configured) and the upgrade handshake under one
//! timeout (the request head read by `request_head`, bounded; the 101 or
//! the refusal written here), the connection limits, then one session task
//! per admitted client over the [`ServerStream`], plain or TLS.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_tungstenite::{
    tungstenite::{
        handshake::server::{create_response, write_response, Request, Response},
        http::{HeaderValue, StatusCode},
        protocol::Role,
    },
    WebSocketStream,
};
use tracing::{debug, warn};

use crate::{
    error::ApiError,
    tls::ServerStream,
    ws::{
        context::WsContext,
        handshake::{Admission, BEARER_PROTOCOL},
        limits::{PendingHandshake, Permit},
        request_head::{self, HeadError},
        session,
    },
};

/// How long a refused client gets to take its answer: after the response
/// and a FIN, what it still sends (the rest of an oversized head) is read
/// and discarded for at most this long, because closing a socket with unread
/// input sends a TCP reset that can destroy the answer before it is read.
const LINGER: Duration = Duration::from_secs(1);

/// The most bytes read and discarded while lingering.
const LINGER_BYTES: usize = 64 * 1024;

/// How often a failing `accept` (out of file descriptors) is logged: once,
/// then at most once per this interval, with the count in between.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long the accept loop waits after a failed `accept`: the listener
/// stays readable while the process is out of file descriptors, so retrying
/// at once would spin a core at 100 % until a socket closes.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections until shutdown.
///
/// Each accepted socket takes a place among the handshakes in progress
/// (`ConnectionLimits::begin_handshake`); when none is free it is answered
/// 503 at once, without a task, so a flood of sockets that never send a
/// request cannot grow the process. A failing `accept` backs off instead of
/// spinning.
pub async fn serve(listener: TcpListener, ctx: Arc<WsContext>) {
    let mut accept_errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote_addr)) => {
                let Some(pending) = ctx.limits.begin_handshake() else {
                    // A TLS client could not read a plain answer: closed.
                    if ctx.tls.is_none() {
                        refuse_at_once(stream, remote_addr);
                    }
                    continue;
                };
                let ctx2 = ctx.clone();
                ctx.sessions.spawn(async move {
                    handle_connection(stream, remote_addr, pending, ctx2).await;
                });
            }
            Err(e) => {
                accept_errors.failed(&e);
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Rate-limits the log of failing `accept` calls.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn failed(&mut self, e: &std::io::Error) {
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL);
        if due {
            warn!(
                error = %e,
                failed_since_last_log = self.unlogged,
                "accept failed (out of file descriptors?); retrying every {ACCEPT_ERROR_BACKOFF:?}"
            );
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
    }
}

/// Answers 503 to a socket for which there is no handshake place, without
/// waiting for anything: what it already sent is read and discarded (so
/// the close does not reset the answer away), the answer fits an empty send
/// buffer, and the socket is closed on return. The calls go straight to the
/// (non-blocking) socket: tokio's `try_write` on a socket accepted a moment
/// ago may not know yet that it is writable and would write nothing.
fn refuse_at_once(stream: TcpStream, remote_addr: SocketAddr) {
    use std::io::{Read, Write};
    let Ok(mut socket) = stream.into_std() else {
        return;
    };
    // At most a request head's worth: a client streaming bytes must not
    // hold the accept loop here.
    let mut sink = [0u8; 2048];
    for _ in 0..8 {
        if !matches!(socket.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let refusal = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "too many connections are in their handshake; retry shortly",
    );
    let _ = socket.write(&refusal.to_http());
    debug!(%remote_addr, "refused at accept: too many handshakes in progress");
}

/// An upgrade that was answered 101.
struct Accepted {
    admission: Admission,
    permit: Permit,
    /// Bytes the client sent after its request head.
    tail: Vec<u8>,
}

async fn handle_connection(
    stream: TcpStream,
    remote_addr: SocketAddr,
    pending: PendingHandshake,
    ctx: Arc<WsContext>,
) {
    // Boxed: the handshake's state (the request being read, the timer, a
    // refusal's linger buffer) would otherwise be part of every session's
    // task for its whole life; boxed, it is freed once the socket is a
    // WebSocket.
    let Some((ws, admission, permit)) = Box::pin(upgrade(stream, remote_addr, pending, &ctx)).await
    else {
        return;
    };
    session::run(ws, admission, permit, remote_addr, ctx).await;
}

/// The handshakes, TLS then upgrade, within one
/// `websocket.handshake_timeout`: the socket as a WebSocket with who the
/// client is and its place under the limits, or `None` once the client was
/// refused (the answer written) or dropped.
async fn upgrade(
    tcp: TcpStream,
    remote_addr: SocketAddr,
    pending: PendingHandshake,
    ctx: &WsContext,
) -> Option<(WebSocketStream<ServerStream>, Admission, Permit)> {
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + ctx.settings.handshake_timeout;
    let mut stream = secure(tcp, remote_addr, deadline, ctx).await?;
    let handshake = tokio::time::timeout_at(deadline, handshake(&mut stream, ctx));
    let outcome = tokio::select! {
        // A client still sending its request when shutdown starts is not
        // waited for.
        _ = ctx.shutdown.cancelled() => return None,
        outcome = handshake => outcome,
    };
    let accepted = match outcome {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(HeadError::Gone)) => {
            debug!(%remote_addr, "closed or failed before the handshake completed");
            return None;
        }
        Ok(Err(HeadError::Refused(refusal))) => {
            if let Some(limit) = refusal.limit {
                if let Some(unlogged) = ctx.metrics.refused_to_log(limit) {
                    warn!(
                        %remote_addr,
                        status = refusal.status.as_u16(),
                        limit = limit.label(),
                        detail = %refusal.detail,
                        refused_since_last_log = unlogged,
                        "handshake refused: limit reached"
                    );
                }
            } else {
                debug!(
                    %remote_addr,
                    status = refusal.status.as_u16(),
                    code = refusal.code,
                    detail = %refusal.detail,
                    "handshake refused"
                );
            }
            refuse(stream, &refusal).await;
            return None;
        }
        Err(_) => {
            debug!(%remote_addr, timeout = ?ctx.settings.handshake_timeout, "handshake timed out");
            return None;
        }
    };
    drop(pending);
    let Accepted {
        admission,
        permit,
        tail,
    } = accepted;
    let config = Some(ctx.tungstenite_config());
    let ws = if tail.is_empty() {
        WebSocketStream::from_raw_socket(stream, Role::Server, config).await
    } else {
        WebSocketStream::from_partially_read(stream, tail, Role::Server, config).await
    };
    Some((ws, admission, permit))
}

/// The TLS handshake when the listener speaks wss (the plain socket
/// otherwise), by `deadline`, in the connection's own task: a slow client
/// holds only its own place among the handshakes, never the accept loop.
async fn secure(
    tcp: TcpStream,
    remote_addr: SocketAddr,
    deadline: Instant,
    ctx: &WsContext,
) -> Option<ServerStream> {
    let Some(tls) = &ctx.tls else {
        return Some(ServerStream::Plain(tcp));
    };
    let accept = tokio::time::timeout_at(deadline, tls.accept(tcp));
    let outcome = tokio::select! {
        _ = ctx.shutdown.cancelled() => return None,
        outcome = accept => outcome,
    };
    match outcome {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            debug!(%remote_addr, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(%remote_addr, timeout = ?ctx.settings.handshake_timeout, "TLS handshake timed out");
            None
        }
    }
}

/// Reads the request head, decides, and writes the 101; a refusal is
/// returned for the caller to write.
async fn handshake(stream: &mut ServerStream, ctx: &WsContext) -> Result<Accepted, HeadError> {
    let head = request_head::read(stream).await?;
    // In cluster mode a ticket is redeemed in the shared store (async), so
    // before the (synchronous) decision.
    let redeemed = match &ctx.cluster {
        Some(cluster) => cluster.tickets.redeem_in(head.request.uri().query()).await,
        None => None,
    };
    let (response, admission, permit) = decide(&head.request, ctx, redeemed)?;
    let mut out = Vec::with_capacity(256);
    write_response(&mut out, &response).map_err(|_| HeadError::Gone)?;
    stream.write_all(&out).await.map_err(|_| HeadError::Gone)?;
    Ok(Accepted {
        admission,
        permit,
        tail: head.tail,
    })
}

/// The upgrade's answer, who the client is, and its place under the
/// connection limits; or why not.
fn decide(
    request: &Request,
    ctx: &WsContext,
    redeemed: Option<Result<crate::auth::Identity, crate::auth::tickets::TicketError>>,
) -> Result<(Response, Admission, Permit), ApiError> {
    if ctx.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down",
        ));
    }
    let mut response = create_response(request).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("not a WebSocket upgrade: {e}"),
        )
    })?;
    let admission = ctx
        .policy()
        .admit_redeemed(request.uri(), request.headers(), redeemed)?;
    let permit = ctx
        .limits
        .acquire(&admission.user)
        .map_err(|detail| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail))?;
    if admission.bearer_protocol {
        response.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(BEARER_PROTOCOL),
        );
    }
    Ok((response, admission, permit))
}

/// Writes `refusal`, sends a FIN, then reads and discards what the client
/// still sends for at most [`LINGER`] (see there), and closes.
async fn refuse(mut stream: ServerStream, refusal: &ApiError) {
    let linger = async {
        stream.write_all(&refusal.to_http()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 2048];
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => discarded += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}
