//! The per-user inbox: what is addressed to a user is kept (with a per-user
//! `seq` and read state) so that nothing is lost while they are offline and
//! tabs stay in step.
//!
//! - [`store`]: the storage interface (writes and reads).
//! - [`sqlite`], [`sqlite_read`], [`schema`]: its SQLite implementation,
//!   writer, readers and versioned schema.
//! - [`postgres`], [`postgres_read`], [`postgres_schema`]: the PostgreSQL
//!   store (`inbox.store = "postgres"`), async on a connection pool, shared
//!   by several instances.
//! - [`readers`]: the pool of readers used beside the store thread.
//! - [`stage`]: the ordered commit step between the consumer and the router:
//!   a delivery is acked only after its entries are committed, and frames
//!   keep broker order.
//! - [`Inbox`]: the async handle; writes run on the store's own thread and
//!   reads on a few reader connections from `spawn_blocking`, so the runtime
//!   never blocks on disk and a replay never delays a commit.

pub mod postgres;
pub mod postgres_read;
pub mod postgres_schema;
pub mod readers;
pub mod schema;
pub mod sqlite;
pub mod sqlite_read;
pub mod store;

use std::{
    sync::{mpsc as std_mpsc, Arc},
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::{error, info};

use crate::config::{ConfigError, InboxConfig, InboxStoreKind};
pub use postgres::PgStore;
use readers::Readers;
pub use sqlite::SqliteStore;
pub use store::{
    Change, Changed, Counts, Entry, InboxReader, InboxStore, ListQuery, NewMessage, PageBound,
    ReadEntry, Replay,
};

/// How often entries older than `inbox.ttl` are dropped.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

enum Command {
    Append(Arc<Vec<NewMessage>>, Reply<Vec<Vec<Option<u64>>>>),
    Change(String, Change, bool, Reply<Changed>),
}

/// Where a change's newly read entries go (the `read` receipts): told the
/// user and the entries, after the commit; it must not block.
pub type ReadSink = Arc<dyn Fn(&str, Vec<ReadEntry>) + Send + Sync>;

/// A cloneable handle to the configured store: callers (the stage, the
/// sessions, the HTTP routes) use its async methods whichever store it is.
#[derive(Clone)]
pub struct Inbox {
    backend: Backend,
    /// Set when `read` receipts are sent: every change then reports the
    /// entries it turned read, whichever caller (a tab, the HTTP API) made it.
    reads: Option<ReadSink>,
}

/// An enum rather than a trait object: there are two stores, known here,
/// and each keeps its own natural shape (SQLite's blocking calls on its
/// thread and reader pool, PostgreSQL's async calls on a connection pool)
/// with no boxed future per call (docs/inbox.md).
#[derive(Clone)]
enum Backend {
    Thread {
        commands: std_mpsc::Sender<Command>,
        readers: Arc<Readers>,
    },
    Postgres {
        store: Arc<PgStore>,
        max_per_user: usize,
    },
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inbox")
    }
}

impl Inbox {
    /// Opens the configured store and starts it. A store that cannot be
    /// opened (or reached and migrated) is a configuration error naming
    /// `inbox.path` (or `inbox.postgres_url`).
    pub async fn open(config: &InboxConfig) -> Result<Self, ConfigError> {
        match config.store {
            InboxStoreKind::Sqlite => Self::open_sqlite(config),
            InboxStoreKind::Postgres => Self::open_postgres(config).await,
        }
    }

    fn open_sqlite(config: &InboxConfig) -> Result<Self, ConfigError> {
        let unusable = |e: anyhow::Error| {
            ConfigError::key(
                "inbox.path",
                format!(
                    "cannot use {} as the inbox store: {e:#}",
                    config.path.display()
                ),
            )
        };
        let store = SqliteStore::open(&config.path).map_err(unusable)?;
        let inbox = Self::start(store, config.max_per_user, config.ttl).map_err(unusable)?;
        info!(path = %config.path.display(), "inbox store open");
        Ok(inbox)
    }

    /// A connection string the pool cannot use is a configuration error;
    /// a database that does not answer yet is not (CONTRACT.md: retried
    /// like the broker, `/readyz` 503 meanwhile; see `lib::watch_database`).
    async fn open_postgres(config: &InboxConfig) -> Result<Self, ConfigError> {
        let url = config.postgres_url.as_deref().unwrap_or_default();
        let store = PgStore::open(url).map_err(|e| {
            ConfigError::key(
                "inbox.postgres_url",
                format!("cannot use the PostgreSQL inbox store: {e:#}"),
            )
        })?;
        match store.client().await {
            Ok(_) => info!("inbox store open (PostgreSQL)"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the PostgreSQL inbox store does not answer yet; retrying")
            }
        }
        Ok(Self::start_postgres(store, config.max_per_user, config.ttl))
    }

    /// The PostgreSQL store, which cluster mode shares for presence.
    pub fn postgres(&self) -> Option<Arc<PgStore>> {
        match &self.backend {
            Backend::Postgres { store, .. } => Some(store.clone()),
            Backend::Thread { .. } => None,
        }
    }

    /// How long the commit stage lets a small batch gather before it is
    /// committed: none for SQLite (a commit there costs an fsync, not
    /// another process's CPU), [`postgres::GATHER_WINDOW`] for PostgreSQL,
    /// whose per-transaction cost lands on a server every instance shares.
    pub fn gather_window(&self) -> Option<Duration> {
        match &self.backend {
            Backend::Thread { .. } => None,
            Backend::Postgres { .. } => Some(postgres::GATHER_WINDOW),
        }
    }

    /// Opens the readers and runs `store` on a dedicated thread.
    pub fn start(
        store: impl InboxStore,
        max_per_user: usize,
        ttl: Duration,
    ) -> anyhow::Result<Self> {
        let readers = Readers::open(&store)?;
        let (tx, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("inbox-store".into())
            .spawn(move || serve(store, rx, max_per_user, ttl))
            .expect("spawn the inbox store thread");
        Ok(Self {
            backend: Backend::Thread {
                commands: tx,
                readers,
            },
            reads: None,
        })
    }

    /// Uses a connected PostgreSQL store, and expires its entries past
    /// `ttl` every minute for as long as a handle to it is alive.
    pub fn start_postgres(store: PgStore, max_per_user: usize, ttl: Duration) -> Self {
        let store = Arc::new(store);
        tokio::spawn(expire_postgres(Arc::downgrade(&store), ttl));
        Self {
            backend: Backend::Postgres {
                store,
                max_per_user,
            },
            reads: None,
        }
    }

    async fn ask<T>(
        commands: &std_mpsc::Sender<Command>,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        commands
            .send(make(tx))
            .map_err(|_| anyhow::anyhow!("the inbox store has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the inbox store has stopped"))?
    }

    /// Commits a batch (on the store thread, or in one PostgreSQL
    /// transaction); per message, per user, the new seq or `None` for a
    /// redelivery.
    pub async fn append(
        &self,
        batch: Arc<Vec<NewMessage>>,
    ) -> anyhow::Result<Vec<Vec<Option<u64>>>> {
        match &self.backend {
            Backend::Thread { commands, .. } => {
                Self::ask(commands, |r| Command::Append(batch, r)).await
            }
            Backend::Postgres {
                store,
                max_per_user,
            } => store.append(&batch, now_ms(), *max_per_user).await,
        }
    }

    /// The start of a replay (counts, gap, `through`, first page), read
    /// beside the commits.
    pub async fn replay(&self, user: &str, since: Option<u64>) -> anyhow::Result<Replay> {
        match &self.backend {
            Backend::Thread { readers, .. } => {
                let user = user.to_string();
                readers
                    .read(move |r| r.replay(&user, since, PageBound::DEFAULT))
                    .await
            }
            Backend::Postgres { store, .. } => store.replay(user, since, PageBound::DEFAULT).await,
        }
    }

    /// The next page of a replay: `after < seq <= through`.
    pub async fn replay_page(
        &self,
        user: &str,
        after: u64,
        through: u64,
    ) -> anyhow::Result<Vec<Entry>> {
        match &self.backend {
            Backend::Thread { readers, .. } => {
                let user = user.to_string();
                readers
                    .read(move |r| r.replay_page(&user, after, through, PageBound::DEFAULT))
                    .await
            }
            Backend::Postgres { store, .. } => {
                store
                    .replay_page(user, after, through, PageBound::DEFAULT)
                    .await
            }
        }
    }

    /// Counts and the first page of a listing.
    pub async fn list(&self, user: &str, query: ListQuery) -> anyhow::Result<(Counts, Vec<Entry>)> {
        match &self.backend {
            Backend::Thread { readers, .. } => {
                let user = user.to_string();
                readers
                    .read(move |r| r.list(&user, query, PageBound::DEFAULT))
                    .await
            }
            Backend::Postgres { store, .. } => store.list(user, query, PageBound::DEFAULT).await,
        }
    }

    /// A later page of a listing (see [`InboxReader::list_page`]).
    pub async fn list_page(&self, user: &str, query: ListQuery) -> anyhow::Result<Vec<Entry>> {
        match &self.backend {
            Backend::Thread { readers, .. } => {
                let user = user.to_string();
                readers
                    .read(move |r| r.list_page(&user, query, PageBound::DEFAULT))
                    .await
            }
            Backend::Postgres { store, .. } => {
                store.list_page(user, query, PageBound::DEFAULT).await
            }
        }
    }

    /// Sends every change's newly read entries to `sink` from now on (set
    /// once at startup, before the handle is cloned).
    pub fn report_reads(&mut self, sink: ReadSink) {
        self.reads = Some(sink);
    }

    /// Applies a read-state change (on the store thread, or in one
    /// PostgreSQL transaction); the entries it turned read go to the
    /// [`ReadSink`], if one is set.
    pub async fn change(&self, user: &str, change: Change) -> anyhow::Result<(bool, Counts)> {
        let changed = self
            .change_reporting(user, change, self.reads.is_some())
            .await?;
        if let Some(sink) = self.reads.as_ref() {
            if !changed.newly_read.is_empty() {
                sink(user, changed.newly_read);
            }
        }
        Ok((changed.changed, changed.counts))
    }

    /// Applies a change and, with `report_reads`, says which entries it
    /// turned from unread to read (without telling the sink).
    pub async fn change_reporting(
        &self,
        user: &str,
        change: Change,
        report_reads: bool,
    ) -> anyhow::Result<Changed> {
        match &self.backend {
            Backend::Thread { commands, .. } => {
                Self::ask(commands, |r| {
                    Command::Change(user.to_string(), change, report_reads, r)
                })
                .await
            }
            Backend::Postgres { store, .. } => {
                store.change_reporting(user, &change, report_reads).await
            }
        }
    }
}

/// Drops PostgreSQL entries past `ttl` now and every [`EXPIRY_INTERVAL`],
/// until the store is dropped. Several instances may expire at once: each
/// locks the users' rows in order, so they take turns.
async fn expire_postgres(store: std::sync::Weak<PgStore>, ttl: Duration) {
    let mut tick = tokio::time::interval(EXPIRY_INTERVAL);
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        let cutoff = now_ms() - ttl.as_millis().min(i64::MAX as u128) as i64;
        match store.expire(cutoff).await {
            Ok(0) => {}
            Ok(n) => info!(dropped = n, "inbox entries past inbox.ttl dropped"),
            Err(e) => error!(error = %e, "inbox expiry failed"),
        }
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
            Ok(Command::Change(user, change, report_reads, reply)) => {
                let _ = reply.send(store.change_reporting(&user, &change, report_reads));
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                expire(&mut store);
                next_expiry = std::time::Instant::now() + EXPIRY_INTERVAL;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A store whose reads wait until the test lets them go.
    struct SlowReads {
        release: Arc<Mutex<std_mpsc::Receiver<()>>>,
    }

    struct SlowReader(Arc<Mutex<std_mpsc::Receiver<()>>>);

    impl InboxStore for SlowReads {
        fn append(
            &mut self,
            batch: &[NewMessage],
            _: i64,
            _: usize,
        ) -> anyhow::Result<Vec<Vec<Option<u64>>>> {
            Ok(batch.iter().map(|m| vec![Some(1); m.users.len()]).collect())
        }
        fn change_reporting(&mut self, _: &str, _: &Change, _: bool) -> anyhow::Result<Changed> {
            Ok(Changed::default())
        }
        fn expire(&mut self, _: i64) -> anyhow::Result<usize> {
            Ok(0)
        }
        fn reader(&self) -> anyhow::Result<Box<dyn InboxReader>> {
            Ok(Box::new(SlowReader(self.release.clone())))
        }
    }

    impl InboxReader for SlowReader {
        fn replay(&mut self, _: &str, _: Option<u64>, _: PageBound) -> anyhow::Result<Replay> {
            self.0.lock().unwrap().recv().ok();
            Ok(Replay {
                counts: Counts::default(),
                gap_oldest: None,
                through: 0,
                entries: Vec::new(),
            })
        }
        fn replay_page(
            &mut self,
            _: &str,
            _: u64,
            _: u64,
            _: PageBound,
        ) -> anyhow::Result<Vec<Entry>> {
            Ok(Vec::new())
        }
        fn list(
            &mut self,
            _: &str,
            _: ListQuery,
            _: PageBound,
        ) -> anyhow::Result<(Counts, Vec<Entry>)> {
            Ok((Counts::default(), Vec::new()))
        }
        fn list_page(&mut self, _: &str, _: ListQuery, _: PageBound) -> anyhow::Result<Vec<Entry>> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn a_commit_does_not_wait_behind_a_replay() {
        let (release, wait) = std_mpsc::channel();
        let inbox = Inbox::start(
            SlowReads {
                release: Arc::new(Mutex::new(wait)),
            },
            100,
            Duration::from_secs(3600),
        )
        .unwrap();
        let reader = inbox.clone();
        let replay = tokio::spawn(async move { reader.replay("slow", Some(0)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let message = NewMessage {
            users: vec!["other".into()],
            id: "1".into(),
            event: "notification".into(),
            payload: "1".into(),
        };
        let committed = tokio::time::timeout(
            Duration::from_secs(2),
            inbox.append(Arc::new(vec![message])),
        )
        .await;
        release.send(()).unwrap();
        assert!(committed.is_ok(), "the commit waited behind a replay");
        replay.await.unwrap().unwrap();
    }
}
