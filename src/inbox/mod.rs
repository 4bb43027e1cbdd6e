//! The per-user inbox: what is addressed to a user is kept (with a per-user
//! `seq` and read state) so that nothing is lost while they are offline and
//! tabs stay in step.
//!
//! - [`store`]: the storage interface and its SQLite implementation.
//! - [`stage`]: the ordered commit step between the consumer and the router:
//!   a delivery is acked only after its entries are committed, and frames
//!   keep broker order.
//! - [`Inbox`]: the async handle; the store runs on its own thread, so the
//!   runtime never blocks on disk.

pub mod stage;
pub mod store;

use std::{
    sync::{mpsc as std_mpsc, Arc},
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::{error, info};

use crate::config::{ConfigError, InboxConfig};
pub use store::{Change, Counts, Entry, InboxStore, ListQuery, NewEntry, Replay, SqliteStore};

/// How often entries older than `inbox.ttl` are dropped.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

enum Command {
    Append(Arc<Vec<NewEntry>>, Reply<Vec<Option<u64>>>),
    Replay(String, Option<u64>, Reply<Replay>),
    List(String, ListQuery, Reply<(Counts, Vec<Entry>)>),
    Change(String, Change, Reply<(bool, Counts)>),
}

/// A cloneable handle to the store thread.
#[derive(Clone)]
pub struct Inbox {
    commands: std_mpsc::Sender<Command>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inbox")
    }
}

impl Inbox {
    /// Opens the configured store and starts its thread. A store that
    /// cannot be opened is a configuration error naming `inbox.path`.
    pub fn open(config: &InboxConfig) -> Result<Self, ConfigError> {
        let store = SqliteStore::open(&config.path).map_err(|e| {
            ConfigError::key(
                "inbox.path",
                format!(
                    "cannot use {} as the inbox store: {e:#}",
                    config.path.display()
                ),
            )
        })?;
        info!(path = %config.path.display(), "inbox store open");
        Ok(Self::start(store, config.max_per_user, config.ttl))
    }

    /// Runs `store` on a dedicated thread.
    pub fn start(store: impl InboxStore, max_per_user: usize, ttl: Duration) -> Self {
        let (tx, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("inbox-store".into())
            .spawn(move || serve(store, rx, max_per_user, ttl))
            .expect("spawn the inbox store thread");
        Self { commands: tx }
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| anyhow::anyhow!("the inbox store has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the inbox store has stopped"))?
    }

    pub async fn append(&self, batch: Arc<Vec<NewEntry>>) -> anyhow::Result<Vec<Option<u64>>> {
        self.ask(|r| Command::Append(batch, r)).await
    }

    pub async fn replay(&self, user: &str, since: Option<u64>) -> anyhow::Result<Replay> {
        self.ask(|r| Command::Replay(user.to_string(), since, r))
            .await
    }

    pub async fn list(&self, user: &str, query: ListQuery) -> anyhow::Result<(Counts, Vec<Entry>)> {
        self.ask(|r| Command::List(user.to_string(), query, r))
            .await
    }

    pub async fn change(&self, user: &str, change: Change) -> anyhow::Result<(bool, Counts)> {
        self.ask(|r| Command::Change(user.to_string(), change, r))
            .await
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn serve(
    mut store: impl InboxStore,
    commands: std_mpsc::Receiver<Command>,
    max_per_user: usize,
    ttl: Duration,
) {
    let expire = |store: &mut dyn InboxStore| {
        let cutoff = now_ms() - ttl.as_millis().min(i64::MAX as u128) as i64;
        match store.expire(cutoff) {
            Ok(0) => {}
            Ok(n) => info!(dropped = n, "inbox entries past inbox.ttl dropped"),
            Err(e) => error!(error = %e, "inbox expiry failed"),
        }
    };
    expire(&mut store);
    let mut next_expiry = std::time::Instant::now() + EXPIRY_INTERVAL;
    loop {
        let wait = next_expiry.saturating_duration_since(std::time::Instant::now());
        match commands.recv_timeout(wait) {
            Ok(Command::Append(batch, reply)) => {
                let _ = reply.send(store.append(&batch, now_ms(), max_per_user));
            }
            Ok(Command::Replay(user, since, reply)) => {
                let _ = reply.send(store.replay(&user, since));
            }
            Ok(Command::List(user, query, reply)) => {
                let _ = reply.send(store.list(&user, query));
            }
            Ok(Command::Change(user, change, reply)) => {
                let _ = reply.send(store.change(&user, &change));
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                expire(&mut store);
                next_expiry = std::time::Instant::now() + EXPIRY_INTERVAL;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
}
