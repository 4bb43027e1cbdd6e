//! One-time WebSocket tickets in cluster mode: issued on any instance,
//! redeemed once on any instance. A ticket is a row in PostgreSQL, and
//! redeeming it is one `DELETE … RETURNING`, so of two instances redeeming
//! the same ticket at once exactly one gets the identity.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use crate::{
    auth::tickets::{TicketError, MAX_OUTSTANDING},
    auth::{ChannelGrant, Identity},
    inbox::PgStore,
    message::UserId,
    query,
};

/// The cluster's tickets.
pub struct SharedTickets {
    store: Arc<PgStore>,
    cluster: String,
    ttl: Duration,
}

impl SharedTickets {
    pub fn new(store: Arc<PgStore>, cluster: String, ttl: Duration) -> Self {
        Self {
            store,
            cluster,
            ttl,
        }
    }

    /// How long a ticket stays valid (`auth.ticket_ttl`).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new ticket for `identity`, stored for every instance; at most
    /// [`MAX_OUTSTANDING`] wait at once, as on one instance.
    pub async fn issue(&self, identity: &Identity) -> anyhow::Result<Result<String, TicketError>> {
        let ticket = uuid::Uuid::new_v4().simple().to_string();
        let channels: Option<Vec<&str>> = match &identity.channels {
            ChannelGrant::All => None,
            ChannelGrant::Listed(set) => Some(set.iter().map(String::as_str).collect()),
        };
        let token_expiry = identity.expires_at.map(|at| {
            at.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs().min(i64::MAX as u64) as i64)
        });
        let db = self.store.client().await?;
        let inserted = db
            .execute(
                "INSERT INTO cluster_tickets
                     (ticket, cluster, user_id, channels, token_expires_at, expires_at)
                 SELECT $1, $2, $3, $4, $5, now() + make_interval(secs => $6)
                 WHERE (SELECT COUNT(*) FROM cluster_tickets
                        WHERE cluster = $2 AND expires_at > now()) < $7",
                &[
                    &ticket,
                    &self.cluster,
                    &identity.user.as_str(),
                    &channels,
                    &token_expiry,
                    &self.ttl.as_secs_f64(),
                    &(MAX_OUTSTANDING as i64),
                ],
            )
            .await?;
        Ok(if inserted == 1 {
            Ok(ticket)
        } else {
            Err(TicketError::TooMany)
        })
    }

    /// The identity of the request's `?ticket=`, redeemed (and so spent);
    /// `None` when the request has no ticket. A store that cannot be
    /// reached answers as an unknown ticket would (the client gets a 401
    /// and asks for a new one), and is logged.
    pub async fn redeem_in(&self, query: Option<&str>) -> Option<Result<Identity, TicketError>> {
        let query = query::parse(query?);
        let ticket = query::value(&query, "ticket")?;
        Some(match self.redeem(ticket).await {
            Ok(found) => found.ok_or(TicketError::Unknown),
            Err(e) => {
                tracing::warn!(error = %e, "cannot redeem a ticket in the shared store");
                Err(TicketError::Unknown)
            }
        })
    }

    async fn redeem(&self, ticket: &str) -> anyhow::Result<Option<Identity>> {
        let db = self.store.client().await?;
        let row = db
            .query_opt(
                "DELETE FROM cluster_tickets
                 WHERE ticket = $1 AND cluster = $2 AND expires_at > now()
                 RETURNING user_id, channels, token_expires_at",
                &[&ticket, &self.cluster],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let user: String = row.get(0);
        let channels: Option<Vec<String>> = row.get(1);
        let expires: Option<i64> = row.get(2);
        Ok(UserId::new(&user).map(|user| Identity {
            user,
            channels: match channels {
                None => ChannelGrant::All,
                Some(list) => ChannelGrant::Listed(list.into_iter().collect::<HashSet<_>>()),
            },
            expires_at: expires.map(|s| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)),
        }))
    }

    /// Drops expired tickets (the heartbeat calls it).
    pub async fn sweep(&self) -> anyhow::Result<()> {
        let db = self.store.client().await?;
        db.execute("DELETE FROM cluster_tickets WHERE expires_at < now()", &[])
            .await?;
        Ok(())
    }
}
