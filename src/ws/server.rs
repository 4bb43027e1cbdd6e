//! The accept loop: TCP accept, the upgrade handshake under a timeout, the
//! connection limits, then one session task per admitted client.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{
    handshake::server::{ErrorResponse, Request, Response},
    http::{HeaderValue, StatusCode},
    protocol::WebSocketConfig as TungsteniteConfig,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use crate::{
    auth::Authenticator,
    config::WebSocketConfig,
    inbox::Inbox,
    metrics::Metrics,
    router::Router,
    ws::{
        handshake::{Admission, HandshakePolicy, Refusal, BEARER_PROTOCOL},
        limits::{ConnectionLimits, Permit},
        session,
    },
};

/// Per-connection read buffer. tungstenite's default (128 KiB) would cost
/// 1.8 GiB at 15,000 idle sockets; client frames are small (pings,
/// subscribes), so 512 bytes is enough and the buffer still grows for a
/// larger frame up to `websocket.max_message_bytes` (measured: 4 KiB → 512 B
/// took idle RSS from 12.4 to 8.9 KiB per socket).
pub const READ_BUFFER_BYTES: usize = 512;

/// Frames are gathered up to this size before a write: with 0, tungstenite
/// writes every frame the moment it is fed and the session's "feed many,
/// flush once" batching never happens (measured: one `sendto` per frame,
/// 72 % of the bridge's CPU in broadcasts; with 2 KiB, broadcast to 10,000
/// sockets went from ~230k to ~840k frames/s). Idle sockets keep no buffer.
pub const WRITE_BUFFER_BYTES: usize = 2 * 1024;

/// Everything the WebSocket side shares across connections.
pub struct WsContext {
    pub settings: WebSocketConfig,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<ConnectionLimits>,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    pub next_connection_id: AtomicU64,
    pub shutdown: CancellationToken,
    /// Session tasks, so that shutdown can wait for their close frames.
    pub sessions: TaskTracker,
    /// The inbox, when `inbox.enabled`.
    pub inbox: Option<Inbox>,
}

impl WsContext {
    /// The tungstenite settings for every connection.
    pub fn tungstenite_config(&self) -> TungsteniteConfig {
        TungsteniteConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            // Batched writes; the bound keeps a stuck peer from growing the
            // buffer without limit.
            .write_buffer_size(WRITE_BUFFER_BYTES)
            .max_write_buffer_size(self.settings.send_queue.max(64) * 64 * 1024)
            .max_message_size(Some(self.settings.max_message_bytes))
            .max_frame_size(Some(self.settings.max_message_bytes))
    }

    pub fn policy(&self) -> HandshakePolicy<'_> {
        HandshakePolicy {
            settings: &self.settings,
            auth: &self.auth,
        }
    }
}

/// Accepts connections until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<WsContext>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote_addr)) => {
                let ctx2 = ctx.clone();
                ctx.sessions.spawn(async move {
                    handle_connection(stream, remote_addr, ctx2).await;
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

// The callback's signature is tungstenite's; its error is a whole response.
#[allow(clippy::result_large_err)]
async fn handle_connection(stream: TcpStream, remote_addr: SocketAddr, ctx: Arc<WsContext>) {
    let _ = stream.set_nodelay(true);
    let mut admitted: Option<(Admission, Permit)> = None;
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if ctx.shutdown.is_cancelled() {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the server is shutting down",
            )
            .into_response());
        }
        let admission = ctx
            .policy()
            .admit(request.uri(), request.headers())
            .map_err(|refusal| {
                debug!(%remote_addr, status = refusal.status.as_u16(), detail = %refusal.detail, "handshake refused");
                refusal.into_response()
            })?;
        let permit = ctx.limits.acquire(&admission.user).map_err(|detail| {
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail).into_response()
        })?;
        if admission.bearer_protocol {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(BEARER_PROTOCOL),
            );
        }
        admitted = Some((admission, permit));
        Ok(response)
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        callback,
        Some(ctx.tungstenite_config()),
    );
    let ws = match tokio::time::timeout(ctx.settings.handshake_timeout, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!(%remote_addr, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!(%remote_addr, "handshake timed out");
            return;
        }
    };
    let Some((admission, permit)) = admitted else {
        return;
    };
    session::run(ws, admission, permit, remote_addr, ctx).await;
}
