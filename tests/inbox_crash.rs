//! The real binary killed with SIGKILL in the middle of a stream: every
//! published message ends up stored exactly once after a restart.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

const ADMIN_KEY: &str = "crash-admin-key";

struct Daemon {
    child: Child,
    http_addr: String,
}

/// Starts the binary with `env` and waits for its "listening" log line.
fn spawn(dir: &Path, env: &[(String, String)]) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_notify-bridge"))
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("NOTIFY_BRIDGE_LOG__LEVEL", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(addr) = line.split("http_addr=").nth(1) {
                    let addr = addr.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.trim_matches('"').to_string());
                    sent = true;
                }
            }
        }
    });
    let http_addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the daemon logs its listening addresses");
    Daemon { child, http_addr }
}

async fn get(addr: &str, path: &str) -> Option<Value> {
    let auth = format!("Bearer {ADMIN_KEY}");
    let reply = http_request(
        addr.parse().ok()?,
        "GET",
        path,
        &[("authorization", &auth)],
        "",
    )
    .await;
    serde_json::from_str(&reply.body).ok()
}

async fn stored_total(addr: &str) -> Option<u64> {
    get(addr, "/api/users/crash/notifications?limit=1").await?["total"].as_u64()
}

#[tokio::test]
async fn kill_9_during_a_stream_loses_nothing_stored_and_stores_nothing_twice() {
    let dir = std::env::temp_dir().join(unique("nb-crash"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = test_config();
    let env: Vec<(String, String)> = [
        ("NOTIFY_BRIDGE_AMQP__URL", amqp_url()),
        ("NOTIFY_BRIDGE_AMQP__EXCHANGE", config.amqp.exchange.clone()),
        ("NOTIFY_BRIDGE_AMQP__QUEUE", config.amqp.queue.clone()),
        ("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET.into()),
        ("NOTIFY_BRIDGE_WEBSOCKET__LISTEN", "127.0.0.1:0".into()),
        ("NOTIFY_BRIDGE_HTTP__LISTEN", "127.0.0.1:0".into()),
        ("NOTIFY_BRIDGE_HTTP__ADMIN_KEYS", ADMIN_KEY.into()),
        ("NOTIFY_BRIDGE_INBOX__ENABLED", "true".into()),
        ("NOTIFY_BRIDGE_INBOX__PATH", "store/inbox.db".into()),
        // Above the stream's size, so retention drops nothing.
        ("NOTIFY_BRIDGE_INBOX__MAX_PER_USER", "5000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let mut first = spawn(&dir, &env);
    // Wait until it consumes (its queue exists and is bound).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while get(&first.http_addr, "/readyz")
        .await
        .and_then(|v| v["status"].as_str().map(String::from))
        .as_deref()
        != Some("ready")
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let total = 2000u64;
    let publisher = Publisher::connect().await;
    let mut killed_at = None;
    for start in (0..total).step_by(100) {
        let bodies = (start..start + 100)
            .map(|i| format!(r#"{{"user_id":"crash","id":"c-{i}","payload":{i}}}"#));
        publisher.publish_all(&config.amqp.exchange, bodies).await;
        if killed_at.is_none() {
            if let Some(stored) = stored_total(&first.http_addr).await {
                if stored >= 300 {
                    first.child.kill().unwrap(); // SIGKILL
                    first.child.wait().unwrap();
                    killed_at = Some(stored);
                }
            }
        }
    }
    let killed_at = killed_at.expect("the daemon was killed mid-stream");
    assert!(killed_at < total, "killed too late to prove anything");

    let mut second = spawn(&dir, &env);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    while last < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {last} of {total} stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = stored_total(&second.http_addr).await.unwrap_or(0);
    }
    // Every id once, seqs exactly 1..=total: no loss, no double store.
    let mut ids = std::collections::HashSet::new();
    let mut seqs = Vec::new();
    let mut before = u64::MAX;
    loop {
        let page = get(
            &second.http_addr,
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

    second.child.kill().unwrap();
    second.child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let bridge = Bridge {
        config,
        running: None,
        shutdown: Default::default(),
    };
    bridge.stop().await; // deletes the test queue and exchange
}
