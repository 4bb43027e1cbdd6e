//! Inbox helpers shared by the SQLite and PostgreSQL inbox tests, so both
//! stores are held to the very same checks.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

use notify_bridge::config::Config;

use super::{eventually, next_json, next_json_within, token, Bridge, Client, Publisher};

/// A SQLite inbox store in a scratch folder that is removed when this is
/// dropped, also when the test panics; the two folders above the store
/// (`store/data/`) do not exist yet, so the bridge must create them (as
/// private folders: tests/inbox_limits.rs checks both).
pub struct ScratchStore(tempfile::TempDir);

impl ScratchStore {
    pub fn new() -> Self {
        Self(
            tempfile::Builder::new()
                .prefix("nb-inbox")
                .tempdir()
                .unwrap(),
        )
    }

    /// The store's path, for `inbox.path` (the same on every call, so a
    /// restarted bridge finds the same store).
    pub fn path(&self) -> PathBuf {
        self.0.path().join("store").join("data").join("inbox.db")
    }
}

/// Turns the inbox on with its SQLite store at `path` (for
/// `Bridge::start_with`; a restarted bridge given the same path finds the
/// same store).
pub fn with_inbox(path: PathBuf) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.inbox.enabled = true;
        c.inbox.path = path;
    }
}

/// Waits until the bridge has stored `at_least` inbox entries, whichever
/// store it uses: publishing confirms only the broker's part.
pub async fn wait_for_stored(bridge: &Bridge, at_least: u64) {
    eventually(Duration::from_secs(30), "inbox entries stored", || {
        bridge.running().metrics.inbox_stored.get() >= at_least
    })
    .await;
}

/// Connects as `user` (with `?since=` when given) and reads `welcome` and
/// the inbox counts frame; the client and the counts.
pub async fn connect_since(bridge: &Bridge, user: &str, since: Option<&str>) -> (Client, Value) {
    let mut url = bridge.ws_url(&format!("/ws?token={}", token(user, &[])));
    if let Some(since) = since {
        url.push_str(&format!("&since={since}"));
    }
    let (mut client, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_json(&mut client).await["type"], "welcome");
    let counts = next_json(&mut client).await;
    assert_eq!(counts["type"], "inbox", "{counts}");
    (client, counts)
}

/// 1,000 stored messages to one user while that user reconnects with
/// `since` = the last seq it saw, reading a few frames each time: the frames
/// across all connections must be exactly seq 1..=1000, no gap, no duplicate.
pub async fn since_reconnects_during_a_stream_lose_and_duplicate_nothing(bridge: &Bridge) {
    let total = 1000u64;
    let exchange = bridge.config.amqp.exchange.clone();
    let producer = tokio::spawn(async move {
        let publisher = Publisher::connect().await;
        // In slices of 50 with a pause, so the reconnects land mid-stream.
        for start in (0..total).step_by(50) {
            let bodies = (start..(start + 50).min(total))
                .map(|i| format!(r#"{{"user_id":"stream","id":"s-{i}","payload":{i}}}"#));
            publisher.publish_all(&exchange, bodies).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let (mut seen, mut last, mut reconnects) = (Vec::new(), 0u64, 0);
    while last < total {
        let since = last.to_string();
        let (mut client, _) = connect_since(bridge, "stream", Some(&since)).await;
        // Read a few frames (or until quiet), then drop the connection.
        let budget = if reconnects < 6 { 120 } else { usize::MAX };
        let mut read = 0;
        while read < budget {
            let Some(frame) = next_json_within(&mut client, Duration::from_secs(5)).await else {
                break;
            };
            assert_ne!(frame["type"], "gap", "unexpected {frame}");
            if frame["type"] == "notification" {
                last = frame["seq"].as_u64().unwrap();
                seen.push(last);
                read += 1;
            }
        }
        reconnects += 1;
        assert!(reconnects < 50, "stuck at {last}");
    }
    producer.await.unwrap();
    assert!(reconnects >= 6, "{reconnects}");
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<_>>(),
        "frames across reconnects must be exactly 1..={total}"
    );
}
