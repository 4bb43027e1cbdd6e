//! The real binary killed with SIGKILL and started again: messages
//! published while it was down wait in its queue and are consumed after the
//! restart, nothing is lost from the queue or consumed twice, and with the
//! inbox every published message ends up stored exactly once.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{daemon::*, *};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const ADMIN_KEY: &str = "crash-admin-key";

async fn get(addr: std::net::SocketAddr, path: &str) -> Option<Value> {
    let auth = format!("Bearer {ADMIN_KEY}");
    let reply = http_request(addr, "GET", path, &[("authorization", &auth)], "").await;
    serde_json::from_str(&reply.body).ok()
}

async fn stored_total(addr: std::net::SocketAddr) -> Option<u64> {
    get(addr, "/api/users/crash/notifications?limit=1").await?["total"].as_u64()
}

#[tokio::test]
async fn kill_9_during_a_stream_loses_nothing_stored_and_stores_nothing_twice() {
    let place = Placement::new();
    let env = [
        ("NOTIFY_BRIDGE_HTTP__ADMIN_KEYS", ADMIN_KEY),
        ("NOTIFY_BRIDGE_INBOX__ENABLED", "true"),
        ("NOTIFY_BRIDGE_INBOX__PATH", "store/inbox.db"),
        // Above the stream's size, so retention drops nothing.
        ("NOTIFY_BRIDGE_INBOX__MAX_PER_USER", "5000"),
    ];
    let mut first = Daemon::start_at(place.clone(), &env).await;

    let total = 2000u64;
    let publisher = Publisher::connect().await;
    let mut killed_at = None;
    for start in (0..total).step_by(100) {
        let bodies = (start..start + 100)
            .map(|i| format!(r#"{{"user_id":"crash","id":"c-{i}","payload":{i}}}"#));
        publisher.publish_all(&place.exchange, bodies).await;
        if killed_at.is_none() {
            if let Some(stored) = stored_total(first.http_addr).await {
                if stored >= 300 {
                    first.kill_9().await;
                    killed_at = Some(stored);
                }
            }
        }
    }
    let killed_at = killed_at.expect("the daemon was killed mid-stream");
    assert!(killed_at < total, "killed too late to prove anything");

    let second = Daemon::start_at(place.clone(), &env).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    while last < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {last} of {total} stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = stored_total(second.http_addr).await.unwrap_or(0);
    }
    // Every id once, seqs exactly 1..=total: no loss, no double store.
    let mut ids = std::collections::HashSet::new();
    let mut seqs = Vec::new();
    let mut before = u64::MAX;
    loop {
        let page = get(
            second.http_addr,
            &format!("/api/users/crash/notifications?limit=500&before={before}"),
        )
        .await
        .unwrap();
        assert_eq!(page["total"], total, "stored more or less than published");
        let items = page["notifications"].as_array().unwrap();
        if items.is_empty() {
            break;
        }
        for item in items {
            assert!(
                ids.insert(item["id"].as_str().unwrap().to_string()),
                "{item}"
            );
            seqs.push(item["seq"].as_u64().unwrap());
        }
        before = *seqs.last().unwrap();
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    assert_eq!(ids.len() as u64, total);
    eprintln!("killed after {killed_at} stored; {total} stored exactly once after restart");

    second.cleanup().await; // the child is killed on drop
}

/// Ids each user's socket received, and how often.
type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// Reads `client`'s notification frames into `seen` until the socket ends.
fn record(mut client: Client, seen: Seen) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(message) = client.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    eprintln!("a reader's socket failed: {e}");
                    break;
                }
            };
            if let Message::Close(frame) = &message {
                eprintln!("a reader's socket closed: {frame:?}");
            }
            if let Message::Text(text) = message {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "notification" {
                    let id = frame["id"].as_str().unwrap().to_string();
                    *seen.lock().unwrap().entry(id).or_default() += 1;
                }
            }
        }
    })
}

/// Waits up to 30 s until `seen` holds `count` ids; a stall panics with
/// what the daemon logged, its message outcomes, the queue's depth and how
/// many readers' sockets ended, so that it says why.
async fn await_received(
    daemon: &Daemon,
    place: &Placement,
    seen: &Seen,
    readers: &[tokio::task::JoinHandle<()>],
    count: u64,
    what: &str,
) -> Duration {
    let started = tokio::time::Instant::now();
    while (seen.lock().unwrap().len() as u64) < count {
        if started.elapsed() > Duration::from_secs(30) {
            let (left, consumers) = queue_depth(&place.queue).await;
            let (_, metrics_text) = http_get(daemon.http_addr, "/metrics").await;
            let outcomes: Vec<&str> = metrics_text
                .lines()
                .filter(|l| l.starts_with("notify_bridge_messages_total"))
                .collect();
            panic!(
                "not within 30 s: {what}: {} of {count} received, {left} left in the queue \
                 with {consumers} consumers, readers ended: {}, {outcomes:?}\n{}",
                seen.lock().unwrap().len(),
                readers.iter().filter(|r| r.is_finished()).count(),
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn kill_9_leaves_unacked_and_later_messages_in_the_queue_for_the_restart() {
    const USERS: u64 = 10;
    const TOTAL: u64 = 3000;
    const KILL_AT: u64 = 1000;
    let place = Placement::new();
    let mut first = Daemon::start_at(place.clone(), &[]).await;
    let before: Seen = Default::default();
    let mut readers = Vec::new();
    for user in 1..=USERS {
        readers.push(record(
            first.connect(&user.to_string()).await,
            before.clone(),
        ));
    }

    // Stream to the first daemon and kill it mid-stream, with deliveries in
    // flight (unacknowledged ones come back to the queue); the stream goes
    // on while it is down, and those messages wait in its queue.
    let exchange = place.exchange.clone();
    let stream = tokio::spawn(async move {
        let publisher = Publisher::connect().await;
        for start in (0..TOTAL).step_by(50) {
            let bodies = (start..start + 50).map(|i| {
                format!(
                    r#"{{"user_id":{},"id":"k-{i}","payload":{i}}}"#,
                    i % USERS + 1
                )
            });
            publisher.publish_all(&exchange, bodies).await;
        }
    });
    await_received(
        &first,
        &place,
        &before,
        &readers,
        KILL_AT,
        "the first deliveries",
    )
    .await;
    first.kill_9().await;
    assert!(first.pid_or_none().is_none(), "the first daemon is gone");
    stream.await.unwrap();
    for reader in readers {
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the killed daemon's sockets end")
            .unwrap();
    }
    let (waiting, consumers) = queue_depth(&place.queue).await;
    assert_eq!(consumers, 0, "nothing consumes while the daemon is down");
    let received_before: u64 = before.lock().unwrap().len() as u64;
    assert!(
        received_before < TOTAL && waiting > 0,
        "killed too late to prove anything: {received_before} received, {waiting} waiting"
    );

    // The restart reaches the broker only once its users are connected, so
    // every waiting message finds its recipient (the contract drops those
    // for users not connected by then).
    let port = free_port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let second =
        Daemon::start_unready_at(place.clone(), &[("NOTIFY_BRIDGE_AMQP__URL", &url)]).await;
    let after: Seen = Default::default();
    let mut readers = Vec::new();
    for user in 1..=USERS {
        readers.push(record(
            second.connect(&user.to_string()).await,
            after.clone(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the probed port is still free");
    let proxy = spawn_proxy(listener, broker_addr());
    second.wait_ready().await;
    let drained = await_received(
        &second,
        &place,
        &after,
        &readers,
        u64::from(waiting),
        "the restart drains its queue",
    )
    .await;

    // The second daemon consumed exactly what waited: nothing lost from the
    // queue, nothing consumed twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (left, _) = queue_depth(&place.queue).await;
    let (_, metrics_text) = http_get(second.http_addr, "/metrics").await;
    let consumed = metric(
        &metrics_text,
        r#"notify_bridge_messages_total{outcome="delivered"}"#,
    ) + metric(
        &metrics_text,
        r#"notify_bridge_messages_total{outcome="no_recipient"}"#,
    ) + metric(
        &metrics_text,
        r#"notify_bridge_messages_total{outcome="invalid"}"#,
    );
    let before = before.lock().unwrap().clone();
    let after = after.lock().unwrap().clone();
    let ids: std::collections::HashSet<&String> = before.keys().chain(after.keys()).collect();
    let both = before.keys().filter(|id| after.contains_key(*id)).count();
    let twice = before
        .values()
        .chain(after.values())
        .filter(|&&n| n > 1)
        .count();
    eprintln!(
        "FAULT-RESULT {}",
        serde_json::json!({
            "fault": "bridge kill -9 and restart",
            "published": TOTAL,
            "received_before_kill": received_before,
            "waiting_in_queue_after_kill": waiting,
            "consumed_after_restart": consumed,
            "delivered_distinct": ids.len(),
            "delivered_by_both": both,
            "lost": TOTAL - ids.len() as u64,
            "queue_left": left,
            "drain_seconds": drained.as_secs_f64(),
        })
    );
    assert_eq!(left, 0, "the queue is empty after the restart");
    assert_eq!(
        consumed,
        f64::from(waiting),
        "consumed what waited, once each"
    );
    assert_eq!(
        metric(&metrics_text, "notify_bridge_amqp_reconnects_total"),
        0.0
    );
    assert_eq!(ids.len() as u64, TOTAL, "every message reached its user");
    assert_eq!(twice, 0, "no daemon delivered a message twice");
    assert!(
        both as u64 <= 200,
        "only deliveries in flight at the kill (at most the prefetch) come again: {both}"
    );
    assert_eq!(
        received_before + u64::from(waiting) - both as u64,
        TOTAL,
        "each message was either acked by the first daemon or waited for the second"
    );
    proxy.abort();
    drop(readers);
    second.cleanup().await;
}
