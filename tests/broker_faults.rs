//! The broker goes away (or was never there): WebSocket clients stay
//! connected, readiness says why, consuming resumes when the broker is back,
//! and no confirmed message is lost — whether the broker's connections are
//! force-closed, the broker app is stopped and started, or the node is
//! killed with SIGKILL and started again.
//!
//! These tests close every connection on the broker or stop it, so this is
//! its own test binary (cargo runs test binaries one after another) and its
//! tests take one lock so they never overlap. The outage tests need our own
//! node (`scripts/rabbitmq start` started it); they stream 20,000 messages at
//! 2,000/s by default. `NOTIFY_BRIDGE_FAULTS_LONG=1` runs the long version
//! (100,000 messages, three outages); each prints a `FAULT-RESULT` line with
//! its counts for docs/reliability.md.

mod common;
#[path = "broker_faults/stream.rs"]
mod stream;

use std::time::Duration;

use common::{
    scripts::{ours_to_stop, run_script},
    *,
};
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::Mutex, time::Instant};

/// Serializes the tests of this binary.
static BROKER: Mutex<()> = Mutex::const_new(());

/// `rabbitmqctl ARGS` against our node.
fn rabbitmqctl(args: &[&str]) -> String {
    run_script("rabbitmq", &[&["ctl"], args].concat())
}

/// What a watcher saw while the broker connection was cut.
#[derive(Debug, Default)]
struct Outage {
    not_ready_reason: Option<String>,
    saw_disconnected_gauge: bool,
}

#[tokio::test]
async fn a_lost_broker_connection_is_reestablished_and_clients_stay_open() {
    let _serial = BROKER.lock().await;
    let bridge = Bridge::start().await;
    let mut publisher = Publisher::connect().await;
    let mut client = bridge.connect("1").await;
    let metrics = bridge.running().metrics.clone();
    let readiness = bridge.running().readiness.clone();

    bridge
        .publish(&publisher, r#"{"user_id":1,"id":"before","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut client).await["id"], "before");
    assert_eq!(metrics.amqp_connected.get(), 1);
    assert_eq!(metrics.amqp_reconnects.get(), 0);

    // Cut every broker connection while watching readiness closely: the
    // bridge waits at least its first backoff (200 ms) before reconnecting,
    // so a 5 ms poll cannot miss the outage.
    let cut = tokio::task::spawn_blocking(|| rabbitmqctl(&["close_all_connections", "test"]));
    let mut outage = Outage::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match readiness.get() {
            Err(reason) => {
                outage.not_ready_reason.get_or_insert(reason);
            }
            Ok(()) if outage.not_ready_reason.is_some() && cut.is_finished() => break,
            Ok(()) => {}
        }
        if metrics.amqp_connected.get() == 0 {
            outage.saw_disconnected_gauge = true;
        }
        assert!(
            Instant::now() < deadline,
            "not ready again within 30 s: {outage:?}, now {:?}",
            readiness.get()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let said = cut.await.unwrap();
    assert!(said.contains("Closed"), "{said}");
    let reason = outage.not_ready_reason.clone().unwrap();
    assert!(reason.contains("broker"), "readiness reason: {reason:?}");
    assert!(outage.saw_disconnected_gauge, "{outage:?}");
    assert_eq!(metrics.amqp_connected.get(), 1);
    assert_eq!(metrics.amqp_reconnects.get(), 1);
    let (status, body) = http_get(bridge.running().http_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let rendered = metrics.render();
    assert_eq!(
        metric(&rendered, "notify_bridge_amqp_reconnects_total"),
        1.0
    );
    assert_eq!(metric(&rendered, "notify_bridge_amqp_connected"), 1.0);

    // The WebSocket client never noticed: no close, and it still answers.
    assert_silent(&mut client, Duration::from_millis(100)).await;
    send_text(&mut client, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut client).await, json!({"type": "pong"}));

    // The test publisher lost its connection too.
    let old_publisher = publisher.connection.status().clone();
    eventually(
        Duration::from_secs(5),
        "the publisher's connection closed",
        || !old_publisher.connected(),
    )
    .await;
    publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, r#"{"user_id":1,"id":"after","payload":2}"#)
        .await;
    let frame = next_json_within(&mut client, Duration::from_secs(30))
        .await
        .expect("a message published after the reconnect arrives");
    assert_eq!(frame["id"], "after");
    assert_eq!(metrics.amqp_reconnects.get(), 1);
    drop(client);
    bridge.stop().await;
}

#[tokio::test]
async fn an_unreachable_broker_at_start_does_not_stop_the_bridge() {
    let _serial = BROKER.lock().await;
    let port = free_port();
    let mut config = test_config();
    config.amqp.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    config.amqp.reconnect_max_backoff = Duration::from_secs(1);
    let bridge = Bridge::start_unready(config).await;
    let running = bridge.running();

    // Not ready, and it says why once the first attempt failed.
    let readiness = running.readiness.clone();
    eventually(
        Duration::from_secs(10),
        "a failed connect attempt",
        || matches!(readiness.get(), Err(reason) if reason.contains("cannot connect")),
    )
    .await;
    assert_eq!(running.metrics.amqp_connected.get(), 0);

    // WebSocket clients are served anyway.
    let mut client = bridge.connect("1").await;
    send_text(&mut client, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut client).await, json!({"type": "pong"}));

    let (status, body) = http_get(running.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).expect("a JSON body");
    assert_eq!(body["error"], "not_ready", "{body}");
    let detail = body["detail"].as_str().expect("a detail string");
    assert!(detail.contains("broker"), "{body}");
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    let (status, _) = http_get(running.http_addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, metrics_text) = http_get(running.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&metrics_text, "notify_bridge_amqp_connected"), 0.0);

    // The broker appears on that port: the bridge connects by itself (the
    // backoff is capped at 1 s here), declares its topology and delivers to
    // the client that connected while it was away.
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the probed port is still free");
    let proxy = spawn_proxy(listener, broker_addr());
    bridge.wait_ready().await;
    assert_eq!(running.metrics.amqp_connected.get(), 1);
    assert_eq!(
        running.metrics.amqp_reconnects.get(),
        0,
        "the first connection is not a reconnect"
    );
    let (status, _) = http_get(running.http_addr, "/readyz").await;
    assert_eq!(status, 200);
    let publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, r#"{"user_id":1,"id":"late","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut client).await["id"], "late");

    drop(client);
    bridge.stop().await;
    proxy.abort();
}

/// How a test takes the broker away.
#[derive(Clone, Copy, Debug)]
enum BrokerFault {
    /// `rabbitmqctl close_all_connections`: the broker stays up.
    ForceClose,
    /// `rabbitmqctl stop_app`, a second's pause, `start_app`.
    StopApp,
    /// SIGKILL of the node's Erlang VM, then `scripts/rabbitmq start`.
    Kill,
}

impl BrokerFault {
    fn name(self) -> &'static str {
        match self {
            BrokerFault::ForceClose => "connections force-closed",
            BrokerFault::StopApp => "stop_app / start_app",
            BrokerFault::Kill => "kill -9 and restart",
        }
    }

    /// Takes the broker away and brings it back; blocking.
    fn inflict(self) {
        match self {
            BrokerFault::ForceClose => {
                rabbitmqctl(&["close_all_connections", "fault test"]);
            }
            BrokerFault::StopApp => {
                rabbitmqctl(&["stop_app"]);
                std::thread::sleep(Duration::from_secs(1));
                rabbitmqctl(&["start_app"]);
            }
            BrokerFault::Kill => {
                run_script("rabbitmq", &["kill"]);
                run_script("rabbitmq", &["start"]);
            }
        }
    }
}

/// The outage tests need to stop the broker: only our own node can be.
fn assert_our_node() {
    if let Err(why) = ours_to_stop("rabbitmq", &amqp_url()) {
        panic!("the outage tests stop and kill the broker: {why}");
    }
}

/// Streams confirmed messages to connected users through `outages`, and
/// checks the contract's promises; returns the report line.
async fn confirmed_stream_through(outages: BrokerFault) -> Value {
    let long = std::env::var_os("NOTIFY_BRIDGE_FAULTS_LONG").is_some();
    let (total, rate, users, faults) = if long {
        (100_000u64, 2_000u64, 100u64, 3u64)
    } else {
        (20_000, 2_000, 100, 1)
    };
    assert_our_node();
    let bridge = Bridge::start_with(|config| {
        // The default cap is 30 s; a test should not wait that long.
        config.amqp.reconnect_max_backoff = Duration::from_secs(2);
    })
    .await;
    let running = bridge.running();
    let prefetch = u64::from(bridge.config.amqp.prefetch);
    let received = std::sync::Arc::new(stream::Received::default());
    let mut listeners = Vec::new();
    for user in 1..=users {
        let client = bridge.connect(&user.to_string()).await;
        listeners.push(stream::Listener::spawn(
            client,
            user,
            users,
            received.clone(),
        ));
    }
    let readiness = std::sync::Arc::new(stream::ReadinessLog::default());
    let watcher = stream::watch_readiness(running.http_addr, readiness.clone());

    let tally = std::sync::Arc::new(stream::PublishTally::default());
    let started = Instant::now();
    let publisher = stream::publish_until_confirmed(
        bridge.config.amqp.exchange.clone(),
        users,
        total,
        rate,
        tally.clone(),
    );
    // Outages at evenly spaced points of the stream.
    let mut outage_seconds = Vec::new();
    for k in 1..=faults {
        let at = total * k / (faults + 1);
        let confirmed = || tally.confirmed.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            stream::wait_until(Duration::from_secs(120), || confirmed() >= at).await,
            "the stream stalled at {} confirmed before outage {k}",
            confirmed()
        );
        let began = Instant::now();
        tokio::task::spawn_blocking(move || outages.inflict())
            .await
            .unwrap();
        // Down until the bridge consumes again.
        bridge.wait_ready().await;
        outage_seconds.push(began.elapsed().as_secs_f64());
    }
    tokio::time::timeout(Duration::from_secs(180), publisher)
        .await
        .expect("every message confirmed within 180 s")
        .unwrap();
    let publish_seconds = started.elapsed().as_secs_f64();
    let all_arrived =
        stream::wait_until(Duration::from_secs(60), || received.distinct() >= total).await;
    // Let late duplicates show themselves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut open = 0;
    for listener in listeners {
        open += u64::from(listener.finish().await);
    }
    readiness
        .stop
        .store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.await.unwrap();

    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let delivered = received.distinct();
    let duplicates = received.duplicates();
    let metrics = &running.metrics;
    let report = json!({
        "fault": outages.name(),
        "outages": faults,
        "sent": tally.sent.load(relaxed),
        "confirmed": tally.confirmed.load(relaxed),
        "republished_by_publisher": tally.retried.load(relaxed),
        "delivered": delivered,
        "duplicated": duplicates.redelivered + duplicates.republished,
        "duplicated_by_redelivery": duplicates.redelivered,
        "duplicated_by_republish": duplicates.republished,
        "dead_lettered": metrics.messages_invalid.get(),
        "lost": total - delivered,
        "misrouted": received.misrouted.load(relaxed),
        "sockets_open_after": open,
        "readyz": *readiness.seen.lock().unwrap(),
        "bridge_reconnects": metrics.amqp_reconnects.get(),
        "outage_seconds": outage_seconds,
        "publish_seconds": publish_seconds,
    });
    println!("FAULT-RESULT {report}");

    assert!(all_arrived, "lost messages: {report}");
    assert_eq!(delivered, total, "{report}");
    assert_eq!(received.misrouted.load(relaxed), 0, "{report}");
    assert_eq!(open, users, "every socket stayed open: {report}");
    assert_eq!(received.closed.load(relaxed), 0, "{report}");
    assert_eq!(metrics.messages_invalid.get(), 0, "{report}");
    assert!(
        duplicates.redelivered <= prefetch * faults,
        "redelivered duplicates above the prefetch ({prefetch}) per outage: {report}"
    );
    assert!(metrics.amqp_reconnects.get() >= faults, "{report}");
    let seen = readiness.seen.lock().unwrap().clone();
    assert_eq!(seen.first(), Some(&200), "{report}");
    assert_eq!(seen.last(), Some(&200), "{report}");
    assert!(seen.contains(&503), "/readyz never said 503: {report}");
    bridge.stop().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_when_the_broker_connections_are_force_closed() {
    let _serial = BROKER.lock().await;
    confirmed_stream_through(BrokerFault::ForceClose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_when_the_broker_app_stops_and_starts() {
    let _serial = BROKER.lock().await;
    confirmed_stream_through(BrokerFault::StopApp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_when_the_broker_is_killed_and_restarted() {
    let _serial = BROKER.lock().await;
    confirmed_stream_through(BrokerFault::Kill).await;
}
