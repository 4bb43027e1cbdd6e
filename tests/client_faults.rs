//! Clients that go bad, against the real binary: 1,000 sockets whose peer
//! vanishes without a close (it stops reading and never answers a ping)
//! and 1,000 that stop reading while a firehose channel is addressed to
//! them. Both kinds are closed within the contract's bounds (two ping
//! intervals, or at once when the send queue is full), the bridge's memory
//! returns to where it was, and other users keep getting every message.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{daemon::*, *};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::{net::TcpSocket, time::Instant};
use tokio_tungstenite::tungstenite::Message;

const HEALTHY: u64 = 50;
const DEAD: u64 = 1000;
const SLOW: u64 = 1000;
const PING_INTERVAL: Duration = Duration::from_secs(1);

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Connects `user` and reads `welcome`; the caller then never reads again.
/// A small receive buffer makes a stopped reader fill up quickly.
async fn connect_then_stop_reading(daemon: &Daemon, user: &str, join: Option<&str>) -> Client {
    let mut url = format!("ws://{}/ws?token={}", daemon.ws_addr, token(user, &[]));
    if let Some(channel) = join {
        url.push_str(&format!("&channel={channel}"));
    }
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(daemon.ws_addr).await.unwrap();
    let (mut client, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake accepted");
    let welcome = next_json(&mut client).await;
    assert_eq!(welcome["type"], "welcome");
    client
}

fn gauge(metrics_text: &str, name: &str) -> f64 {
    metric(metrics_text, name)
}

async fn metrics(daemon: &Daemon) -> String {
    http_get(daemon.http_addr, "/metrics").await.1
}

/// Waits until the connections gauge reads `want`; returns how long it took.
async fn connections_become(daemon: &Daemon, want: u64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let now = gauge(&metrics(daemon).await, "notify_bridge_connections");
        if now == want as f64 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "connections at {now}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn p99(samples: &mut [u64]) -> u64 {
    samples.sort_unstable();
    samples
        .get((samples.len() * 99 / 100).min(samples.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

/// RSS once the bridge has handed freed pages back (it trims the heap a few
/// seconds after a crowd disconnected): the first reading within 6 MiB of
/// `baseline`, or the last one after 15 s.
async fn rss_settled(daemon: &Daemon, baseline: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rss = daemon.rss_kib();
        if rss <= baseline + 6 * 1024 || Instant::now() >= deadline {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What one round of 1,000 dead and 1,000 slow clients did.
struct Round {
    dead_connect: Duration,
    dead_closed_after: Duration,
    slow_closed_after: Duration,
    slow_closes: f64,
    rss_peak: u64,
    dead_phase_ended_us: u64,
}

/// Connects the dead clients and waits until the bridge dropped them all,
/// then the slow ones on a firehose until it closed them all.
async fn bad_clients_round(daemon: &Daemon, round: u64) -> Round {
    // Dead peers: connected, then silent; each is pinged and never answers.
    let mut dead = Vec::new();
    let connecting = Instant::now();
    for user in 1..=DEAD {
        dead.push(connect_then_stop_reading(daemon, &format!("d{round}-{user}"), None).await);
    }
    let dead_connect = connecting.elapsed();
    let mut rss_peak = daemon.rss_kib();
    let dead_closed_after = connections_become(daemon, HEALTHY, Duration::from_secs(30)).await;
    let dead_phase_ended_us = micros_now();

    // Slow readers on a firehose channel: 1 KiB frames at 200/s fill their
    // queue and socket buffers within a second.
    let mut slow = Vec::new();
    for user in 1..=SLOW {
        slow.push(
            connect_then_stop_reading(daemon, &format!("s{round}-{user}"), Some("firehose")).await,
        );
    }
    let closes_before = gauge(
        &metrics(daemon).await,
        "notify_bridge_slow_client_closes_total",
    );
    let firehose_stop = Arc::new(AtomicBool::new(false));
    let firehose = {
        let (stop, exchange) = (firehose_stop.clone(), daemon.place.exchange.clone());
        tokio::spawn(async move {
            let publisher = Publisher::connect().await;
            let padding = "x".repeat(1024);
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Relaxed) {
                tick.tick().await;
                let body =
                    format!(r#"{{"channel":"firehose","store":false,"payload":"{padding}"}}"#);
                publisher.publish_all(&exchange, [body]).await;
            }
        })
    };
    rss_peak = rss_peak.max(daemon.rss_kib());
    let slow_closed_after = connections_become(daemon, HEALTHY, Duration::from_secs(30)).await;
    rss_peak = rss_peak.max(daemon.rss_kib());
    firehose_stop.store(true, Relaxed);
    firehose.await.unwrap();
    let slow_closes = gauge(
        &metrics(daemon).await,
        "notify_bridge_slow_client_closes_total",
    ) - closes_before;
    drop(dead);
    drop(slow);
    Round {
        dead_connect,
        dead_closed_after,
        slow_closed_after,
        slow_closes,
        rss_peak,
        dead_phase_ended_us,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_slow_clients_are_closed_in_bounds_and_cost_nothing_afterwards() {
    let ping = format!("{}s", PING_INTERVAL.as_secs());
    let daemon = Daemon::start(&[
        ("NOTIFY_BRIDGE_WEBSOCKET__PING_INTERVAL", &ping),
        ("NOTIFY_BRIDGE_WEBSOCKET__SEND_QUEUE", "32"),
        ("NOTIFY_BRIDGE_WEBSOCKET__PUBLIC_CHANNELS", "firehose"),
        (
            "NOTIFY_BRIDGE_LOG__LEVEL",
            "info,notify_bridge::memory=debug",
        ),
    ])
    .await;

    // Healthy users read everything and record each frame's latency.
    let latencies: Arc<Mutex<Vec<(u64, u64)>>> = Default::default(); // (sent µs, latency µs)
    let received: Arc<Mutex<std::collections::HashSet<u64>>> = Default::default();
    let mut readers = Vec::new();
    for user in 1..=HEALTHY {
        let mut client = daemon.connect(&format!("h{user}")).await;
        let (latencies, received) = (latencies.clone(), received.clone());
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = client.next().await {
                if let Message::Text(text) = message {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] == "notification" {
                        let sent = frame["payload"]["t"].as_u64().unwrap();
                        latencies
                            .lock()
                            .unwrap()
                            .push((sent, micros_now().saturating_sub(sent)));
                        received
                            .lock()
                            .unwrap()
                            .insert(frame["payload"]["i"].as_u64().unwrap());
                    }
                }
            }
        }));
    }

    // A steady 500 msg/s to the healthy users for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let steady = {
        let (stop, exchange) = (stop.clone(), daemon.place.exchange.clone());
        tokio::spawn(async move {
            let publisher = Publisher::connect().await;
            let mut i = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Relaxed) {
                tick.tick().await;
                let t = micros_now();
                let bodies: Vec<String> = (i..i + 10)
                    .map(|i| {
                        format!(
                            r#"{{"user_id":"h{}","payload":{{"i":{i},"t":{t}}}}}"#,
                            i % HEALTHY + 1
                        )
                    })
                    .collect();
                i += 10;
                publisher.publish_all(&exchange, bodies).await;
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = daemon.rss_kib();
    let fds_before = daemon.open_fds();
    let fault_started_us = micros_now();

    // Two rounds: memory after the second must not exceed the first's
    // (a leak grows with every round; an allocator keeping pages does not).
    let first = bad_clients_round(&daemon, 1).await;
    let rss_after_first = rss_settled(&daemon, rss_before).await;
    let second = bad_clients_round(&daemon, 2).await;
    let fault_ended_us = micros_now();

    // Memory and files back where they were; the healthy users got everything.
    let rss_after = rss_settled(&daemon, rss_before).await;
    let fds_after = daemon.open_fds();
    stop.store(true, Relaxed);
    let published = steady.await.unwrap();
    eventually(Duration::from_secs(10), "every steady message", || {
        received.lock().unwrap().len() as u64 >= published
    })
    .await;
    let (mut calm, mut during, mut dead_phase, mut slow_phase) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &(sent, latency) in latencies.lock().unwrap().iter() {
        if (fault_started_us..fault_ended_us).contains(&sent) {
            during.push(latency);
            if sent < first.dead_phase_ended_us {
                dead_phase.push(latency);
            } else {
                slow_phase.push(latency);
            }
        } else {
            calm.push(latency);
        }
    }
    let report = serde_json::json!({
        "fault": "1,000 dead + 1,000 slow clients",
        "healthy_users": HEALTHY,
        "steady_published": published,
        "steady_received": received.lock().unwrap().len(),
        "dead_connect_seconds": [first.dead_connect.as_secs_f64(), second.dead_connect.as_secs_f64()],
        "dead_all_closed_seconds_after_last_connect": [first.dead_closed_after.as_secs_f64(), second.dead_closed_after.as_secs_f64()],
        "slow_all_closed_seconds_after_firehose": [first.slow_closed_after.as_secs_f64(), second.slow_closed_after.as_secs_f64()],
        "slow_closes_1013": [first.slow_closes, second.slow_closes],
        "rss_kib_before": rss_before,
        "rss_kib_peak": [first.rss_peak, second.rss_peak],
        "rss_kib_after_first_round": rss_after_first,
        "rss_kib_after": rss_after,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "healthy_p99_ms_calm": p99(&mut calm) as f64 / 1000.0,
        "healthy_p99_ms_during_faults": p99(&mut during) as f64 / 1000.0,
        "healthy_p99_ms_dead_phase": p99(&mut dead_phase) as f64 / 1000.0,
        "healthy_p99_ms_slow_phase": p99(&mut slow_phase) as f64 / 1000.0,
    });
    eprintln!("FAULT-RESULT {report}");
    for line in daemon.log().lines().filter(|l| l.contains("trimmed")) {
        eprintln!("{line}");
    }

    // Dead peers: dropped once two ping intervals pass without an answer; the
    // first ping comes within one interval, so three intervals bound it (plus
    // a second for a busy CI machine).
    for round in [&first, &second] {
        assert!(
            round.dead_closed_after <= PING_INTERVAL * 3 + Duration::from_secs(1),
            "{report}"
        );
        // Slow readers: closed 1013 when their queue fills, or dropped when
        // a write stalls for two intervals, whichever comes first (the
        // debug build is usually too slow to fill the queue first).
        assert!(
            round.slow_closed_after <= PING_INTERVAL * 2 + Duration::from_secs(2),
            "{report}"
        );
    }
    assert_eq!(received.lock().unwrap().len() as u64, published, "{report}");
    assert_eq!(fds_after, fds_before, "{report}");
    for rss in [rss_after_first, rss_after] {
        assert!(
            rss <= rss_before + 6 * 1024,
            "RSS did not come back near where it was: {report}"
        );
    }
    assert!(
        p99(&mut during) < 1_000_000,
        "healthy users' p99 during the faults above 1 s: {report}"
    );
    drop(readers);
    daemon.cleanup().await;
}
