//! The admin routes across the cluster: a listing asks every live
//! instance (a call on the broadcast key, answered to this instance's reply
//! queue), a disconnect asks the one instance named in the connection id.

use std::time::Duration;

use super::{
    instance_key,
    live::{DisconnectCall, DisconnectReply, Kind, ListCall},
    Cluster, BROADCAST_KEY,
};
use crate::{connection_id, message::UserId, router::ConnectionInfo};

/// How long an admin call waits for the instances' answers.
const CALL_WAIT: Duration = Duration::from_secs(3);

/// Every live instance's connections (of `user`, or all), sorted by id.
pub async fn list(cluster: &Cluster, user: Option<&UserId>) -> anyhow::Result<Vec<ConnectionInfo>> {
    let instances = cluster.presence.live_instances().await?;
    let call = serde_json::to_vec(&ListCall {
        user_id: user.map(|u| u.to_string()),
    })?;
    let replies = cluster
        .link
        .call(BROADCAST_KEY, Kind::List, &call, instances.len(), CALL_WAIT)
        .await?;
    if replies.len() < instances.len() {
        tracing::warn!(
            answered = replies.len(),
            live = instances.len(),
            "not every instance answered the connection listing"
        );
    }
    let mut all = Vec::new();
    for reply in replies {
        all.extend(serde_json::from_slice::<Vec<ConnectionInfo>>(&reply)?);
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(all)
}

/// Closes `id` on the instance that holds it; `false` when no live
/// instance has it.
pub async fn disconnect(cluster: &Cluster, id: &str) -> anyhow::Result<bool> {
    let Some(instance) = connection_id::instance_of(id) else {
        return Ok(false);
    };
    if !cluster
        .presence
        .live_instances()
        .await?
        .iter()
        .any(|live| live == instance)
    {
        return Ok(false);
    }
    let call = serde_json::to_vec(&DisconnectCall { id: id.to_string() })?;
    let replies = cluster
        .link
        .call(
            &instance_key(instance),
            Kind::Disconnect,
            &call,
            1,
            CALL_WAIT,
        )
        .await?;
    Ok(replies
        .first()
        .and_then(|r| serde_json::from_slice::<DisconnectReply>(r).ok())
        .is_some_and(|r| r.found))
}
