//! The side port's limits (CONTRACT.md, "Limits on hostile input", HTTP
//! side port): a request head must arrive within `http.request_timeout`, a
//! body within the same time again, idle keep-alive connections are closed
//! after it too, and at most `http.max_connections` connections are open at
//! once. Raw TCP, because a well-behaved HTTP client cannot send half a
//! request.

mod common;

use std::time::Duration;

use common::*;
use notify_bridge::metrics::Limit;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const API_KEY: &str = "limits-api-key";
/// Generous: the server closes after about `request_timeout` (1 s here).
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

async fn start(timeout: Duration, max_connections: usize) -> Bridge {
    Bridge::start_with(|c| {
        c.http.request_timeout = timeout;
        c.http.max_connections = max_connections;
        c.http.api_keys = vec![API_KEY.into()];
    })
    .await
}

async fn open(bridge: &Bridge, first_bytes: &str) -> TcpStream {
    let mut stream = TcpStream::connect(bridge.running().http_addr)
        .await
        .expect("connect to the side port");
    stream.write_all(first_bytes.as_bytes()).await.unwrap();
    stream
}

/// What the server sends until it closes the connection, or None if it is
/// still open after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.ok()?;
    Some(String::from_utf8_lossy(&raw).into_owned())
}

#[tokio::test]
async fn half_sent_heads_are_closed_within_request_timeout() {
    let bridge = start(Duration::from_secs(1), 1024).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(open(&bridge, "GET /healthz HTTP/1.1\r\nHost: x\r\n").await);
    }
    // Meanwhile the side port answers as usual.
    let (status, _) = http_get(bridge.running().http_addr, "/healthz").await;
    assert_eq!(status, 200);

    let started = Instant::now();
    for (i, stream) in held.iter_mut().enumerate() {
        let answer = read_until_closed(stream, CLOSED_WITHIN).await;
        assert!(
            answer.is_some(),
            "half-sent head {i} still open {:?} after the test began waiting",
            started.elapsed()
        );
    }
    let refused = bridge.running().metrics.refusals(Limit::HttpRequestTimeout);
    assert_eq!(refused, 20, "each timed-out head is counted once");
    let (status, _) = http_get(bridge.running().http_addr, "/healthz").await;
    assert_eq!(status, 200);
    bridge.stop().await;
}

#[tokio::test]
async fn a_body_that_stops_half_way_is_closed_with_408() {
    let bridge = start(Duration::from_secs(1), 1024).await;
    let head = format!(
        "POST /api/notifications/send HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"user_id\": \"u1\","
    );
    let mut stream = open(&bridge, &head).await;
    let started = Instant::now();
    let answer = read_until_closed(&mut stream, CLOSED_WITHIN)
        .await
        .expect("the connection with a stalled body is closed");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed before the body's time was up: {:?}",
        started.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"error\":\"timeout\""), "{answer:?}");
    assert_eq!(
        bridge.running().metrics.refusals(Limit::HttpRequestTimeout),
        1
    );
    bridge.stop().await;
}

/// The body's time is one deadline, not a gap between frames: a body
/// trickled a byte every 200 ms (never a 1 s pause) is cut off too.
#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_deadline() {
    let bridge = start(Duration::from_secs(1), 1024).await;
    let head = format!(
        "POST /api/notifications/send HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n"
    );
    let stream = open(&bridge, &head).await;
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for sent in 0..100 {
            if writer.write_all(b" ").await.is_err() {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        100
    });
    let mut answer = String::new();
    let read = tokio::time::timeout(CLOSED_WITHIN, reader.read_to_string(&mut answer)).await;
    assert!(
        read.is_ok(),
        "a trickled body holds the connection: {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let sent = trickle.await.unwrap();
    assert!(
        sent < 50,
        "{sent} of 100 body bytes accepted before the cut"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_and_not_counted() {
    let bridge = start(Duration::from_secs(1), 1024).await;
    let mut stream = open(&bridge, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // Kept alive after the answer; then closed for idling.
    assert!(
        read_until_closed(&mut stream, CLOSED_WITHIN)
            .await
            .is_some(),
        "an idle keep-alive connection is held open"
    );
    assert_eq!(
        bridge.running().metrics.refusals(Limit::HttpRequestTimeout),
        0,
        "an idle keep-alive connection is not hostile input"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn connections_past_max_connections_are_refused_at_accept() {
    const MAX: usize = 4;
    let bridge = start(Duration::from_secs(30), MAX).await;
    let addr = bridge.running().http_addr;
    // MAX kept-alive connections, each known to be served.
    let mut held = Vec::new();
    for _ in 0..MAX {
        let mut stream = open(&bridge, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        held.push(stream);
    }

    let mut extra = TcpStream::connect(addr).await.unwrap();
    let answer = read_until_closed(&mut extra, CLOSED_WITHIN)
        .await
        .expect("the connection past the cap is closed at once");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("http.max_connections"), "{answer:?}");
    assert_eq!(bridge.running().metrics.refusals(Limit::HttpConnections), 1);

    // The WebSocket listener is not affected by a saturated side port.
    let mut client = bridge.connect("while-saturated").await;
    send_text(&mut client, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut client).await["type"], "pong");

    drop(held);
    let deadline = Instant::now() + CLOSED_WITHIN;
    loop {
        let request = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let mut stream = open(&bridge, request).await;
        let answer = read_until_closed(&mut stream, Duration::from_secs(2)).await;
        if answer.as_deref().unwrap_or("").starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection accepted after the held ones closed: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bridge.stop().await;
}

/// Graceful shutdown through the new listener: a request in flight when
/// shutdown begins is answered, an idle keep-alive connection is closed at
/// once (not after `request_timeout`), and nothing new is accepted.
#[tokio::test]
async fn shutdown_answers_the_request_in_flight_and_closes_idle_ones() {
    let bridge = start(Duration::from_secs(30), 1024).await;
    let addr = bridge.running().http_addr;
    let mut idle = open(&bridge, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    let body = r#"{"user_id": "in-flight", "payload": {"n": 1}}"#;
    let (start_of_body, rest) = body.split_at(10);
    let head = format!(
        "POST /api/notifications/send HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{start_of_body}",
        body.len()
    );
    let mut in_flight = open(&bridge, &head).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    bridge.shutdown.cancel();
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(3))
            .await
            .is_some(),
        "the idle keep-alive connection is held through shutdown"
    );
    in_flight.write_all(rest.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut in_flight, CLOSED_WITHIN)
        .await
        .expect("the request in flight is answered, then closed");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer:?}");

    let mut late = None;
    for _ in 0..50 {
        match TcpStream::connect(addr).await {
            Err(e) => {
                late = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(late.is_some(), "the side port still accepts after shutdown");
    bridge.stop().await;
}

/// A kept-alive connection that has been answered 200 (so it holds a
/// descriptor of the daemon until it is dropped).
async fn served_keep_alive(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    stream
}

/// Out of file descriptors (`prlimit` on the real binary), the side port's
/// accept loop backs off instead of spinning, logs rate-limited, and serves
/// the waiting clients once descriptors come back.
#[tokio::test]
async fn the_side_port_accept_loop_survives_running_out_of_file_descriptors() {
    let daemon = common::daemon::Daemon::start(&[]).await;
    let addr = daemon.http_addr;
    // The readiness probes' connections are closed by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.limit_open_files(30);

    // 30 kept-alive connections take the room that is left.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(served_keep_alive(addr).await);
    }
    // 20 more: the kernel completes their TCP handshakes, the daemon cannot
    // accept them yet.
    let waiting: Vec<_> = (0..20)
        .map(|_| tokio::spawn(served_keep_alive(addr)))
        .collect();
    daemon
        .assert_accept_backs_off("side port: accept failed", &waiting)
        .await;

    // Descriptors come back: the waiting clients are served.
    drop(held);
    for task in waiting {
        drop(task.await.unwrap());
    }
    daemon.cleanup().await;
}

/// The point of the cap, on the real binary: a flood of half-sent heads
/// cannot take more than `http.max_connections` descriptors, the rest are
/// answered 503 at once, the held ones are closed after `request_timeout`,
/// and the WebSocket listener accepts throughout.
#[tokio::test]
async fn a_flood_of_half_sent_heads_takes_at_most_max_connections_descriptors() {
    const FLOOD: usize = 2_000;
    const MAX: usize = 500;
    let daemon = common::daemon::Daemon::start(&[
        ("NOTIFY_BRIDGE_HTTP__MAX_CONNECTIONS", "500"),
        ("NOTIFY_BRIDGE_HTTP__REQUEST_TIMEOUT", "2s"),
    ])
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = daemon.open_fds();
    let addr = daemon.http_addr;
    let started = Instant::now();
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.ok()?;
                let _ = stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    .await;
                let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await?;
                Some((answer.starts_with("HTTP/1.1 503"), started.elapsed()))
            })
        })
        .collect();
    let mut peak = baseline;
    while flood.iter().any(|t| !t.is_finished()) && started.elapsed() < Duration::from_secs(1) {
        peak = peak.max(daemon.open_fds());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = daemon.connect("during-the-flood").await;
    send_text(&mut client, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut client).await["type"], "pong");

    let (mut refused, mut closed_at) = (0, Duration::ZERO);
    for task in flood {
        let (was_503, at) = task
            .await
            .unwrap()
            .expect("every socket is answered or closed");
        if was_503 {
            refused += 1;
        } else {
            closed_at = closed_at.max(at);
        }
    }
    peak = peak.max(daemon.open_fds());
    eprintln!(
        "{FLOOD} half-sent heads, max_connections {MAX}: descriptors {baseline} -> peak {peak}, \
         {refused} answered 503, the rest closed by {closed_at:?}"
    );
    assert!(
        peak <= baseline + MAX + 20,
        "peak {peak} descriptors (baseline {baseline})"
    );
    assert!(refused >= FLOOD - MAX, "only {refused} of {FLOOD} refused");
    assert!(
        closed_at < Duration::from_secs(8),
        "held heads closed only by {closed_at:?}"
    );
    drop(client);
    daemon.cleanup().await;
}
