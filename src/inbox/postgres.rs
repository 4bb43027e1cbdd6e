//! The PostgreSQL store (`inbox.store = "postgres"`): one database that
//! several instances share, written and read through a pool of async
//! connections (tokio-postgres with deadpool-postgres).
//!
//! Seqs stay dense and unique under concurrent writers because a batch
//! first locks the `inbox_users` row of every user it writes for, in
//! sorted order (an upsert, so a new user's row is created and locked the
//! same way): a second writer for one of those users waits for the commit
//! and then reads the `next_seq` the first one left, and sorted order means
//! two batches never wait on each other in a circle. Read-state changes and
//! ttl expiry lock the same rows first, in the same order.

use std::collections::HashMap;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use tokio_postgres::{error::SqlState, types::ToSql, NoTls};

use super::{
    postgres_schema,
    store::{Change, Changed, Counts, NewMessage, ReadEntry},
};

/// Connections in the pool: the commit path and a few concurrent reads.
const POOL_SIZE: usize = 8;
/// How long a connection may take to open, and a caller to wait for one.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the commit stage lets a small batch gather before committing
/// it here (`stage::gather`): up to 2 ms more for a message that arrives
/// alone, a third less server CPU per notification at 2,000 msg/s.
pub const GATHER_WINDOW: std::time::Duration = std::time::Duration::from_millis(1);
/// Tries of a transaction PostgreSQL aborted for a deadlock or a
/// serialization failure (both are safe to run again).
const TRIES: usize = 3;

/// Runs `$work` (using the transaction `$tx`) and commits, again (up to
/// [`TRIES`] times in all) when PostgreSQL aborted it for a deadlock or a
/// serialization failure: every write but the append (one call, retried
/// the same way in [`PgStore::append`]) goes through here. A macro, because
/// a closure returning a future that borrows the transaction is not `Send`
/// in today's Rust.
macro_rules! transact {
    ($store:expr, $tx:ident => $work:expr) => {{
        let mut tries = 0;
        loop {
            let mut client = $store.client().await?;
            let $tx = client.transaction().await?;
            let result = match $work.await {
                Ok(value) => $tx.commit().await.map(|()| value),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if retryable(&e) && tries + 1 < TRIES => {
                    tries += 1;
                    tracing::warn!(
                        tries,
                        "inbox write hit a deadlock or conflict; trying again"
                    );
                }
                other => break Ok(other?),
            }
        }
    }};
}

/// The PostgreSQL store; cheap to share (`Arc`), every call takes a pooled
/// connection.
pub struct PgStore {
    pool: Pool,
    /// Set once the migrations ran: a database unreachable at startup is
    /// migrated by the first call that reaches it.
    migrated: tokio::sync::OnceCell<usize>,
}

impl PgStore {
    /// Connects to `url` and runs the migrations. Any failure (unreachable,
    /// refused, a newer schema) is an error.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let store = Self::open(url)?;
        drop(store.client().await?);
        Ok(store)
    }

    /// The store on a pool that connects when first used: an unreachable
    /// database is not an error here (the bridge starts, `/readyz` is 503,
    /// and the first call that reaches the database migrates it). Only a
    /// connection string the pool cannot use is.
    pub fn open(url: &str) -> anyhow::Result<Self> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .build()?;
        Ok(Self {
            pool,
            migrated: tokio::sync::OnceCell::new(),
        })
    }

    /// A pooled connection to a migrated database; every use of the
    /// database (the cluster's tables too) goes through here.
    pub async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        let mut client = self.pool.get().await?;
        self.migrated
            .get_or_try_init(|| postgres_schema::migrate(&mut client))
            .await?;
        Ok(client)
    }

    /// Whether the migrations have run (the database was reached): how
    /// many ran is kept for the log.
    pub fn is_migrated(&self) -> bool {
        self.migrated.initialized()
    }

    /// The seqs the users' inboxes already hold for these `(user, id)`
    /// pairs: a redelivered message is sent live again with them (in
    /// cluster mode, where the instance that committed it may have died
    /// before sending it).
    pub async fn seqs_of(
        &self,
        pairs: &[(&str, &str)],
    ) -> anyhow::Result<HashMap<(String, String), u64>> {
        let (users, ids): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
        let db = self.client().await?;
        let rows = db
            .query(
                "SELECT b.user_id, b.id, e.seq FROM unnest($1::text[], $2::text[]) AS b (user_id, id)
                 CROSS JOIN LATERAL (
                     SELECT seq FROM inbox_entries e
                     WHERE e.user_id = b.user_id AND e.id = b.id LIMIT 1
                 ) e",
                &[&users, &ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as u64))
            .collect())
    }

    /// Stores a batch atomically (see [`super::InboxStore::append`]).
    pub async fn append(
        &self,
        batch: &[NewMessage],
        now_ms: i64,
        max_per_user: usize,
    ) -> anyhow::Result<Vec<Vec<Option<u64>>>> {
        let mut tries = 0;
        loop {
            let db = self.client().await?;
            match append_once(&db, batch, now_ms, max_per_user).await {
                Err(e) if retryable(&e) && tries + 1 < TRIES => {
                    tries += 1;
                    tracing::warn!(
                        tries,
                        "inbox append hit a deadlock or conflict; trying again"
                    );
                }
                other => return Ok(other?),
            }
        }
    }

    /// Applies a read-state change; `true` when anything changed.
    pub async fn change(&self, user: &str, change: &Change) -> anyhow::Result<(bool, Counts)> {
        self.change_reporting(user, change, false)
            .await
            .map(|c| (c.changed, c.counts))
    }

    /// Applies a read-state change; with `report_reads`, also the entries
    /// it turned from unread to read (`RETURNING`), for `read` receipts.
    pub async fn change_reporting(
        &self,
        user: &str,
        change: &Change,
        report_reads: bool,
    ) -> anyhow::Result<Changed> {
        transact!(self, tx => change_in(&tx, user, change, report_reads))
    }

    /// Drops entries created before `cutoff_ms`; returns how many.
    pub async fn expire(&self, cutoff_ms: i64) -> anyhow::Result<usize> {
        transact!(self, tx => expire_in(&tx, cutoff_ms))
    }
}

/// Statements are prepared once per pooled connection and reused: one
/// round trip per statement instead of two on the commit path.
async fn execute(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.execute(&stmt, params).await
}

async fn query_one(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.query_one(&stmt, params).await
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::T_R_DEADLOCK_DETECTED) | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
    )
}

/// The whole append, in the database (schema version 3): one round trip
/// and one implicit transaction per batch. As four statements inside
/// BEGIN and COMMIT it took four round trips, each a wake-up of the
/// server and of this process, the commit's largest cost when the two
/// cores are busy (docs/performance.md).
const APPEND: &str = "SELECT inbox_append($1, $2, $3, $4, $5, $6, $7)";

/// Stores a batch through [`APPEND`]; each message's users get their new
/// seq, or `None` where they already held that id.
async fn append_once(
    db: &deadpool_postgres::Object,
    batch: &[NewMessage],
    now_ms: i64,
    max_per_user: usize,
) -> Result<Vec<Vec<Option<u64>>>, tokio_postgres::Error> {
    let ids: Vec<&str> = batch.iter().map(|m| m.id.as_str()).collect();
    let events: Vec<&str> = batch.iter().map(|m| m.event.as_str()).collect();
    let payloads: Vec<&str> = batch.iter().map(|m| m.payload.as_str()).collect();
    let (users, messages): (Vec<&str>, Vec<i32>) = batch
        .iter()
        .zip(1..)
        .flat_map(|(m, k)| m.users.iter().map(move |u| (u.as_str(), k)))
        .unzip();
    if users.is_empty() {
        return Ok(batch.iter().map(|_| Vec::new()).collect());
    }
    let max = i64::try_from(max_per_user).unwrap_or(i64::MAX);
    let params: [&(dyn ToSql + Sync); 7] =
        [&ids, &events, &payloads, &now_ms, &users, &messages, &max];
    let statement = db.prepare_cached(APPEND).await?;
    let seqs: Vec<Option<i64>> = db.query_one(&statement, &params).await?.get(0);
    let mut seqs = seqs.into_iter().map(|s| s.map(|s| s as u64));
    Ok(batch
        .iter()
        .map(|m| seqs.by_ref().take(m.users.len()).collect())
        .collect())
}

async fn change_in(
    tx: &Transaction<'_>,
    user: &str,
    change: &Change,
    report_reads: bool,
) -> Result<Changed, tokio_postgres::Error> {
    // The user's row first, as writers take it (no row: nothing to lock),
    // moving the counts' version on: changes of one user are serialized by
    // this lock, so versions order them as they committed.
    execute(
        tx,
        "UPDATE inbox_users SET counts_version = counts_version + 1 WHERE user_id = $1",
        &[&user],
    )
    .await?;
    let mut newly_read = Vec::new();
    let report = report_reads.then_some(&mut newly_read);
    let changed = match change {
        Change::MarkRead(ids) if ids.is_empty() => 0,
        Change::MarkRead(ids) => {
            mark_read(
                tx,
                "UPDATE inbox_entries SET read = true
                 WHERE user_id = $1 AND NOT read AND id = ANY($2)",
                &[&user, ids],
                report,
            )
            .await?
        }
        Change::MarkReadUpTo(seq) => {
            let seq = super::store::clamp_seq(*seq);
            mark_read(
                tx,
                "UPDATE inbox_entries SET read = true WHERE user_id = $1 AND NOT read AND seq <= $2",
                &[&user, &seq],
                report,
            )
            .await?
        }
        Change::MarkAllRead => {
            mark_read(
                tx,
                "UPDATE inbox_entries SET read = true WHERE user_id = $1 AND NOT read",
                &[&user],
                report,
            )
            .await?
        }
        Change::Remove(ids) if ids.is_empty() => 0,
        Change::Remove(ids) => {
            execute(
                tx,
                "DELETE FROM inbox_entries WHERE user_id = $1 AND id = ANY($2)",
                &[&user, ids],
            )
            .await?
        }
        Change::RemoveAll => {
            execute(tx, "DELETE FROM inbox_entries WHERE user_id = $1", &[&user]).await?
        }
    };
    let counts = super::postgres_read::counts(tx, user).await?;
    Ok(Changed {
        changed: changed > 0,
        counts,
        newly_read,
    })
}

/// Runs a marking `UPDATE`; with `report`, through `RETURNING id, seq`, so
/// the entries that flipped from unread to read are known. Returns how
/// many rows changed.
async fn mark_read(
    tx: &Transaction<'_>,
    update: &str,
    params: &[&(dyn ToSql + Sync)],
    report: Option<&mut Vec<ReadEntry>>,
) -> Result<u64, tokio_postgres::Error> {
    let Some(out) = report else {
        return execute(tx, update, params).await;
    };
    let stmt = tx
        .prepare_cached(&format!("{update} RETURNING id, seq"))
        .await?;
    for row in tx.query(&stmt, params).await? {
        out.push(ReadEntry {
            id: row.get(0),
            seq: row.get::<_, i64>(1) as u64,
        });
    }
    Ok(out.len() as u64)
}

async fn expire_in(tx: &Transaction<'_>, cutoff_ms: i64) -> Result<usize, tokio_postgres::Error> {
    // The users' rows first, in order, as writers take them.
    execute(
        tx,
        "SELECT 1 FROM inbox_users WHERE user_id IN
             (SELECT DISTINCT user_id FROM inbox_entries WHERE created_at < $1)
         ORDER BY user_id FOR UPDATE",
        &[&cutoff_ms],
    )
    .await?;
    let row = query_one(
        tx,
        "WITH gone AS (
                 DELETE FROM inbox_entries WHERE created_at < $1 RETURNING user_id, seq
             ), top AS (
                 SELECT user_id, MAX(seq) AS seq FROM gone GROUP BY user_id
             ), marked AS (
                 UPDATE inbox_users u SET dropped_through = GREATEST(u.dropped_through, top.seq)
                 FROM top WHERE u.user_id = top.user_id RETURNING 1
             )
             SELECT (SELECT COUNT(*) FROM gone), (SELECT COUNT(*) FROM marked)",
        &[&cutoff_ms],
    )
    .await?;
    Ok(row.get::<_, i64>(0) as usize)
}
