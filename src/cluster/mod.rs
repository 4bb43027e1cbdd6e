//! Cluster mode (`cluster.enabled`): several instances share one broker and
//! one PostgreSQL inbox (docs/cluster.md has the picture and the failure
//! table).
//!
//! One message, in cluster mode:
//!
//! ```text
//! <name>.ingest (quorum, single active consumer) ─▶ amqp::consumer ─▶ stage (commit)
//!   ─▶ fanout: presence lookup after the commit, one live message per holding instance
//!   ─▶ <name>.live ─i.<instance>─▶ <name>.live.<instance> ─▶ link (that instance) ─▶ router ─▶ sessions
//! ```
//!
//! - [`presence`]: which instance holds a socket of which user, and the
//!   instances' heartbeats, in PostgreSQL.
//! - [`fanout`]: the active writer's step after each commit.
//! - [`live`]: the live messages' bodies.
//! - [`link`]: each instance's connection to its live queue (notifications,
//!   counts, admin calls) and the channel bindings of its subscribers.
//! - [`admin`]: connection listing and disconnecting across instances.
//! - [`tickets`]: one-time WebSocket tickets any instance redeems, once.

pub mod admin;
pub mod fanout;
pub mod link;
pub mod live;
pub mod presence;
pub mod tickets;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{
    config::{AmqpConfig, ClusterConfig},
    frames,
    inbox::{Counts, PgStore},
    message::UserId,
    metrics::Metrics,
    readiness::Readiness,
    router::Router,
};
use link::LiveLink;
use presence::Presence;
use tickets::SharedTickets;

/// The routing key of live broadcasts (and of calls to every instance).
pub const BROADCAST_KEY: &str = "b";

/// What one cluster declares on the broker and writes in the database,
/// all under `cluster.name`, so two clusters on one broker never mix.
#[derive(Debug, Clone)]
pub struct ClusterNames {
    pub cluster: String,
    pub instance: String,
}

impl ClusterNames {
    /// The shared queue every message of the cluster is consumed from.
    pub fn ingest_queue(&self) -> String {
        format!("{}.ingest", self.cluster)
    }

    /// The direct exchange instances receive live messages from.
    pub fn live_exchange(&self) -> String {
        format!("{}.live", self.cluster)
    }

    /// This instance's own queue on the live exchange.
    pub fn live_queue(&self) -> String {
        format!("{}.live.{}", self.cluster, self.instance)
    }
}

/// The routing key of messages for one instance.
pub fn instance_key(instance: &str) -> String {
    format!("i.{instance}")
}

/// The routing key of a channel's messages. A routing key holds at most
/// 255 bytes, a channel name as many, so long names are cut (at a
/// character boundary): two channels sharing a key only cost an instance a
/// message its router then delivers to nobody, never a wrong delivery.
pub fn channel_key(channel: &str) -> String {
    let mut key = String::with_capacity(channel.len().min(255) + 2);
    key.push_str("c.");
    for c in channel.chars() {
        if key.len() + c.len_utf8() > 255 {
            break;
        }
        key.push(c);
    }
    key
}

/// A running instance's share of the cluster.
pub struct Cluster {
    pub names: ClusterNames,
    pub presence: Arc<Presence>,
    pub link: Arc<LiveLink>,
    pub tickets: Arc<SharedTickets>,
}

impl Cluster {
    /// Starts the instance's live link and heartbeat tasks (the heartbeat
    /// registers it, and removes the presence a previous life left, once
    /// the database answers).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &ClusterConfig,
        amqp: &AmqpConfig,
        ticket_ttl: std::time::Duration,
        store: &Arc<PgStore>,
        router: Router,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let names = ClusterNames {
            cluster: config.name.clone(),
            instance: router.names().instance().unwrap_or_default().to_string(),
        };
        let presence = Presence::new(store.clone(), &names);
        tokio::spawn(presence.clone().run(readiness.clone(), shutdown.clone()));
        let tickets = Arc::new(SharedTickets::new(
            store.clone(),
            names.cluster.clone(),
            ticket_ttl,
        ));
        tokio::spawn(sweep_tickets(tickets.clone(), shutdown.clone()));
        let link = LiveLink::new(names.clone(), amqp.clone());
        tokio::spawn(link.clone().run(
            router,
            metrics,
            readiness,
            shutdown,
            amqp.reconnect_max_backoff,
        ));
        Ok(Arc::new(Self {
            names,
            presence,
            link,
            tickets,
        }))
    }

    /// Sends a user's new counts to every instance holding a socket of
    /// theirs (this one included), ordered there by the counts' version.
    async fn announce_counts(&self, user: &UserId, counts: Counts) -> anyhow::Result<()> {
        let body = live::LiveCounts {
            user: user.to_string(),
            total: counts.total,
            unread: counts.unread,
            version: counts.version,
        };
        let body = serde_json::to_vec(&body)?;
        let Some(holders) = self.presence.holders(&[user.as_str()]).await? else {
            return self
                .link
                .publish(BROADCAST_KEY, live::Kind::Counts, &body)
                .await;
        };
        for (_, instance) in holders {
            self.link
                .publish(&instance_key(&instance), live::Kind::Counts, &body)
                .await?;
        }
        Ok(())
    }
}

/// Drops expired tickets every half minute.
async fn sweep_tickets(tickets: Arc<SharedTickets>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(e) = tickets.sweep().await {
            tracing::debug!(error = %e, "cannot sweep expired tickets");
        }
    }
}

/// Tells every tab of `user` their new counts: through the router on one
/// instance, through the cluster's holders in cluster mode (falling back
/// to this instance's tabs when the cluster cannot be reached).
pub async fn announce_counts(
    cluster: Option<&Cluster>,
    router: &Router,
    user: &UserId,
    counts: Counts,
) {
    if let Some(cluster) = cluster {
        match cluster.announce_counts(user, counts).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot send counts to the cluster; only this instance's tabs get them")
            }
        }
        let frame = frames::inbox_counts(counts);
        return router
            .to_user_versioned(user.clone(), frame, counts.version)
            .await;
    }
    router
        .to_user(user.clone(), frames::inbox_counts(counts))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_keys_fit_a_routing_key() {
        assert_eq!(channel_key("news"), "c.news");
        let long = "é".repeat(200);
        let key = channel_key(&long);
        assert!(key.len() <= 255 && key.starts_with("c.é"), "{}", key.len());
    }
}
