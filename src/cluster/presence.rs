//! Presence: which instances hold a socket of which user, so the active
//! writer sends a committed message only to those instances. Rows live in
//! PostgreSQL (`cluster_presence`, unlogged), written when a user's first
//! socket opens on this instance (before its replay is read) and removed
//! [`LINGER`] after the last one closed (a reconnecting tab does not
//! churn the table). Each instance beats every [`HEARTBEAT`]; a row whose
//! instance has not beaten for [`EXPIRES_SECS`] is ignored, and an instance
//! silent for [`FORGET_SECS`] is deleted with its rows by any other.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, OnceCell};
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ClusterNames;
use crate::inbox::PgStore;
use crate::readiness::Readiness;

/// How often an instance writes its heartbeat (and sweeps lingering users).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// An instance whose heartbeat is older than this is taken as dead.
pub const EXPIRES_SECS: f64 = 10.0;
/// A dead instance's rows are deleted after this long.
pub const FORGET_SECS: f64 = 60.0;
/// How long after the database server started presence is taken as
/// possibly incomplete: three heartbeats, so every live instance has
/// written its rows again after a crash restart emptied them.
pub const REBUILD_SECS: f64 = 3.0 * 2.0;
/// How long a user's row stays after their last socket here closed.
pub const LINGER: Duration = Duration::from_secs(5);

/// This instance's presence, shared by its sessions.
pub struct Presence {
    store: Arc<PgStore>,
    /// Set once the rows a previous process with this instance id left are
    /// gone: before this instance's first row is written.
    cleaned: OnceCell<()>,
    /// Whether a heartbeat was written before: a missing row then means
    /// the cluster forgot this instance (not its first start).
    beaten: std::sync::atomic::AtomicBool,
    cluster: String,
    instance: String,
    users: Mutex<HashMap<String, Slot>>,
}

struct Slot {
    sockets: usize,
    /// Set once the row is written: every socket of the user waits for it
    /// before its replay is read.
    written: Arc<OnceCell<()>>,
    idle_since: Option<Instant>,
}

const BEAT: &str = "INSERT INTO cluster_instances (cluster, instance_id, heartbeat_at)
     VALUES ($1, $2, now())
     ON CONFLICT (cluster, instance_id) DO UPDATE SET heartbeat_at = now()
     RETURNING (xmax = 0)";

const WRITE: &str = "INSERT INTO cluster_presence (cluster, user_id, instance_id)
     SELECT $1, u, $2 FROM unnest($3::text[]) AS u
     ON CONFLICT DO NOTHING";

impl Presence {
    /// This instance's presence; it touches the database only when first
    /// used (a database unreachable at startup is waited for).
    pub fn new(store: Arc<PgStore>, names: &ClusterNames) -> Arc<Self> {
        Arc::new(Self {
            store,
            cleaned: OnceCell::new(),
            beaten: Default::default(),
            cluster: names.cluster.clone(),
            instance: names.instance.clone(),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// Removes what a previous process with the same instance id left (it
    /// held sockets this one does not), once, before any row of ours.
    async fn clean_previous_life(&self) -> anyhow::Result<()> {
        self.cleaned
            .get_or_try_init(|| async {
                let db = self.store.client().await?;
                db.execute(
                    "DELETE FROM cluster_presence WHERE cluster = $1 AND instance_id = $2",
                    &[&self.cluster, &self.instance],
                )
                .await?;
                anyhow::Ok(())
            })
            .await
            .map(|_| ())
    }

    /// A socket of `user` opened here; returns once the row is visible to
    /// the writer, so a message committed after the caller's replay read
    /// is sent here live.
    pub async fn join(&self, user: &str) -> anyhow::Result<()> {
        let written = {
            let mut users = self.users.lock().await;
            let slot = users.entry(user.to_string()).or_insert_with(|| Slot {
                sockets: 0,
                written: Arc::new(OnceCell::new()),
                idle_since: None,
            });
            slot.sockets += 1;
            slot.idle_since = None;
            slot.written.clone()
        };
        written
            .get_or_try_init(|| async { self.write(&[user]).await })
            .await
            .map(|_| ())
    }

    /// A socket of `user` closed here.
    pub async fn leave(&self, user: &str) {
        let mut users = self.users.lock().await;
        if let Some(slot) = users.get_mut(user) {
            slot.sockets = slot.sockets.saturating_sub(1);
            if slot.sockets == 0 {
                slot.idle_since = Some(Instant::now());
            }
        }
    }

    async fn write(&self, users: &[&str]) -> anyhow::Result<()> {
        self.clean_previous_life().await?;
        let db = self.store.client().await?;
        let stmt = db.prepare_cached(WRITE).await?;
        db.execute(&stmt, &[&self.cluster, &self.instance, &users])
            .await?;
        Ok(())
    }

    /// `(user, instance)` for every live instance holding one of `users`;
    /// `None` while presence may be incomplete: for [`REBUILD_SECS`] after
    /// the database server started (a crash restart empties the unlogged
    /// tables, and each instance writes its rows again at its next
    /// heartbeat), so that callers send to every instance meanwhile.
    pub async fn holders(&self, users: &[&str]) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let db = self.store.client().await?;
        let holders = db
            .prepare_cached(
                // Probed user by user (the LATERAL subquery, kept apart
                // by OFFSET 0, runs once per user on the primary key):
                // written as `user_id = ANY($2)`, the plan cached while the
                // table was small scanned an instance's every row instead.
                "SELECT u.user_id, h.instance_id FROM unnest($2::text[]) AS u (user_id)
                 CROSS JOIN LATERAL (
                     SELECT p.instance_id FROM cluster_presence p
                     JOIN cluster_instances i USING (cluster, instance_id)
                     WHERE p.cluster = $1 AND p.user_id = u.user_id
                       AND i.heartbeat_at > now() - make_interval(secs => $3)
                     OFFSET 0
                 ) h",
            )
            .await?;
        let fresh = db
            .prepare_cached("SELECT now() - pg_postmaster_start_time() < make_interval(secs => $1)")
            .await?;
        let holders_params: [&(dyn ToSql + Sync); 3] = [&self.cluster, &users, &EXPIRES_SECS];
        let fresh_params: [&(dyn ToSql + Sync); 1] = [&REBUILD_SECS];
        // Pipelined: one round trip for both.
        let (rows, fresh) = futures_util::try_join!(
            db.query(&holders, &holders_params),
            db.query_one(&fresh, &fresh_params)
        )?;
        if fresh.get::<_, bool>(0) {
            return Ok(None);
        }
        Ok(Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
    }

    /// The instances of this cluster that beat recently (this one too).
    pub async fn live_instances(&self) -> anyhow::Result<Vec<String>> {
        let db = self.store.client().await?;
        let rows = db
            .query(
                "SELECT instance_id FROM cluster_instances
                 WHERE cluster = $1 AND heartbeat_at > now() - make_interval(secs => $2)",
                &[&self.cluster, &EXPIRES_SECS],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Beats, forgets dead instances, removes users idle past [`LINGER`];
    /// if this instance's row had been forgotten (the database was away
    /// longer than [`FORGET_SECS`]), writes all its users again.
    async fn tick(&self) -> anyhow::Result<()> {
        self.clean_previous_life().await?;
        let db = self.store.client().await?;
        let inserted: bool = db
            .query_one(BEAT, &[&self.cluster, &self.instance])
            .await?
            .get(0);
        let beaten_before = self.beaten.swap(true, std::sync::atomic::Ordering::Relaxed);
        let forgotten = inserted && beaten_before;
        db.execute(
            "WITH dead AS (
                 DELETE FROM cluster_instances
                 WHERE cluster = $1 AND heartbeat_at < now() - make_interval(secs => $2)
                 RETURNING instance_id
             )
             DELETE FROM cluster_presence p USING dead
             WHERE p.cluster = $1 AND p.instance_id = dead.instance_id",
            &[&self.cluster, &FORGET_SECS],
        )
        .await?;
        let mut users = self.users.lock().await;
        let idle: Vec<String> = users
            .iter()
            .filter(|(_, s)| s.idle_since.is_some_and(|at| at.elapsed() >= LINGER))
            .map(|(u, _)| u.clone())
            .collect();
        if !idle.is_empty() {
            // Under the lock: a join of one of them waits, then writes its
            // row again after this delete.
            db.execute(
                "DELETE FROM cluster_presence
                 WHERE cluster = $1 AND instance_id = $2 AND user_id = ANY($3)",
                &[&self.cluster, &self.instance, &idle],
            )
            .await?;
            for user in &idle {
                users.remove(user);
            }
        }
        if forgotten {
            let all: Vec<&str> = users.keys().map(String::as_str).collect();
            warn!(
                users = all.len(),
                "this instance had been forgotten by the cluster; writing its presence again"
            );
            self.write(&all).await?;
        }
        Ok(())
    }

    /// Heartbeats until shutdown; the store slot of `/readyz` follows the
    /// database. At shutdown the instance withdraws its rows.
    pub async fn run(self: Arc<Self>, readiness: Arc<Readiness>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            match self.tick().await {
                Ok(()) if failing => {
                    failing = false;
                    readiness.set_store_ok();
                    info!("cluster heartbeat written again");
                }
                Ok(()) => {}
                Err(e) => {
                    failing = true;
                    warn!(error = %e, "cannot write the cluster heartbeat");
                    readiness.set_store_failing(format!("database unreachable: {e}"));
                }
            }
        }
        if let Err(e) = self.withdraw().await {
            warn!(error = %e, "cannot withdraw this instance from the cluster");
        }
    }

    async fn withdraw(&self) -> anyhow::Result<()> {
        let db = self.store.client().await?;
        db.execute(
            "WITH gone AS (
                 DELETE FROM cluster_instances WHERE cluster = $1 AND instance_id = $2
             )
             DELETE FROM cluster_presence WHERE cluster = $1 AND instance_id = $2",
            &[&self.cluster, &self.instance],
        )
        .await?;
        Ok(())
    }
}
