//! The admin listing of connections. The routing task only copies a
//! [`Snapshot`] per connection; sorting and formatting them happens on the
//! task that asked (an HTTP handler, a cluster call), never on the router.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use crate::{
    connection_id::{ConnectionId, ConnectionNames},
    message::UserId,
};

/// A connection as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConnectionInfo {
    pub id: String,
    /// The instance holding it, in cluster mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub user_id: String,
    pub channels: Vec<String>,
    pub remote_addr: String,
    pub connected_at: String,
}

/// What the routing task copies of one connection: cheap clones only.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub id: ConnectionId,
    pub user: UserId,
    pub channels: Vec<Arc<str>>,
    pub remote_addr: SocketAddr,
    pub connected_at: SystemTime,
}

/// The listing as the admin API shows it: named, formatted, sorted by id
/// (and each connection's channels by name).
pub(super) fn format(snapshots: Vec<Snapshot>, names: &ConnectionNames) -> Vec<ConnectionInfo> {
    let mut list: Vec<ConnectionInfo> = snapshots
        .into_iter()
        .map(|s| {
            let mut channels: Vec<String> = s.channels.iter().map(|c| c.to_string()).collect();
            channels.sort();
            ConnectionInfo {
                id: names.name(s.id),
                instance: names.instance().map(str::to_string),
                user_id: s.user.to_string(),
                channels,
                remote_addr: s.remote_addr.to_string(),
                connected_at: humantime::format_rfc3339_seconds(s.connected_at).to_string(),
            }
        })
        .collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    list
}
