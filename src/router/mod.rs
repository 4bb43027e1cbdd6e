//! The session router: one task that owns who is connected (user →
//! sessions, channel → sessions, connection id → session) and fans each
//! notification out to its recipients' outbound queues.
//!
//! Owning the maps in a single task means no locks on the hot path, and
//! processing commands in arrival order is what keeps one user's frames in
//! broker order. The router never awaits a session: it `try_send`s, and a
//! full queue closes that session with 1013 (a slow client never slows
//! anyone else).
//!
//! The router knows neither the broker nor the WebSocket protocol: what is
//! owed once a message was handed over is an opaque [`Completion`] (an AMQP
//! ack, in practice), and every frame it queues was built by its sender, so
//! data walks one way, amqp → router → ws.
//!
//! - `task`: the routing task, one command at a time.
//! - `listing`: the admin listing, formatted off the routing task.

mod listing;
mod task;

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Instant,
};

use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::{
    message::{Notification, UserId},
    metrics::{Limit, Metrics},
    outbound::{OutboundSender, PushError},
    receipts::Outcome,
};

pub use crate::connection_id::ConnectionId;
use crate::connection_id::ConnectionNames;
pub use crate::outbound::Outbound;
pub use listing::ConnectionInfo;
use listing::Snapshot;

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

    /// The close frame asked for; `None` when the session should just drop.
    pub fn reason(&self) -> Option<(u16, &'static str)> {
        self.reason.get().copied()
    }
}

/// What the router and the session task both hold of a session (kept
/// small: the session task holds it for the connection's whole life).
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: ConnectionId,
    pub user: UserId,
    pub outbound: OutboundSender,
    pub control: Arc<SessionControl>,
}

impl SessionHandle {
    /// Queues `out` for this session; `false` when the session is gone or
    /// was just closed for reading too slowly (1013, counted). Every frame
    /// for a session (the router's and the session's own replies) comes
    /// through here, so the slow-client rule is written once.
    pub fn offer(&self, out: Outbound, metrics: &Metrics) -> bool {
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

/// What is owed once a request was handed to its recipients' queues (in
/// practice: publish its receipts, then ack it to the broker). The router
/// calls it in routing order and knows nothing else of it.
pub trait Completion: fmt::Debug + Send + Sync + 'static {
    /// Whether routing must work out `n`'s per-recipient outcome (it will
    /// go into a receipt).
    fn receipts_wanted(&self, n: &Notification) -> bool;

    /// `n` was handed over; `outcome` when [`Completion::receipts_wanted`]
    /// said so. Never waits.
    fn routed(self: Box<Self>, n: &Notification, outcome: Option<Outcome>);

    /// Nothing was routed (a delivery that carried no notification): done,
    /// in order with what was routed before.
    fn done(self: Box<Self>);
}

/// A notification on its way to its recipients, with what to do once it
/// was handed to their queues.
#[derive(Debug)]
pub struct RouteRequest {
    pub notification: Notification,
    pub received_at: Instant,
    /// `None` for the notifications of a cluster live message but its last,
    /// which carries the one ack owed for all of them.
    pub settlement: Option<Box<dyn Completion>>,
    /// Filled by the inbox stage: each target user with the seq of their
    /// stored copy, or `None` when their inbox already held the id (a
    /// redelivery: not sent again). Empty when nothing was stored.
    pub stored: Vec<(UserId, Option<u64>)>,
}

impl RouteRequest {
    /// A delivery fresh from the broker, not yet through the inbox.
    pub fn new(notification: Notification, settlement: Option<Box<dyn Completion>>) -> Self {
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
        remote_addr: SocketAddr,
        channels: Vec<String>,
        registered: oneshot::Sender<()>,
    },
    Unregister(ConnectionId),
    /// Join a channel, then queue the confirmation frame (in order with the
    /// channel's messages).
    Subscribe(ConnectionId, String, Utf8Bytes),
    Unsubscribe(ConnectionId, String, Utf8Bytes),
    Route(RouteRequest),
    List {
        user: Option<UserId>,
        reply: oneshot::Sender<Vec<Snapshot>>,
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
    /// Completed in order with the requests routed before it.
    Settle(Box<dyn Completion>),
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
        let join = tokio::spawn(task::run(metrics, names.clone(), rx));
        let router = Self {
            commands: tx,
            names,
        };
        (router, join)
    }

    /// How this instance's connections are named outside the process.
    pub fn names(&self) -> &ConnectionNames {
        &self.names
    }

    /// Registers a session (connected now, from `remote_addr`, for the
    /// admin listing); once this returns, every message routed after it
    /// reaches the session.
    pub async fn register(
        &self,
        session: SessionHandle,
        remote_addr: SocketAddr,
        channels: Vec<String>,
    ) -> bool {
        let (registered, done) = oneshot::channel();
        self.send(Command::Register {
            session,
            remote_addr,
            channels,
            registered,
        })
        .await;
        done.await.is_ok()
    }

    /// Forgets a session that ended.
    pub async fn unregister(&self, id: ConnectionId) {
        self.send(Command::Unregister(id)).await
    }

    /// Adds `channel` to a session, then queues `confirmation` to it.
    pub async fn subscribe(&self, id: ConnectionId, channel: String, confirmation: Utf8Bytes) {
        self.send(Command::Subscribe(id, channel, confirmation))
            .await
    }

    /// Removes `channel` from a session, then queues `confirmation` to it.
    pub async fn unsubscribe(&self, id: ConnectionId, channel: String, confirmation: Utf8Bytes) {
        self.send(Command::Unsubscribe(id, channel, confirmation))
            .await
    }

    /// Queues a notification for routing; waits only when the router is
    /// behind by more than its command queue (backpressure to the broker).
    pub async fn route(&self, request: RouteRequest) {
        self.send(Command::Route(request)).await
    }

    /// This instance's connections (of `user`, or all), sorted by id. The
    /// router only copies a few fields per connection; sorting and
    /// formatting happen here, on the caller's task, so a listing of 100k
    /// connections does not stall fan-out.
    pub async fn list(&self, user: Option<UserId>) -> Vec<ConnectionInfo> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::List { user, reply }).await;
        listing::format(rx.await.unwrap_or_default(), &self.names)
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

    /// Closes every session with `code` (shutdown: 1001).
    pub async fn close_all(&self, code: u16, reason: &'static str) {
        self.send(Command::CloseAll { code, reason }).await
    }

    /// Waits until every request routed before this call was handed to its
    /// recipients (and its completion called).
    pub async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Barrier(tx)).await;
        let _ = rx.await;
    }

    /// Completes a delivery that carried no notification (a live control
    /// message) in order with the ones routed before it, so a coalesced
    /// ack never covers a delivery still on its way.
    pub async fn settle_after(&self, completion: impl Completion) {
        self.send(Command::Settle(Box::new(completion))).await
    }

    async fn send(&self, command: Command) {
        // The router only stops when every handle is gone, so this fails
        // only during teardown, when nothing is left to do.
        let _ = self.commands.send(command).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        1,
    ));

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
                outbound: tx,
                control: Arc::new(SessionControl::default()),
            },
            rx,
        )
    }

    /// A completion that records, in order, what the router told it.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<Vec<String>>>);

    impl Completion for Recorder {
        fn receipts_wanted(&self, _: &Notification) -> bool {
            true
        }
        fn routed(self: Box<Self>, n: &Notification, outcome: Option<Outcome>) {
            let outcome = match outcome {
                Some(Outcome::Users(users)) => {
                    let each: Vec<String> = users
                        .iter()
                        .map(|u| format!("{}:{}", u.user, u.connections))
                        .collect();
                    format!("users {}", each.join(","))
                }
                Some(Outcome::Connections(n)) => format!("connections {n}"),
                None => "none".into(),
            };
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {outcome}", n.payload.get()));
        }
        fn done(self: Box<Self>) {
            self.0.lock().unwrap().push("done".into());
        }
    }

    fn note(body: &str) -> RouteRequest {
        RouteRequest::new(
            crate::message::decode(body.as_bytes(), None, &Default::default()).unwrap(),
            None,
        )
    }

    fn note_completed(body: &str, recorder: &Recorder) -> RouteRequest {
        let mut request = note(body);
        request.settlement = Some(Box::new(recorder.clone()));
        request
    }

    #[tokio::test]
    async fn routes_to_the_right_sessions_and_closes_slow_ones() {
        let metrics = Arc::new(Metrics::default());
        let (router, _task) = Router::spawn(metrics.clone());
        let (a1, mut a1_rx) = session(1, "1", 8);
        let (a2, mut a2_rx) = session(2, "1", 8);
        let (b, mut b_rx) = session(3, "2", 1);
        let b_control = b.control.clone();
        assert!(router.register(a1, LOCAL, vec![]).await);
        assert!(router.register(a2, LOCAL, vec!["news".into()]).await);
        assert!(router.register(b, LOCAL, vec![]).await);

        let completed = Recorder::default();
        for body in [
            r#"{"user_id":1,"payload":"x"}"#,
            r#"{"channel":"news","payload":"c"}"#,
            r#"{"user_ids":[2,2],"payload":"y"}"#,
        ] {
            router.route(note_completed(body, &completed)).await;
        }
        router.settle_after(completed.clone()).await;
        router
            .route(note(r#"{"user_id":2,"payload":"overflow"}"#))
            .await;
        router
            .route(note_completed(
                r#"{"user_id":99,"payload":"nobody"}"#,
                &completed,
            ))
            .await;
        router.barrier().await;
        // Each completion fired once, in routing order, with what happened.
        assert_eq!(
            *completed.0.lock().unwrap(),
            [
                r#""x" users 1:2"#,
                r#""c" connections 1"#,
                r#""y" users 2:1"#,
                "done",
                r#""nobody" users 99:0"#,
            ]
        );

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
        assert!(router.register(big, LOCAL, vec![]).await);
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
        assert!(router.register(a, LOCAL, vec![]).await);
        assert!(router.register(b, LOCAL, vec![]).await);
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
