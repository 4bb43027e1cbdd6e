//! The routing task: it owns the maps of who is connected and applies one
//! [`Command`] at a time, in arrival order (what keeps one user's frames in
//! broker order). Nothing here awaits.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{listing::Snapshot, Command, Outbound, RouteRequest, SessionHandle};
use crate::{
    connection_id::{ConnectionId, ConnectionNames},
    message::{Notification, Target, UserId},
    metrics::Metrics,
    receipts::{Kept, Outcome, UserOutcome},
};

/// Runs the routing task until every [`super::Router`] handle is gone.
pub(super) async fn run(
    metrics: Arc<Metrics>,
    names: ConnectionNames,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut task = RouterTask {
        metrics,
        names,
        sessions: HashMap::new(),
        by_user: HashMap::new(),
        by_channel: HashMap::new(),
        counts_versions: HashMap::new(),
    };
    let mut batch = Vec::with_capacity(64);
    while commands.recv_many(&mut batch, 64).await > 0 {
        for command in batch.drain(..) {
            task.handle(command);
        }
    }
}

struct Entry {
    handle: SessionHandle,
    channels: HashSet<Arc<str>>,
    /// For the admin listing.
    remote_addr: SocketAddr,
    connected_at: SystemTime,
}

struct RouterTask {
    metrics: Arc<Metrics>,
    names: ConnectionNames,
    sessions: HashMap<ConnectionId, Entry>,
    by_user: HashMap<UserId, Vec<ConnectionId>>,
    by_channel: HashMap<Arc<str>, HashSet<ConnectionId>>,
    /// The last counts version each connected user's sockets got.
    counts_versions: HashMap<UserId, u64>,
}

/// What one fan-out did: how many connections took the message and, when
/// a receipt wants it, what happened per target user.
struct Handed {
    connections: usize,
    users: Vec<UserOutcome>,
    /// Whether `users` is filled at all.
    want: bool,
    /// Sessions found closed on the way, to remove afterwards.
    dead: Vec<ConnectionId>,
}

impl Handed {
    fn record(&mut self, user: &UserId, connections: usize, kept: Kept) {
        if self.want {
            self.users.push(UserOutcome {
                user: user.clone(),
                connections,
                kept,
            });
        }
    }
}

impl RouterTask {
    fn handle(&mut self, command: Command) {
        match command {
            Command::Register {
                session,
                remote_addr,
                channels,
                registered,
            } => {
                self.register(session, remote_addr, channels);
                let _ = registered.send(());
            }
            Command::Unregister(id) => self.remove(id),
            Command::Subscribe(id, channel, confirmation) => {
                self.subscribe(id, channel, confirmation)
            }
            Command::Unsubscribe(id, channel, confirmation) => {
                self.unsubscribe(id, &channel, confirmation)
            }
            Command::Route(request) => self.route(request),
            Command::ToUser(user, frame, version) => self.send_to_user(&user, frame, version),
            Command::List { user, reply } => {
                let _ = reply.send(self.snapshot(user.as_ref()));
            }
            Command::Disconnect { id, reply } => {
                let _ = reply.send(self.close(id, 1008, "disconnected by an admin"));
            }
            Command::CloseAll { code, reason } => {
                let ids: Vec<ConnectionId> = self.sessions.keys().copied().collect();
                for id in ids {
                    self.close(id, code, reason);
                }
            }
            Command::Barrier(done) => {
                let _ = done.send(());
            }
            Command::Settle(completion) => completion.done(),
        }
    }

    fn register(&mut self, session: SessionHandle, remote_addr: SocketAddr, channels: Vec<String>) {
        let id = session.id;
        self.by_user
            .entry(session.user.clone())
            .or_default()
            .push(id);
        self.sessions.insert(
            id,
            Entry {
                handle: session,
                channels: HashSet::new(),
                remote_addr,
                connected_at: SystemTime::now(),
            },
        );
        for channel in channels {
            self.join(id, channel);
        }
        self.metrics.connections.inc();
        self.metrics.connections_total.inc();
    }

    /// Adds `channel` to a registered session; `false` for an unknown one.
    fn join(&mut self, id: ConnectionId, channel: String) -> bool {
        let Some(entry) = self.sessions.get_mut(&id) else {
            return false;
        };
        let channel: Arc<str> = Arc::from(channel);
        self.by_channel
            .entry(channel.clone())
            .or_default()
            .insert(id);
        entry.channels.insert(channel);
        true
    }

    fn subscribe(&mut self, id: ConnectionId, channel: String, confirmation: Utf8Bytes) {
        if self.join(id, channel) {
            self.push(id, Outbound::control(confirmation));
        }
    }

    fn unsubscribe(&mut self, id: ConnectionId, channel: &str, confirmation: Utf8Bytes) {
        let Some(entry) = self.sessions.get_mut(&id) else {
            return;
        };
        entry.channels.remove(channel);
        self.leave(id, channel);
        self.push(id, Outbound::control(confirmation));
    }

    /// Takes `id` out of `channel`'s set, and the set once empty.
    fn leave(&mut self, id: ConnectionId, channel: &str) {
        if let Some(set) = self.by_channel.get_mut(channel) {
            set.remove(&id);
            if set.is_empty() {
                self.by_channel.remove(channel);
            }
        }
    }

    fn send_to_user(&mut self, user: &UserId, frame: Utf8Bytes, version: Option<u64>) {
        if let Some(version) = version {
            if !self.by_user.contains_key(user) {
                return;
            }
            let last = self.counts_versions.entry(user.clone()).or_default();
            if version <= *last {
                return;
            }
            *last = version;
        }
        let ids = self.by_user.get(user).cloned().unwrap_or_default();
        for id in ids {
            self.push(id, Outbound::control(frame.clone()));
        }
    }

    /// A few fields per connection, copied: the listing is sorted and
    /// formatted by whoever asked, not here.
    fn snapshot(&self, user: Option<&UserId>) -> Vec<Snapshot> {
        self.sessions
            .values()
            .filter(|e| user.is_none_or(|u| *u == e.handle.user))
            .map(|e| Snapshot {
                id: e.handle.id,
                user: e.handle.user.clone(),
                channels: e.channels.iter().cloned().collect(),
                remote_addr: e.remote_addr,
                connected_at: e.connected_at,
            })
            .collect()
    }

    /// Asks a session to close with `code` and forgets it; `false` when no
    /// such session is registered.
    fn close(&mut self, id: ConnectionId, code: u16, reason: &'static str) -> bool {
        let Some(entry) = self.sessions.get(&id) else {
            return false;
        };
        entry.handle.control.close(code, reason);
        self.remove(id);
        true
    }

    fn route(&mut self, request: RouteRequest) {
        let RouteRequest {
            notification,
            received_at,
            settlement,
            stored,
        } = request;
        // The per-user outcome is only worked out for a receipt.
        let want = settlement
            .as_ref()
            .is_some_and(|s| s.receipts_wanted(&notification));
        let mut handed = Handed {
            connections: 0,
            users: Vec::new(),
            want,
            dead: Vec::new(),
        };
        if stored.is_empty() {
            self.fan_out(&notification, received_at, &mut handed);
        } else {
            self.fan_out_stored(&notification, received_at, &stored, &mut handed);
        }
        for id in std::mem::take(&mut handed.dead) {
            self.remove(id);
        }
        if handed.connections > 0 {
            self.metrics.messages_delivered.inc();
        } else {
            self.metrics.messages_no_recipient.inc();
        }
        if let Some(settlement) = settlement {
            let outcome = match notification.target {
                Target::User(_) | Target::Users(_) => Outcome::Users(handed.users),
                _ => Outcome::Connections(handed.connections),
            };
            settlement.routed(&notification, want.then_some(outcome));
        }
    }

    /// Offers one frame to one connection; whether it took it (a closed or
    /// slow one goes to `handed.dead`).
    fn offer(&self, id: &ConnectionId, out: Outbound, handed: &mut Handed) -> bool {
        let Some(entry) = self.sessions.get(id) else {
            return false;
        };
        let taken = entry.handle.offer(out, &self.metrics);
        if taken {
            handed.connections += 1;
        } else {
            handed.dead.push(*id);
        }
        taken
    }

    /// Offers `frame` to each of `ids`; how many took it.
    fn offer_all<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a ConnectionId>,
        frame: &Utf8Bytes,
        received_at: Instant,
        seq: Option<u64>,
        handed: &mut Handed,
    ) -> usize {
        ids.into_iter()
            .filter(|id| {
                let out = Outbound {
                    text: frame.clone(),
                    received_at: Some(received_at),
                    seq,
                };
                self.offer(id, out, handed)
            })
            .count()
    }

    fn ids_of(&self, user: &UserId) -> &[ConnectionId] {
        self.by_user.get(user).map_or(&[][..], Vec::as_slice)
    }

    /// Stored copies: one frame per user, carrying their seq.
    fn fan_out_stored(
        &self,
        notification: &Notification,
        received_at: Instant,
        stored: &[(UserId, Option<u64>)],
        handed: &mut Handed,
    ) {
        for (user, seq) in stored {
            let ids = self.ids_of(user);
            let Some(seq) = *seq else {
                // Already held (a redelivery): not sent again; its open
                // connections have it (live before, or replayed).
                handed.record(user, ids.len(), Kept::AlreadyHeld);
                continue;
            };
            let frame = if ids.is_empty() {
                notification.frame.clone()
            } else {
                notification.frame_with_seq(seq)
            };
            let taken = self.offer_all(ids, &frame, received_at, Some(seq), handed);
            handed.record(user, taken, Kept::Seq(seq));
        }
    }

    /// A message that was not stored: the shared frame to every recipient.
    fn fan_out(&self, notification: &Notification, received_at: Instant, handed: &mut Handed) {
        let frame = &notification.frame;
        match &notification.target {
            Target::User(user) => {
                let taken = self.offer_all(self.ids_of(user), frame, received_at, None, handed);
                handed.record(user, taken, Kept::No);
            }
            Target::Users(list) => {
                for user in list {
                    let taken = self.offer_all(self.ids_of(user), frame, received_at, None, handed);
                    handed.record(user, taken, Kept::No);
                }
            }
            Target::Channel(channel) => {
                let ids = self.by_channel.get(channel).into_iter().flatten();
                self.offer_all(ids, frame, received_at, None, handed);
            }
            Target::Broadcast => {
                self.offer_all(self.sessions.keys(), frame, received_at, None, handed);
            }
            Target::Connection(name) => {
                // A malformed id is as unknown as a closed one.
                let id = self.names.parse(name);
                self.offer_all(id.as_ref(), frame, received_at, None, handed);
            }
        }
    }

    /// Pushes a control frame to one session, with the same slow-client
    /// rule as notifications.
    fn push(&mut self, id: ConnectionId, out: Outbound) {
        let Some(entry) = self.sessions.get(&id) else {
            return;
        };
        if !entry.handle.offer(out, &self.metrics) {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: ConnectionId) {
        let Some(entry) = self.sessions.remove(&id) else {
            return;
        };
        self.metrics.connections.dec();
        let user = &entry.handle.user;
        if let Some(ids) = self.by_user.get_mut(user) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_user.remove(user);
                self.counts_versions.remove(user);
            }
        }
        for channel in &entry.channels {
            self.leave(id, channel);
        }
    }
}
