//! The broker goes away (or was never there): WebSocket clients stay
//! connected, readiness says why, and consuming resumes when the broker is
//! back.
//!
//! `close_all_connections` closes every connection on the broker's default
//! vhost, so this is its own test binary (cargo runs test binaries one after
//! another) and its tests take one lock so they never overlap.

mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use common::*;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::Mutex, time::Instant};

/// Serializes the tests of this binary.
static BROKER: Mutex<()> = Mutex::const_new(());

/// `scripts/rabbitmq ctl ARGS` from the repository root; panics on failure.
fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq"))
        .arg("ctl")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run scripts/rabbitmq");
    assert!(
        output.status.success(),
        "scripts/rabbitmq ctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
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

/// Forwards every TCP connection accepted on `listener` to `target`.
fn spawn_proxy(listener: TcpListener, target: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut pipes = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            pipes.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// The broker's address, from the test AMQP URL.
fn broker_addr() -> SocketAddr {
    let url = amqp_url();
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(&url)
        .split('/')
        .next()
        .unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5672")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().expect("the test broker's address")
}

#[tokio::test]
async fn an_unreachable_broker_at_start_does_not_stop_the_bridge() {
    let _serial = BROKER.lock().await;
    // A port nothing listens on.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
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
