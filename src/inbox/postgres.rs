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

use std::collections::{HashMap, HashSet};

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
/// serialization failure: every write goes through here. A macro, because
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
        transact!(self, tx => append_in(&tx, batch, now_ms, max_per_user))
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

/// Locks the users' rows in sorted order (creating missing ones) and
/// reserves `k` seqs for each (`$2`, the user's distinct ids in the batch),
/// returning `next_seq` after the reservation: the batch's seqs are the
/// `k` before it. Reserving in the lock saves a second write of every row;
/// only when some pairs turn out to be stored already is a user's
/// `next_seq` moved back ([`NEXT_SEQ`]).
const LOCK_USERS: &str = "INSERT INTO inbox_users (user_id, next_seq)
     SELECT u, 1 + k FROM unnest($1::text[], $2::bigint[]) AS v (u, k) ORDER BY u
     ON CONFLICT (user_id) DO UPDATE SET next_seq = inbox_users.next_seq + EXCLUDED.next_seq - 1
     RETURNING user_id, next_seq, dropped_through";

/// The batch's (user, id) pairs already stored, probed pair by pair on
/// the `(user_id, id)` index: the LATERAL subquery with its LIMIT cannot be
/// turned into a join. As a join, the plan cached on a pooled connection
/// while the table was small (a new database, the first batches) stayed a
/// scan of every entry for the connection's life: 1.5 ms a batch after
/// 20,000 entries (`pg_stat_statements` in the cluster bench).
const HELD: &str = "SELECT b.user_id, b.id FROM unnest($1::text[], $2::text[]) AS b (user_id, id)
     CROSS JOIN LATERAL (
         SELECT 1 FROM inbox_entries e WHERE e.user_id = b.user_id AND e.id = b.id LIMIT 1
     ) e";

/// The batch's users, sorted and distinct, each with how many distinct ids
/// the batch has for them.
fn users_of(batch: &[NewMessage]) -> Vec<(&str, i64)> {
    let mut pairs: Vec<(&str, &str)> = batch
        .iter()
        .flat_map(|m| m.users.iter().map(move |u| (u.as_str(), m.id.as_str())))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut users: Vec<(&str, i64)> = Vec::new();
    for (user, _) in pairs {
        match users.last_mut() {
            Some((last, k)) if *last == user => *k += 1,
            _ => users.push((user, 1)),
        }
    }
    users
}

/// A user's seqs as the lock left them: `next` is the first one the batch
/// may use, `reserved_end` the `next_seq` the lock wrote, and
/// `dropped_through` the highest seq retention has dropped.
struct Reserved {
    next: i64,
    reserved_end: i64,
    dropped_through: i64,
}

impl Reserved {
    /// Whether retention may have something to drop: every entry the user
    /// can hold after this batch has a seq in `(dropped_through,
    /// reserved_end)` (removals and expiry only leave fewer), so with no
    /// more than `max` such seqs there is nothing past the limit.
    fn may_exceed(&self, max: i64) -> bool {
        self.reserved_end - 1 - self.dropped_through > max
    }
}

/// Locks the users' rows (reserving their seqs), then finds the batch's
/// (user, id) pairs already stored. The two statements are pipelined (sent
/// together, run by the server in that order, so the lookup sees what the
/// lock waited for).
async fn lock_and_find(
    tx: &Transaction<'_>,
    users: &[(&str, i64)],
    batch: &[NewMessage],
) -> Result<(HashMap<String, Reserved>, HashSet<(String, String)>), tokio_postgres::Error> {
    let (pair_users, ids): (Vec<&str>, Vec<&str>) = batch
        .iter()
        .flat_map(|m| m.users.iter().map(move |u| (u.as_str(), m.id.as_str())))
        .unzip();
    let (names, counts): (Vec<&str>, Vec<i64>) = users.iter().copied().unzip();
    let lock = tx.prepare_cached(LOCK_USERS).await?;
    let find = tx.prepare_cached(HELD).await?;
    let lock_params: [&(dyn ToSql + Sync); 2] = [&names, &counts];
    let find_params: [&(dyn ToSql + Sync); 2] = [&pair_users, &ids];
    let (locked, held) =
        futures_util::try_join!(tx.query(&lock, &lock_params), tx.query(&find, &find_params))?;
    let reserved_for: HashMap<&str, i64> = users.iter().copied().collect();
    let reserved = locked
        .iter()
        .map(|r| {
            let user: String = r.get(0);
            let reserved_end: i64 = r.get(1);
            let next = reserved_end - reserved_for[user.as_str()];
            let dropped_through = r.get(2);
            let seqs = Reserved {
                next,
                reserved_end,
                dropped_through,
            };
            (user, seqs)
        })
        .collect();
    Ok((
        reserved,
        held.iter().map(|r| (r.get(0), r.get(1))).collect(),
    ))
}

/// One entry to insert.
struct Row<'a> {
    user: &'a str,
    seq: i64,
    id: &'a str,
    payload: usize,
}

async fn append_in(
    tx: &Transaction<'_>,
    batch: &[NewMessage],
    now_ms: i64,
    max_per_user: usize,
) -> Result<Vec<Vec<Option<u64>>>, tokio_postgres::Error> {
    let users = users_of(batch);
    let (mut next, mut seen) = lock_and_find(tx, &users, batch).await?;
    let mut rows = Vec::new();
    let mut needed: Vec<&NewMessage> = Vec::new();
    let mut seqs = Vec::with_capacity(batch.len());
    for m in batch {
        let mut for_message = Vec::with_capacity(m.users.len());
        for user in &m.users {
            if !seen.insert((user.clone(), m.id.clone())) {
                for_message.push(None);
                continue;
            }
            // Written when the first user needs it, once per message.
            if needed.last().is_none_or(|last| !std::ptr::eq(*last, m)) {
                needed.push(m);
            }
            let seq = &mut next
                .get_mut(user.as_str())
                .expect("every user was locked")
                .next;
            rows.push(Row {
                user,
                seq: *seq,
                id: &m.id,
                payload: needed.len() - 1,
            });
            for_message.push(Some(*seq as u64));
            *seq += 1;
        }
        seqs.push(for_message);
    }
    write(tx, &needed, &rows, &next, now_ms, max_per_user).await?;
    Ok(seqs)
}

/// The payloads (ids drawn from their sequence in the same statement, each
/// entry joined to its payload by position) and the entries.
const INSERT: &str = "WITH p AS (
         SELECT nextval(pg_get_serial_sequence('inbox_payloads', 'pid')) AS pid, n.*
         FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS n (i, e, b, k)
     ), payloads AS (
         INSERT INTO inbox_payloads (pid, id, event, payload, created_at)
         SELECT pid, i, e, b, $4 FROM p
     )
     INSERT INTO inbox_entries (user_id, seq, id, created_at, payload_ref)
     SELECT r.u, r.s, r.i, $4, p.pid
     FROM unnest($5::text[], $6::bigint[], $7::text[], $8::bigint[]) AS r (u, s, i, k)
     JOIN p ON p.k = r.k";

/// Moves back the `next_seq` of users for whom fewer seqs were used than
/// the lock reserved (some of the batch's pairs were stored already).
const NEXT_SEQ: &str = "UPDATE inbox_users u SET next_seq = v.n
     FROM unnest($1::text[], $2::bigint[]) AS v (user_id, n) WHERE u.user_id = v.user_id";

/// Drops the touched users' oldest entries past `max_per_user`,
/// remembering the highest dropped seq for `gap`.
const TRIM: &str = "WITH cut AS (
         SELECT u.user_id, (SELECT seq FROM inbox_entries e WHERE e.user_id = u.user_id
                            ORDER BY seq DESC LIMIT 1 OFFSET $2) AS seq
         FROM unnest($1::text[]) AS u (user_id)
     ), gone AS (
         DELETE FROM inbox_entries e USING cut
         WHERE cut.seq IS NOT NULL AND e.user_id = cut.user_id AND e.seq <= cut.seq
     )
     UPDATE inbox_users u SET dropped_through = GREATEST(u.dropped_through, cut.seq)
     FROM cut WHERE cut.seq IS NOT NULL AND u.user_id = cut.user_id";

/// Inserts, moves back over-reserved `next_seq`s and applies retention:
/// the statements needed, pipelined, run by the server in that order
/// (retention sees the new entries).
async fn write(
    tx: &Transaction<'_>,
    needed: &[&NewMessage],
    rows: &[Row<'_>],
    reserved: &HashMap<String, Reserved>,
    now_ms: i64,
    max_per_user: usize,
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = needed.iter().map(|m| m.id.as_str()).collect();
    let events: Vec<&str> = needed.iter().map(|m| m.event.as_str()).collect();
    let payloads: Vec<&str> = needed.iter().map(|m| m.payload.as_str()).collect();
    let users: Vec<&str> = rows.iter().map(|r| r.user).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let entry_ids: Vec<&str> = rows.iter().map(|r| r.id).collect();
    let refs: Vec<i64> = rows.iter().map(|r| r.payload as i64 + 1).collect();
    let (names, nexts): (Vec<&str>, Vec<i64>) = reserved
        .iter()
        .filter(|(_, r)| r.next != r.reserved_end)
        .map(|(u, r)| (u.as_str(), r.next))
        .unzip();
    let max = max_per_user as i64;
    // Only the users who may be past the limit: for the others the trim
    // would read their newest entries to find nothing to drop (a fifth of
    // the batch's statement time in the cluster bench).
    let mut touched: Vec<&str> = rows
        .iter()
        .map(|r| r.user)
        .filter(|u| reserved[*u].may_exceed(max))
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let insert_params: [&(dyn ToSql + Sync); 8] = [
        &ids, &events, &payloads, &now_ms, &users, &seqs, &entry_ids, &refs,
    ];
    let next_params: [&(dyn ToSql + Sync); 2] = [&names, &nexts];
    let trim_params: [&(dyn ToSql + Sync); 2] = [&touched, &max];
    let mut statements = Vec::with_capacity(3);
    if !rows.is_empty() {
        statements.push((tx.prepare_cached(INSERT).await?, &insert_params[..]));
    }
    if !names.is_empty() {
        statements.push((tx.prepare_cached(NEXT_SEQ).await?, &next_params[..]));
    }
    if !touched.is_empty() {
        statements.push((tx.prepare_cached(TRIM).await?, &trim_params[..]));
    }
    futures_util::future::try_join_all(
        statements
            .iter()
            .map(|(statement, params)| tx.execute(statement, params)),
    )
    .await?;
    Ok(())
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
