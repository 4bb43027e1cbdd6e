//! The session's timers with paused time: [`session::run`] over an
//! in-memory pipe ([`ServerStream::Duplex`]) and a context without a broker
//! or a listener, so pings, the silent-peer deadline and token expiry are
//! checked at the contract's default `websocket.ping_interval` (25 s) in
//! milliseconds of wall time. The real socket, TLS and the broker stay in
//! tests/handshake.rs and tests/client_faults.rs.

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, SystemTime},
};

use futures_util::{SinkExt, StreamExt};
use tokio::{io::DuplexStream, time::Instant};
use tokio_tungstenite::{
    tungstenite::{protocol::Role, Message},
    WebSocketStream,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{Authenticator, ChannelGrant},
    config::Config,
    message::{self, DecodeLimits, UserId},
    metrics::Metrics,
    router::{RouteRequest, Router},
    tls::ServerStream,
    ws::{context::WsContext, handshake::Admission, limits::ConnectionLimits, session},
};

type Peer = WebSocketStream<DuplexStream>;

/// A bridge's WebSocket side with the default settings but `tweak`.
fn context(tweak: impl FnOnce(&mut Config)) -> Arc<WsContext> {
    let mut config = Config::default();
    tweak(&mut config);
    let metrics = Arc::new(Metrics::default());
    let (router, _task) = Router::spawn(metrics.clone());
    Arc::new(WsContext {
        limits: ConnectionLimits::new(
            config.websocket.max_connections,
            config.websocket.max_connections_per_user,
        ),
        settings: config.websocket,
        auth: Arc::new(Authenticator::from_config(&config.auth).unwrap()),
        router,
        metrics,
        next_connection_id: AtomicU64::new(0),
        shutdown: CancellationToken::new(),
        sessions: TaskTracker::new(),
        inbox: None,
        cluster: None,
        tls: None,
    })
}

/// Runs an admitted session for `user` over a pipe of `pipe_bytes` each
/// way; the client end, once it read `welcome`.
async fn connect(
    ctx: &Arc<WsContext>,
    user: &str,
    expires_at: Option<SystemTime>,
    pipe_bytes: usize,
) -> Peer {
    let (client, server) = tokio::io::duplex(pipe_bytes);
    let server = ServerStream::Duplex(server);
    let config = Some(ctx.tungstenite_config());
    let ws = WebSocketStream::from_raw_socket(server, Role::Server, config).await;
    let user = UserId::new(user).unwrap();
    let admission = Admission {
        user: user.clone(),
        channels: Vec::new(),
        grant: ChannelGrant::Listed(Default::default()),
        expires_at,
        bearer_protocol: false,
        since: None,
    };
    let permit = ctx.limits.acquire(&user).unwrap();
    let remote = "127.0.0.1:40000".parse().unwrap();
    tokio::spawn(session::run(ws, admission, permit, remote, ctx.clone()));
    let mut peer = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let welcome = text(&mut peer).await;
    assert!(welcome.contains(r#""type":"welcome""#), "{welcome}");
    peer
}

/// The next text frame; pings are answered (by reading) and skipped.
async fn text(peer: &mut Peer) -> String {
    loop {
        match peer.next().await {
            Some(Ok(Message::Text(text))) => return text.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The close frame's code and reason, skipping whatever comes before it.
async fn close_frame(peer: &mut Peer) -> (u16, String) {
    loop {
        match peer.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (frame.code.into(), frame.reason.to_string())
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Sleeps (in paused time) until `condition` holds; how long it took.
async fn until(what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "never: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn pings_keep_a_reader_and_a_silent_peer_is_dropped_within_three_intervals() {
    let ctx = context(|_| {});
    let interval = ctx.settings.ping_interval;
    let metrics = ctx.metrics.clone();
    let silent = connect(&ctx, "p", None, 64 * 1024).await;
    let silent_since = Instant::now();
    let (mut to_server, mut from_server) = connect(&ctx, "p", None, 64 * 1024).await.split();
    let pings = Arc::new(AtomicU64::new(0));
    let (texts, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let reader = {
        let pings = pings.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = from_server.next().await {
                match frame {
                    Message::Ping(_) => {
                        pings.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Message::Text(text) => texts.send(text.to_string()).unwrap(),
                    other => panic!("the reader got {other:?}"),
                }
            }
        })
    };
    assert_eq!(metrics.connections.get(), 2);

    // Dropped once two intervals pass without an answer: at the first ping
    // after that (the first ping comes within one interval).
    until("the silent peer dropped", || metrics.connections.get() == 1).await;
    let dropped = silent_since.elapsed();
    assert!(
        dropped > interval * 2 && dropped <= interval * 3 + Duration::from_millis(10),
        "dropped after {dropped:?} at a {interval:?} interval"
    );
    // Without a close frame: what it was sent (pings), then the end.
    let mut silent = silent;
    while let Some(Ok(frame)) = silent.next().await {
        assert!(frame.is_ping(), "{frame:?}");
    }

    // The reader, answering every ping, is still there two intervals on.
    tokio::time::sleep(interval * 2).await;
    assert_eq!(metrics.connections.get(), 1);
    let pinged = pings.load(std::sync::atomic::Ordering::Relaxed);
    assert!(pinged >= 4, "{pinged} pings in 5 intervals");
    to_server
        .send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(replies.recv().await.unwrap(), r#"{"type":"pong"}"#);
    reader.abort();
}

#[tokio::test(start_paused = true)]
async fn a_session_is_closed_1008_when_its_token_expires() {
    let ctx = context(|_| {});
    let lifetime = Duration::from_secs(600);
    let started = Instant::now();
    let mut peer = connect(&ctx, "e", Some(SystemTime::now() + lifetime), 64 * 1024).await;
    // Reading all along, so pings are answered: only the token ends it.
    let (code, reason) = tokio::time::timeout(lifetime * 2, close_frame(&mut peer))
        .await
        .expect("closed when the token expired");
    let after = started.elapsed();
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
    assert!(
        after >= lifetime - Duration::from_secs(1) && after <= lifetime + Duration::from_secs(1),
        "closed after {after:?}"
    );
    let metrics = ctx.metrics.clone();
    until("unregistered", || metrics.connections.get() == 0).await;
}

/// Routes a notification with `payload` to `user`, as the consumer does.
async fn route(ctx: &WsContext, user: &str, payload: &str) {
    let limits = DecodeLimits::from_config(&Config::default().amqp);
    let body = format!(r#"{{"user_id":"{user}","payload":"{payload}"}}"#);
    let n = message::decode(body.as_bytes(), Some("id"), &limits).unwrap();
    ctx.router.route(RouteRequest::new(n, None)).await;
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_mid_backlog_is_dropped_after_two_intervals() {
    // Fewer frames than `send_queue` and fewer bytes than
    // `send_queue_bytes` (18 MB under 64 MiB): no 1013, so only the write
    // that the peer does not take for two intervals ends it.
    let ctx = context(|c| c.websocket.send_queue_bytes = 64 << 20);
    let interval = ctx.settings.ping_interval;
    let _stuck = connect(&ctx, "stuck", None, 4096).await;
    let big = "z".repeat(60_000);
    let started = Instant::now();
    for _ in 0..300 {
        route(&ctx, "stuck", &big).await;
    }
    ctx.router.barrier().await;
    assert_eq!(ctx.metrics.messages_delivered.get(), 300);
    let metrics = ctx.metrics.clone();
    until("the stuck peer dropped", || metrics.connections.get() == 0).await;
    let dropped = started.elapsed();
    assert!(
        dropped <= interval * 2 + Duration::from_millis(10),
        "dropped after {dropped:?} at a {interval:?} interval"
    );
    assert_eq!(ctx.metrics.slow_client_closes.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_reader_whose_queue_fills_is_closed_1013_and_slows_nobody() {
    let ctx = context(|c| c.websocket.send_queue = 8);
    let mut slow = connect(&ctx, "slow", None, 4096).await;
    let mut healthy = connect(&ctx, "healthy", None, 64 * 1024).await;
    // The slow peer reads nothing: its pipe and then its queue fill.
    let big = "z".repeat(60_000);
    for _ in 0..40 {
        route(&ctx, "slow", &big).await;
    }
    route(&ctx, "healthy", "after").await;
    ctx.router.barrier().await;
    assert_eq!(ctx.metrics.slow_client_closes.get(), 1);
    assert!(text(&mut healthy).await.contains(r#""payload":"after""#));

    // What was written before the close, then the close frame.
    let (code, reason) = close_frame(&mut slow).await;
    assert_eq!((code, reason.as_str()), (1013, "client reads too slowly"));
    let metrics = ctx.metrics.clone();
    until("unregistered", || metrics.connections.get() == 1).await;
}
