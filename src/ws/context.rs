//! What the WebSocket side shares across connections, and the settings
//! every connection's tungstenite stream gets. Its own file so that the
//! accept loop (`server`) and the sessions (`session`) both depend on it
//! and not on each other.

use std::sync::{atomic::AtomicU64, Arc};

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig as TungsteniteConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::Authenticator,
    config::WebSocketConfig,
    inbox::Inbox,
    metrics::Metrics,
    router::Router,
    tls::ListenerTls,
    ws::{handshake::HandshakePolicy, limits::ConnectionLimits},
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
/// sockets went from ~230k to ~1M frames/s, 1,056,347 on a quiet machine:
/// docs/performance.md). Idle sockets keep no buffer.
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
    /// Cluster mode: presence, channel bindings, counts across instances.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The listener speaks wss when set (`websocket.tls_cert_file`).
    pub tls: Option<Arc<ListenerTls>>,
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
        HandshakePolicy::new(&self.settings, &self.auth)
    }
}
