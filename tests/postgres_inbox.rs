//! A real bridge with `inbox.store = "postgres"` against the real broker
//! and the PostgreSQL of scripts/postgres: offline messages are stored and
//! replayed with `since` after a restart; a database unreachable at
//! startup is retried with `/readyz` 503 until it answers.

mod common;
mod pg;

use std::time::Duration;

use common::{inbox::wait_for_stored, *};
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
    let mut bridge = bridge;
    bridge.stop_keeping_topology().await;

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

/// CONTRACT.md: "an unreachable database at startup is retried like the
/// broker, with `/readyz` 503". The database appears later (a proxy opens
/// on the port the bridge was given) and the bridge then migrates it and
/// stores.
#[tokio::test]
async fn an_unreachable_database_at_startup_is_retried_with_readyz_503() {
    let Some(db) = pg::fresh_schema().await else {
        return;
    };
    let port = free_port();
    let server: url::Url = db.parse().unwrap();
    let target = format!("{}:{}", server.host_str().unwrap(), server.port().unwrap());
    let mut via_port = server.clone();
    via_port.set_port(Some(port)).unwrap();
    let mut config = test_config();
    with_postgres(via_port.to_string())(&mut config);
    let exchange = config.amqp.exchange.clone();
    let bridge = Bridge::start_unready(config).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reason = bridge
        .running()
        .readiness
        .get()
        .expect_err("503 without the database");
    assert!(reason.contains("database"), "{reason}");
    let (status, body) = http_get(bridge.running().http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let _proxy = spawn_proxy(listener, target.parse().unwrap());
    bridge.wait_ready().await;
    Publisher::connect()
        .await
        .publish_all(
            &exchange,
            [r#"{"user_id":"late-db","id":"l-1","payload":1}"#.to_string()],
        )
        .await;
    wait_for_stored(&bridge, 1).await;
    let (_client, counts) = connect_since(&bridge, "late-db", 0).await;
    assert_eq!(counts["total"], 1, "{counts}");
    bridge.stop().await;
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
    let (mut tab, _) = connect_since(&bridge, "h", 6).await;
    let path = "/api/me/notifications?limit=2&before=6";
    let list = bridge.request_as("h", &[], "GET", path, "").await;
    assert_eq!(list.status, 200, "{}", list.body);
    let list = list.json();
    assert_eq!(
        (list["total"].as_u64(), list["unread"].as_u64()),
        (Some(6), Some(6))
    );
    assert_eq!(listed_seqs(&list), vec![5, 4]);
    let body = r#"{"action":"mark_read","ids":["h-0","h-1","nope"]}"#;
    let patched = bridge
        .request_as("h", &[], "PATCH", "/api/me/notifications", body)
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.json(), json!({"total": 6, "unread": 4}));
    assert_eq!(
        next_json(&mut tab).await,
        json!({"type": "inbox", "total": 6, "unread": 4})
    );
    bridge.stop().await;
}

/// The real binary: a database that does not answer keeps it running, not
/// ready (`/readyz` 503 naming the database), and its log names the
/// problem without the password.
#[tokio::test]
async fn the_binary_waits_for_a_database_that_cannot_be_reached() {
    let url = format!("postgres://nb:hunter2@127.0.0.1:{}/nb", free_port());
    let place = common::daemon::Placement::new();
    let daemon = common::daemon::Daemon::start_unready_at(
        place,
        &[
            ("NOTIFY_BRIDGE_INBOX__ENABLED", "true"),
            ("NOTIFY_BRIDGE_INBOX__STORE", "postgres"),
            ("NOTIFY_BRIDGE_INBOX__POSTGRES_URL", url.as_str()),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = http_get(daemon.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database"), "{body}");
    assert!(daemon.pid_or_none().is_some(), "still running");
    let log = daemon.terminate().await;
    assert!(log.contains("PostgreSQL"), "{log}");
    assert!(!log.contains("hunter2"), "the password leaked: {log}");
}

/// PostgreSQL's text cannot hold U+0000, which JSON can escape: a message
/// carrying one in `event`, `id` or `user_id` must be refused as invalid
/// at decode (as any bad message is), not reach the commit, where it
/// would fail every retry and hold up everything behind it.
#[tokio::test]
async fn a_nul_in_a_stored_field_is_refused_and_nothing_behind_it_waits() {
    let Some(db) = pg::fresh_schema().await else {
        return;
    };
    let bridge = Bridge::start_with(with_postgres(db)).await;
    let mut client = bridge.connect("nul-ok").await;
    assert_eq!(next_json(&mut client).await["type"], "inbox");
    let publisher = Publisher::connect().await;
    for hostile in [
        r#"{"user_id":"nul-ok","event":"a\u0000b","payload":1}"#,
        r#"{"user_id":"nul-ok","id":"a\u0000b","payload":2}"#,
        r#"{"user_ids":["nul-ok","b\u0000"],"payload":3}"#,
    ] {
        bridge.publish(&publisher, hostile).await;
    }
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"nul-ok","id":"fine","payload":4}"#,
        )
        .await;
    let frame = next_json_within(&mut client, Duration::from_secs(10))
        .await
        .expect("the good message behind the hostile ones arrives");
    assert_eq!(
        (frame["id"].clone(), frame["seq"].clone()),
        (json!("fine"), json!(1))
    );
    assert_eq!(bridge.running().metrics.inbox_stored.get(), 1);
}
