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
    let token = token(user, &[]);
    let url = bridge.ws_url(&format!("/ws?token={token}&since={since}"));
    let (mut client, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_json(&mut client).await["type"], "welcome");
    let counts = next_json(&mut client).await;
    assert_eq!(counts["type"], "inbox", "{counts}");
    (client, counts)
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
