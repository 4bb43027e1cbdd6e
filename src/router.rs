//! The session router: one task that owns who is connected (user →
//! sessions, channel → sessions, connection id → session) and fans each
//! notification out to its recipients' outbound queues.
//!
//! Owning the maps in a single task means no locks on the hot path, and
//! processing commands in arrival order is what keeps one user's frames in
//! broker order. The router never awaits a session: it `try_send`s, and a
//! full queue closes that session with 1013 (a slow client never slows
//! anyone else).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::{Instant, SystemTime},
};

use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::settle::Settlement,
    message::{Notification, Target, UserId},
    metrics::{Limit, Metrics},
    outbound::{OutboundSender, PushError},
    receipts::{Kept, Outcome, UserOutcome},
    ws::frames,
};

pub use crate::connection_id::ConnectionId;
use crate::connection_id::ConnectionNames;
pub use crate::outbound::Outbound;

/// Why and how a session must close; the first reason given wins.
#[derive(Debug, Default)]
pub struct SessionControl {
    reason: OnceLock<(u16, &'static str)>,
    cancelled: CancellationToken,
}

impl SessionControl {
    /// Asks the session to send a close frame with `code` and end.
    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set((code, reason));
        self.cancelled.cancel();
    }

    /// Resolves once [`SessionControl::close`] was called.
    pub async fn closed(&self) {
        self.cancelled.cancelled().await
    }

    pub fn reason(&self) -> Option<(u16, &'static str)> {
        self.reason.get().copied()
    }
}

/// What the router keeps of a session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: ConnectionId,
    pub user: UserId,
    pub remote_addr: SocketAddr,
    pub connected_at: SystemTime,
    pub outbound: OutboundSender,
    pub control: Arc<SessionControl>,
}

impl SessionHandle {
    /// Queues `out` for this session; `false` when the session is gone or
    /// was just closed for reading too slowly (1013, counted), and must
    /// leave the maps. Every frame the router hands out comes through here,
    /// so the slow-client rule is written once.
    fn offer(&self, out: Outbound, metrics: &Metrics) -> bool {
        match self.outbound.try_push(out) {
            Ok(()) => true,
            Err(PushError::Closed) => false,
            Err(full) => {
                if full == PushError::BytesFull {
                    if let Some(unlogged) = metrics.refused_to_log(Limit::SendQueueBytes) {
                        tracing::warn!(connection = %self.id, user = %self.user, refused_since_last_log = unlogged, "send queue over websocket.send_queue_bytes; closing 1013");
                    }
                }
                self.control.close(1013, "client reads too slowly");
                metrics.slow_client_closes.inc();
                false
            }
        }
    }
}

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

/// A notification on its way to its recipients, with what to do once it
/// was handed to their queues.
#[derive(Debug)]
pub struct RouteRequest {
    pub notification: Notification,
    pub received_at: Instant,
    pub settlement: Option<Settlement>,
    /// Filled by the inbox stage: each target user with the seq of their
    /// stored copy, or `None` when their inbox already held the id (a
    /// redelivery: not sent again). Empty when nothing was stored.
    pub stored: Vec<(UserId, Option<u64>)>,
}

impl RouteRequest {
    /// A delivery fresh from the broker, not yet through the inbox.
    pub fn new(notification: Notification, settlement: Option<Settlement>) -> Self {
        Self {
            notification,
            received_at: Instant::now(),
            settlement,
            stored: Vec::new(),
        }
    }
}

enum Command {
    Register {
        session: SessionHandle,
        channels: Vec<String>,
        registered: oneshot::Sender<()>,
    },
    Unregister(ConnectionId),
    Subscribe(ConnectionId, String),
    Unsubscribe(ConnectionId, String),
    Route(RouteRequest),
    List {
        user: Option<UserId>,
        reply: oneshot::Sender<Vec<ConnectionInfo>>,
    },
    Disconnect {
        id: ConnectionId,
        reply: oneshot::Sender<bool>,
    },
    /// A frame for every socket of one user (inbox counts); with a
    /// version, only if newer than the last one that user's sockets got.
    ToUser(UserId, Utf8Bytes, Option<u64>),
    CloseAll {
        code: u16,
        reason: &'static str,
    },
    /// Answered once everything routed before it was handed over.
    Barrier(oneshot::Sender<()>),
    /// Acked in order with the requests routed before it.
    Settle(Settlement),
}

/// A cheap, cloneable handle to the router task.
#[derive(Clone)]
pub struct Router {
    commands: mpsc::Sender<Command>,
    names: ConnectionNames,
}

/// How many commands may wait for the router before senders wait.
const COMMAND_QUEUE: usize = 4096;

impl Router {
    /// Starts the router task of a single instance (`c-<n>` ids).
    pub fn spawn(metrics: Arc<Metrics>) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn_named(metrics, ConnectionNames::default())
    }

    /// Starts the router task, naming connections with `names`.
    pub fn spawn_named(
        metrics: Arc<Metrics>,
        names: ConnectionNames,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let task = RouterTask {
            metrics,
            names: names.clone(),
            sessions: HashMap::new(),
            by_user: HashMap::new(),
            by_channel: HashMap::new(),
            counts_versions: HashMap::new(),
        };
        let join = tokio::spawn(task.run(rx));
        (
            Self {
                commands: tx,
                names,
            },
            join,
        )
    }

    /// How this instance's connections are named outside the process.
    pub fn names(&self) -> &ConnectionNames {
        &self.names
    }

    /// Registers a session; once this returns, every message routed after
    /// it reaches the session.
    pub async fn register(&self, session: SessionHandle, channels: Vec<String>) -> bool {
        let (registered, done) = oneshot::channel();
        self.send(Command::Register {
            session,
            channels,
            registered,
        })
        .await;
        done.await.is_ok()
    }

    pub async fn unregister(&self, id: ConnectionId) {
        self.send(Command::Unregister(id)).await
    }

    pub async fn subscribe(&self, id: ConnectionId, channel: String) {
        self.send(Command::Subscribe(id, channel)).await
    }

    pub async fn unsubscribe(&self, id: ConnectionId, channel: String) {
        self.send(Command::Unsubscribe(id, channel)).await
    }

    /// Queues a notification for routing; waits only when the router is
    /// behind by more than its command queue (backpressure to the broker).
    pub async fn route(&self, request: RouteRequest) {
        self.send(Command::Route(request)).await
    }

    pub async fn list(&self, user: Option<UserId>) -> Vec<ConnectionInfo> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::List { user, reply }).await;
        rx.await.unwrap_or_default()
    }

    /// Closes one connection with 1008; false when no such connection is open.
    pub async fn disconnect(&self, id: ConnectionId) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Disconnect { id, reply }).await;
        rx.await.unwrap_or(false)
    }

    /// Sends a control frame to every socket of `user`.
    pub async fn to_user(&self, user: UserId, frame: Utf8Bytes) {
        self.send(Command::ToUser(user, frame, None)).await
    }

    /// Like [`Router::to_user`], for counts that may arrive out of order
    /// (from other instances): a version not newer than the last one this
    /// user's sockets got is dropped, so every tab ends at the latest.
    pub async fn to_user_versioned(&self, user: UserId, frame: Utf8Bytes, version: u64) {
        self.send(Command::ToUser(user, frame, Some(version))).await
    }

    pub async fn close_all(&self, code: u16, reason: &'static str) {
        self.send(Command::CloseAll { code, reason }).await
    }

    /// Waits until every request routed before this call was handed to its
    /// recipients (and its settlement queued to the settler).
    pub async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Barrier(tx)).await;
        let _ = rx.await;
    }

    /// Acks a delivery that carried no notification (a live control
    /// message) in order with the ones routed before it, so the settler's
    /// coalesced ack never covers a delivery still on its way.
    pub async fn settle_after(&self, settlement: Settlement) {
        self.send(Command::Settle(settlement)).await
    }

    async fn send(&self, command: Command) {
        // The router only stops when every handle is gone, so this fails
        // only during teardown, when nothing is left to do.
        let _ = self.commands.send(command).await;
    }
}

struct Entry {
    handle: SessionHandle,
    channels: HashSet<Arc<str>>,
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

impl RouterTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(64);
        while commands.recv_many(&mut batch, 64).await > 0 {
            for command in batch.drain(..) {
                self.handle(command);
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Register {
                session,
                channels,
                registered,
            } => {
                let id = session.id;
                self.by_user
                    .entry(session.user.clone())
                    .or_default()
                    .push(id);
                let mut entry = Entry {
                    handle: session,
                    channels: HashSet::new(),
                };
                for channel in channels {
                    let channel: Arc<str> = Arc::from(channel);
                    self.by_channel
                        .entry(channel.clone())
                        .or_default()
                        .insert(id);
                    entry.channels.insert(channel);
                }
                self.sessions.insert(id, entry);
                self.metrics.connections.inc();
                self.metrics.connections_total.inc();
                let _ = registered.send(());
            }
            Command::Unregister(id) => self.remove(id),
            Command::Subscribe(id, channel) => {
                let Some(entry) = self.sessions.get_mut(&id) else {
                    return;
                };
                let channel: Arc<str> = Arc::from(channel);
                self.by_channel
                    .entry(channel.clone())
                    .or_default()
                    .insert(id);
                let frame = frames::subscribed(&channel);
                entry.channels.insert(channel);
                self.push(id, Outbound::control(frame));
            }
            Command::Unsubscribe(id, channel) => {
                let Some(entry) = self.sessions.get_mut(&id) else {
                    return;
                };
                entry.channels.remove(channel.as_str());
                if let Some(set) = self.by_channel.get_mut(channel.as_str()) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.by_channel.remove(channel.as_str());
                    }
                }
                self.push(id, Outbound::control(frames::unsubscribed(&channel)));
            }
            Command::Route(request) => self.route(request),
            Command::ToUser(user, frame, version) => {
                if let Some(version) = version {
                    if !self.by_user.contains_key(&user) {
                        return;
                    }
                    let last = self.counts_versions.entry(user.clone()).or_default();
                    if version <= *last {
                        return;
                    }
                    *last = version;
                }
                let ids = self.by_user.get(&user).cloned().unwrap_or_default();
                for id in ids {
                    self.push(id, Outbound::control(frame.clone()));
                }
            }
            Command::List { user, reply } => {
                let mut list: Vec<ConnectionInfo> = self
                    .sessions
                    .values()
                    .filter(|e| user.as_ref().is_none_or(|u| *u == e.handle.user))
                    .map(|e| ConnectionInfo {
                        id: self.names.name(e.handle.id),
                        instance: self.names.instance().map(str::to_string),
                        user_id: e.handle.user.to_string(),
                        channels: {
                            let mut c: Vec<String> =
                                e.channels.iter().map(|c| c.to_string()).collect();
                            c.sort();
                            c
                        },
                        remote_addr: e.handle.remote_addr.to_string(),
                        connected_at: humantime::format_rfc3339_seconds(e.handle.connected_at)
                            .to_string(),
                    })
                    .collect();
                list.sort_by(|a, b| a.id.cmp(&b.id));
                let _ = reply.send(list);
            }
            Command::Disconnect { id, reply } => {
                let found = match self.sessions.get(&id) {
                    Some(entry) => {
                        entry.handle.control.close(1008, "disconnected by an admin");
                        true
                    }
                    None => false,
                };
                self.remove(id);
                let _ = reply.send(found);
            }
            Command::CloseAll { code, reason } => {
                for entry in self.sessions.values() {
                    entry.handle.control.close(code, reason);
                }
                let ids: Vec<ConnectionId> = self.sessions.keys().copied().collect();
                for id in ids {
                    self.remove(id);
                }
            }
            Command::Barrier(done) => {
                let _ = done.send(());
            }
            Command::Settle(settlement) => settlement.ack(),
        }
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
        let mut dead: Vec<ConnectionId> = Vec::new();
        let (handed, users) = self.fan_out(&notification, received_at, &stored, want, &mut dead);
        for id in dead {
            self.remove(id);
        }
        if handed > 0 {
            self.metrics.messages_delivered.inc();
        } else {
            self.metrics.messages_no_recipient.inc();
        }
        if let Some(settlement) = settlement {
            let outcome = match notification.target {
                Target::User(_) | Target::Users(_) => Outcome::Users(users),
                _ => Outcome::Connections(handed),
            };
            settlement.routed(&notification, want.then_some(outcome));
        }
    }

    /// Offers the message to every recipient; how many connections took it
    /// and, with `want`, what happened per target user (for receipts).
    /// Sessions found closed go to `dead`.
    fn fan_out(
        &self,
        notification: &Notification,
        received_at: Instant,
        stored: &[(UserId, Option<u64>)],
        want: bool,
        dead: &mut Vec<ConnectionId>,
    ) -> (usize, Vec<UserOutcome>) {
        let mut handed = 0usize;
        let mut users = Vec::new();
        let mut offer = |id: &ConnectionId, frame: &Utf8Bytes, seq: Option<u64>| {
            let Some(entry) = self.sessions.get(id) else {
                return false;
            };
            let out = Outbound {
                text: frame.clone(),
                received_at: Some(received_at),
                seq,
            };
            let taken = entry.handle.offer(out, &self.metrics);
            if taken {
                handed += 1;
            } else {
                dead.push(*id);
            }
            taken
        };
        let no_ids: &[ConnectionId] = &[];
        let ids_of = |user: &UserId| self.by_user.get(user).map_or(no_ids, Vec::as_slice);
        let mut record = |user: &UserId, connections: usize, kept: Kept| {
            if want {
                users.push(UserOutcome {
                    user: user.clone(),
                    connections,
                    kept,
                });
            }
        };
        let frame = &notification.frame;
        if !stored.is_empty() {
            // Stored copies: one frame per user, carrying their seq.
            for (user, seq) in stored {
                let ids = ids_of(user);
                let Some(seq) = *seq else {
                    // Already held (a redelivery): not sent again; its
                    // open connections have it (live before, or replayed).
                    record(user, ids.len(), Kept::AlreadyHeld);
                    continue;
                };
                let frame = if ids.is_empty() {
                    frame.clone()
                } else {
                    notification.frame_with_seq(seq)
                };
                let taken = ids.iter().filter(|id| offer(id, &frame, Some(seq))).count();
                record(user, taken, Kept::Seq(seq));
            }
            return (handed, users);
        }
        match &notification.target {
            Target::User(user) => {
                let taken = ids_of(user)
                    .iter()
                    .filter(|id| offer(id, frame, None))
                    .count();
                record(user, taken, Kept::No);
            }
            Target::Users(list) => {
                for user in list {
                    let taken = ids_of(user)
                        .iter()
                        .filter(|id| offer(id, frame, None))
                        .count();
                    record(user, taken, Kept::No);
                }
            }
            Target::Channel(channel) => {
                for id in self.by_channel.get(channel).into_iter().flatten() {
                    offer(id, frame, None);
                }
            }
            Target::Broadcast => {
                for id in self.sessions.keys() {
                    offer(id, frame, None);
                }
            }
            Target::Connection(id) => {
                // A malformed id is as unknown as a closed one.
                if let Some(id) = self.names.parse(id) {
                    offer(&id, frame, None);
                }
            }
        }
        (handed, users)
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
        if let Some(ids) = self.by_user.get_mut(&entry.handle.user) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_user.remove(&entry.handle.user);
                self.counts_versions.remove(&entry.handle.user);
            }
        }
        for channel in &entry.channels {
            if let Some(set) = self.by_channel.get_mut(channel) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_channel.remove(channel);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(
        id: u64,
        user: &str,
        queue: usize,
    ) -> (SessionHandle, crate::outbound::OutboundReceiver) {
        let (tx, rx) = crate::outbound::queue(queue, 1 << 20);
        (
            SessionHandle {
                id: ConnectionId(id),
                user: UserId::new(user).unwrap(),
                remote_addr: "127.0.0.1:1".parse().unwrap(),
                connected_at: SystemTime::now(),
                outbound: tx,
                control: Arc::new(SessionControl::default()),
            },
            rx,
        )
    }

    fn note(body: &str) -> RouteRequest {
        RouteRequest::new(
            crate::message::decode(body.as_bytes(), None, &Default::default()).unwrap(),
            None,
        )
    }

    #[tokio::test]
    async fn routes_to_the_right_sessions_and_closes_slow_ones() {
        let metrics = Arc::new(Metrics::default());
        let (router, _task) = Router::spawn(metrics.clone());
        let (a1, mut a1_rx) = session(1, "1", 8);
        let (a2, mut a2_rx) = session(2, "1", 8);
        let (b, mut b_rx) = session(3, "2", 1);
        let b_control = b.control.clone();
        assert!(router.register(a1, vec![]).await);
        assert!(router.register(a2, vec!["news".into()]).await);
        assert!(router.register(b, vec![]).await);

        router.route(note(r#"{"user_id":1,"payload":"x"}"#)).await;
        router
            .route(note(r#"{"channel":"news","payload":"c"}"#))
            .await;
        router
            .route(note(r#"{"user_ids":[2,2],"payload":"y"}"#))
            .await;
        router
            .route(note(r#"{"user_id":2,"payload":"overflow"}"#))
            .await;
        router
            .route(note(r#"{"user_id":99,"payload":"nobody"}"#))
            .await;
        router.barrier().await;

        let text = |o: Outbound| o.text.to_string();
        assert!(text(a1_rx.try_recv().unwrap()).contains(r#""payload":"x""#));
        assert!(a1_rx.try_recv().is_none());
        assert!(text(a2_rx.try_recv().unwrap()).contains(r#""payload":"x""#));
        assert!(text(a2_rx.try_recv().unwrap()).contains(r#""channel":"news""#));
        assert!(text(b_rx.try_recv().unwrap()).contains(r#""payload":"y""#));
        // b's queue (capacity 1) was full for "overflow": closed with 1013.
        assert_eq!(b_control.reason(), Some((1013, "client reads too slowly")));
        assert_eq!(metrics.slow_client_closes.get(), 1);
        assert_eq!(metrics.messages_delivered.get(), 3);
        assert_eq!(metrics.messages_no_recipient.get(), 2);
        assert_eq!(metrics.connections.get(), 2);
        assert_eq!(router.list(None).await.len(), 2);
        assert_eq!(router.list(UserId::new("1")).await.len(), 2);
        assert!(router.disconnect(ConnectionId(1)).await);
        assert!(!router.disconnect(ConnectionId(1)).await);
    }

    #[tokio::test]
    async fn a_queue_past_its_byte_bound_is_closed_1013() {
        let metrics = Arc::new(Metrics::default());
        let (router, _task) = Router::spawn(metrics.clone());
        let (tx, mut rx) = crate::outbound::queue(1024, 500);
        let (mut big, _) = session(1, "1", 1);
        big.outbound = tx;
        let control = big.control.clone();
        assert!(router.register(big, vec![]).await);
        // Each frame is ~110 bytes of envelope plus 100 of payload: the
        // second fits under 500 bytes, the third does not, though the frame
        // bound (1024) is far away.
        let payload = "p".repeat(100);
        for _ in 0..3 {
            router
                .route(note(&format!(r#"{{"user_id":1,"payload":"{payload}"}}"#)))
                .await;
        }
        router.barrier().await;
        assert_eq!(control.reason(), Some((1013, "client reads too slowly")));
        assert_eq!(metrics.refusals(Limit::SendQueueBytes), 1);
        assert_eq!(metrics.slow_client_closes.get(), 1);
        assert!(rx.try_recv().is_some() && rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_connection_target_reaches_that_connection_only() {
        let metrics = Arc::new(Metrics::default());
        let (router, _task) = Router::spawn(metrics.clone());
        let (a, mut a_rx) = session(1, "1", 8);
        let (b, mut b_rx) = session(2, "1", 8);
        assert!(router.register(a, vec![]).await);
        assert!(router.register(b, vec![]).await);
        router
            .route(note(r#"{"connection_id":"c-2","payload":"only b"}"#))
            .await;
        for unknown in ["c-99", "c-x", "2"] {
            router
                .route(note(&format!(
                    r#"{{"connection_id":"{unknown}","payload":0}}"#
                )))
                .await;
        }
        router.barrier().await;
        assert!(a_rx.try_recv().is_none());
        assert!(b_rx.try_recv().unwrap().text.contains("only b"));
        assert!(b_rx.try_recv().is_none());
        assert_eq!(metrics.messages_delivered.get(), 1);
        assert_eq!(metrics.messages_no_recipient.get(), 3);
    }
}
