//! The floor (`--floor`): the least a bridge built on lapin and
//! tungstenite can pay per notification on this machine. The bare
//! consumer of `baseline.rs`, and for each delivery the bridge's own
//! decoder (`message::decode`) and one WebSocket frame, the bridge's
//! `notification` frame, written to a loopback socket that a bench reader
//! reads (as the bridge's sessions write theirs, and the latency is taken
//! at the same place). All of it in the consumer's task: no router, no
//! session task, no hand-off between them. With `--inbox`, each burst of
//! deliveries is first committed to a SQLite inbox by the bridge's own store
//! code (`synchronous = FULL`), as the bridge's commit stage does before it
//! routes.
//!
//! What the bridge pays above this figure is its design (the hops between
//! its tasks); what a target asks below it is asked of the kernel's
//! loopback, lapin or SQLite (issue 13).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{anyhow, Context};
use futures_util::SinkExt;
use lapin::message::Delivery;
use notify_bridge::{
    inbox::{InboxStore, NewMessage, SqliteStore},
    message::{self, DecodeLimits, Notification, Target},
    ws::context::WRITE_BUFFER_BYTES,
};
use tokio::{net::TcpListener, runtime::Runtime};
use tokio_tungstenite::{
    tungstenite::{protocol::WebSocketConfig, Message},
    WebSocketStream,
};

use crate::clients::{Reader, Recorders};

/// Loopback sockets the floor writes to, in turn: enough that consecutive
/// frames go to different sockets (as unicast frames go to different
/// users), few enough for the bench's file budget.
pub const SOCKETS: usize = 1000;

/// The most deliveries committed together, as the bridge's stage.
pub const BURST: usize = 256;

/// Per-user retention passed to the store, the bridge's default.
const MAX_PER_USER: usize = 1000;

/// What the floor's consumer does with its deliveries besides acking them.
pub struct FloorWork {
    sockets: Vec<WebSocketStream<tokio::net::TcpStream>>,
    next: usize,
    limits: DecodeLimits,
    store: Option<SqliteStore>,
}

/// The floor's part that lives outside its consumer: the readers of its
/// sockets (on the bench's runtime, like the bridge's clients) and its
/// store's folder.
pub struct FloorSide {
    readers: Vec<Reader>,
    store_dir: Option<PathBuf>,
}

impl FloorSide {
    /// Stops the readers and deletes the store.
    pub fn finish(self) {
        Reader::abort_all(self.readers);
        if let Some(dir) = self.store_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl FloorWork {
    /// Opens the sockets (their server ends on `runtime`, the consumer's, so
    /// their writes are charged to it), starts a reader on each client end
    /// and, with `store_dir`, a fresh SQLite inbox there.
    pub async fn open(
        runtime: &Runtime,
        store_dir: Option<PathBuf>,
        recorders: &Arc<Recorders>,
    ) -> anyhow::Result<(Self, FloorSide)> {
        let listener = runtime
            .spawn(TcpListener::bind("127.0.0.1:0"))
            .await?
            .context("cannot listen for the floor's sockets")?;
        let addr = listener.local_addr()?;
        let accepted = runtime.spawn(accept_all(listener, SOCKETS));
        let mut readers = Vec::with_capacity(SOCKETS);
        for _ in 0..SOCKETS {
            readers.push(Reader::spawn(connect(addr).await?, recorders.clone()));
        }
        let sockets = accepted.await??;
        let store = match &store_dir {
            Some(dir) => {
                let _ = std::fs::remove_dir_all(dir);
                Some(SqliteStore::open(&dir.join("floor.db"))?)
            }
            None => None,
        };
        let limits = DecodeLimits::default();
        let work = Self {
            sockets,
            next: 0,
            limits,
            store,
        };
        Ok((work, FloorSide { readers, store_dir }))
    }

    /// Whether deliveries should be gathered into bursts first (the store
    /// commits a burst at a time, as the bridge's stage).
    pub fn takes_bursts(&self) -> bool {
        self.store.is_some()
    }

    /// Decodes the burst, commits its entries (with a store), then writes
    /// each notification's frame to the next socket.
    pub async fn deliver(&mut self, burst: &[Delivery]) -> anyhow::Result<()> {
        let notifications: Vec<Notification> = burst
            .iter()
            .filter_map(|d| {
                let id = d.properties.message_id().as_ref().map(|id| id.as_str());
                message::decode(&d.data, id, &self.limits).ok()
            })
            .collect();
        if let Some(store) = &mut self.store {
            let entries: Vec<NewMessage> = notifications.iter().filter_map(stored).collect();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            store.append(&entries, now_ms, MAX_PER_USER)?;
        }
        for n in notifications {
            let socket = &mut self.sockets[self.next];
            self.next = (self.next + 1) % SOCKETS;
            socket
                .send(Message::Text(n.frame))
                .await
                .map_err(|e| anyhow!("the floor's write failed: {e}"))?;
        }
        Ok(())
    }
}

/// The entry a unicast notification stores (the bench sends only those).
fn stored(n: &Notification) -> Option<NewMessage> {
    let Target::User(user) = &n.target else {
        return None;
    };
    Some(NewMessage {
        id: n.id.clone(),
        event: n.event.clone(),
        payload: n.payload.get().to_string(),
        users: vec![user.to_string()],
    })
}

/// The server ends, with the bridge's write buffer.
async fn accept_all(
    listener: TcpListener,
    n: usize,
) -> anyhow::Result<Vec<WebSocketStream<tokio::net::TcpStream>>> {
    let config = WebSocketConfig::default().write_buffer_size(WRITE_BUFFER_BYTES);
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        sockets.push(tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await?);
    }
    Ok(sockets)
}

/// A client end, configured as the bench's clients of the bridge.
async fn connect(addr: SocketAddr) -> anyhow::Result<crate::clients::Ws> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(8192)
        .write_buffer_size(0);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}/"), tcp, Some(config))
            .await
            .map_err(|e| anyhow!("the floor's handshake failed: {e}"))?;
    Ok(ws)
}
