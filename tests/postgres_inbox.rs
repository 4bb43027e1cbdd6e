//! A real bridge with `inbox.store = "postgres"` against the real broker
//! and the PostgreSQL of scripts/postgres: offline messages are stored and
//! replayed with `since` after a restart; an unreachable database stops
//! startup naming `inbox.postgres_url`.

mod common;
mod pg;

use std::time::Duration;

use common::*;
use notify_bridge::config::{Config, InboxStoreKind};
use serde_json::{json, Value};

fn with_postgres(url: String) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.inbox.enabled = true;
        c.inbox.store = InboxStoreKind::Postgres;
        c.inbox.postgres_url = Some(url);
    }
}

async fn connect_since(bridge: &Bridge, user: &str, since: u64) -> (Client, Value) {
    common::inbox::connect_since(bridge, user, Some(&since.to_string())).await
}

async fn wait_for_stored(bridge: &Bridge, at_least: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bridge.running().metrics.inbox_stored.get() < at_least {
        assert!(tokio::time::Instant::now() < deadline, "not stored in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn offline_messages_are_stored_in_postgres_and_replayed_after_a_restart() {
    let Some(db) = pg::fresh_schema().await else {
        return;
    };
    let mut config = test_config();
    with_postgres(db.clone())(&mut config);
    let (queue, exchange) = (config.amqp.queue.clone(), config.amqp.exchange.clone());
    let bridge = Bridge::start_unready(config).await;
    bridge.wait_ready().await;
    let publisher = Publisher::connect().await;
    let bodies =
        (0..5).map(|i| format!(r#"{{"user_id":"pg-off","id":"pg-{i}","payload":{{"n":{i}}}}}"#));
    publisher.publish_all(&exchange, bodies).await;
    wait_for_stored(&bridge, 5).await;
    // Stop without deleting the queue and exchange: the same instance comes back.
    bridge.shutdown.cancel();
    let mut bridge = bridge;
    bridge.running.take().unwrap().wait().await;

    let mut again = test_config();
    with_postgres(db.clone())(&mut again);
    again.amqp.queue = queue;
    again.amqp.exchange = exchange;
    let bridge = Bridge::start_unready(again).await;
    bridge.wait_ready().await;
    let (mut client, counts) = connect_since(&bridge, "pg-off", 2).await;
    assert_eq!(counts, json!({"type": "inbox", "total": 5, "unread": 5}));
    for seq in 3..=5u64 {
        let frame = next_json(&mut client).await;
        assert_eq!(
            (frame["seq"].as_u64(), frame["id"].clone()),
            (Some(seq), json!(format!("pg-{}", seq - 1))),
            "{frame}"
        );
        assert_eq!(frame["payload"], json!({"n": seq - 1}));
    }
    // A live message after the replay carries the next seq.
    let live = r#"{"user_id":"pg-off","id":"pg-5","payload":{"n":5}}"#;
    bridge.publish(&publisher, live).await;
    assert_eq!(next_json(&mut client).await["seq"], 6);
    assert_silent(&mut client, Duration::from_millis(300)).await;
    // The rows are in PostgreSQL, not in a SQLite file.
    let rows: i64 = pg::connect(&db)
        .await
        .query_one(
            "SELECT COUNT(*) FROM inbox_entries WHERE user_id = 'pg-off'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 6);
    bridge.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_stops_startup_naming_inbox_postgres_url() {
    let mut config = test_config();
    let closed = free_port();
    with_postgres(format!("postgres://nb:hunter2@127.0.0.1:{closed}/nb"))(&mut config);
    let err = notify_bridge::run(config, tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .expect("an unreachable database must stop startup");
    assert!(
        err.downcast_ref::<notify_bridge::config::ConfigError>()
            .is_some(),
        "{err:#}"
    );
    let text = format!("{err:#}");
    assert!(text.contains("inbox.postgres_url"), "{text}");
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
}

/// The SQLite test of the same name, on PostgreSQL: reconnects with
/// `since` while 1,000 messages stream in see exactly 1..=1000.
#[tokio::test]
async fn reconnecting_with_since_during_a_stream_loses_and_duplicates_nothing() {
    let Some(db) = pg::fresh_schema().await else {
        return;
    };
    let bridge = Bridge::start_with(with_postgres(db)).await;
    common::inbox::since_reconnects_during_a_stream_lose_and_duplicate_nothing(&bridge).await;
    bridge.stop().await;
}

/// The HTTP listing and PATCH read and change the PostgreSQL store, and a
/// change reaches the user's tab as the counts frame.
#[tokio::test]
async fn http_list_and_patch_on_postgres() {
    let Some(db) = pg::fresh_schema().await else {
        return;
    };
    let bridge = Bridge::start_with(with_postgres(db)).await;
    let publisher = Publisher::connect().await;
    let bodies = (0..6).map(|i| format!(r#"{{"user_id":"h","id":"h-{i}","payload":{i}}}"#));
    publisher
        .publish_all(&bridge.config.amqp.exchange, bodies)
        .await;
    wait_for_stored(&bridge, 6).await;
    let me = format!("Bearer {}", token("h", &[]));
    let auth = [("authorization", me.as_str())];
    let (mut tab, _) = connect_since(&bridge, "h", 6).await;
    let addr = bridge.running().http_addr;
    let path = "/api/me/notifications?limit=2&before=6";
    let list = http_request(addr, "GET", path, &auth, "").await;
    assert_eq!(list.status, 200, "{}", list.body);
    let list = list.json();
    assert_eq!(
        (list["total"].as_u64(), list["unread"].as_u64()),
        (Some(6), Some(6))
    );
    assert_eq!(listed_seqs(&list), vec![5, 4]);
    let body = r#"{"action":"mark_read","ids":["h-0","h-1","nope"]}"#;
    let patched = http_request(addr, "PATCH", "/api/me/notifications", &auth, body).await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.json(), json!({"total": 6, "unread": 4}));
    assert_eq!(
        next_json(&mut tab).await,
        json!({"type": "inbox", "total": 6, "unread": 4})
    );
    bridge.stop().await;
}

/// The real binary: an unreachable database exits 2 (a configuration
/// error), naming the key and not the password.
#[tokio::test]
async fn the_binary_exits_2_when_the_database_cannot_be_reached() {
    let dir = common::daemon::TempDir::new();
    let mut command = common::daemon::bridge_command(dir.path());
    let url = format!("postgres://nb:hunter2@127.0.0.1:{}/nb", free_port());
    command
        .env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET)
        .env("NOTIFY_BRIDGE_WEBSOCKET__LISTEN", "127.0.0.1:0")
        .env("NOTIFY_BRIDGE_HTTP__LISTEN", "127.0.0.1:0")
        .env("NOTIFY_BRIDGE_INBOX__ENABLED", "true")
        .env("NOTIFY_BRIDGE_INBOX__STORE", "postgres")
        .env("NOTIFY_BRIDGE_INBOX__POSTGRES_URL", url);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the binary ends in time")
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("inbox.postgres_url"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
