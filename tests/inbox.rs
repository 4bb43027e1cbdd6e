//! The per-user inbox against the real broker: offline delivery, replay
//! with `since`, gaps, read state across tabs, the HTTP routes, restarts.

mod common;

use std::time::Duration;

use common::{
    inbox::{wait_for_stored, with_inbox, ScratchStore},
    *,
};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "inbox-admin-key";

async fn connect_since(bridge: &Bridge, user: &str, since: Option<u64>) -> (Client, Value) {
    let since = since.map(|s| s.to_string());
    common::inbox::connect_since(bridge, user, since.as_deref()).await
}

/// Publishes messages `range` to `user`, ids `{user}-{i}`.
async fn publish_many(
    bridge: &Bridge,
    publisher: &Publisher,
    user: &str,
    range: std::ops::Range<u32>,
) {
    let bodies =
        range.map(|i| format!(r#"{{"user_id":"{user}","id":"{user}-{i}","payload":{{"n":{i}}}}}"#));
    publisher
        .publish_all(&bridge.config.amqp.exchange, bodies)
        .await;
}

#[tokio::test]
async fn offline_messages_arrive_on_connect_in_order() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_inbox(store.path())).await;
    let publisher = Publisher::connect().await;
    publish_many(&bridge, &publisher, "off", 0..5).await;
    wait_for_stored(&bridge, 5).await;

    let (mut client, counts) = connect_since(&bridge, "off", Some(0)).await;
    assert_eq!(counts, json!({"type": "inbox", "total": 5, "unread": 5}));
    for i in 0..5u64 {
        let frame = next_json(&mut client).await;
        assert_eq!(frame["seq"], i + 1, "{frame}");
        assert_eq!(frame["id"], format!("off-{i}"));
        assert_eq!(frame["payload"], json!({"n": i}));
    }
    // Live messages carry the next seq.
    publish_many(&bridge, &publisher, "off", 5..6).await;
    assert_eq!(next_json(&mut client).await["seq"], 6);

    // Without `since`, counts only, no replay.
    let (mut plain, counts) = connect_since(&bridge, "off", None).await;
    assert_eq!(counts["total"], 6);
    assert_silent(&mut plain, Duration::from_millis(300)).await;
    assert_eq!(bridge.running().metrics.inbox_replayed.get(), 5);
    bridge.stop().await;
}

#[tokio::test]
async fn reconnecting_with_since_during_a_stream_loses_and_duplicates_nothing() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_inbox(store.path())).await;
    common::inbox::since_reconnects_during_a_stream_lose_and_duplicate_nothing(&bridge).await;
    bridge.stop().await;
}

#[tokio::test]
async fn retention_produces_a_gap_frame() {
    let store = ScratchStore::new();
    let path = store.path();
    let bridge = Bridge::start_with(|c| {
        with_inbox(path)(c);
        c.inbox.max_per_user = 3;
    })
    .await;
    let publisher = Publisher::connect().await;
    publish_many(&bridge, &publisher, "ret", 0..5).await;
    wait_for_stored(&bridge, 5).await;

    let (mut client, counts) = connect_since(&bridge, "ret", Some(0)).await;
    assert_eq!(
        (counts["total"].as_u64(), counts["unread"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        next_json(&mut client).await,
        json!({"type": "gap", "since": 0, "oldest": 3})
    );
    for seq in 3..=5 {
        assert_eq!(next_json(&mut client).await["seq"], seq);
    }
    // since beyond the last seq: nothing replayed, no gap.
    let (mut later, _) = connect_since(&bridge, "ret", Some(99)).await;
    assert_silent(&mut later, Duration::from_millis(300)).await;
    assert_eq!(bridge.running().metrics.inbox_gaps.get(), 1);

    // A since that is not a non-negative integer is refused.
    let (status, body) = refused(request(
        &bridge.ws_url(&format!("/ws?token={}&since=-1", token("ret", &[]))),
        &[],
    ))
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    bridge.stop().await;
}

#[tokio::test]
async fn read_state_changes_reach_every_tab_and_never_another_user() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_inbox(store.path())).await;
    let publisher = Publisher::connect().await;
    publish_many(&bridge, &publisher, "tabs", 0..4).await;
    publish_many(&bridge, &publisher, "other", 0..1).await;
    wait_for_stored(&bridge, 5).await;

    let (mut tab1, _) = connect_since(&bridge, "tabs", None).await;
    let (mut tab2, _) = connect_since(&bridge, "tabs", None).await;
    let (mut other, _) = connect_since(&bridge, "other", None).await;

    send_text(
        &mut tab1,
        r#"{"type":"read","ids":["tabs-0","other-0","unknown"]}"#,
    )
    .await;
    for tab in [&mut tab1, &mut tab2] {
        assert_eq!(
            next_json(tab).await,
            json!({"type": "inbox", "total": 4, "unread": 3})
        );
    }
    send_text(&mut tab2, r#"{"type":"read","up_to":2}"#).await;
    for tab in [&mut tab1, &mut tab2] {
        assert_eq!(next_json(tab).await["unread"], 2);
    }
    send_text(&mut tab1, r#"{"type":"remove","ids":["tabs-3"]}"#).await;
    for tab in [&mut tab1, &mut tab2] {
        assert_eq!(
            next_json(tab).await,
            json!({"type": "inbox", "total": 3, "unread": 1})
        );
    }
    send_text(&mut tab1, r#"{"type":"read_all"}"#).await;
    assert_eq!(next_json(&mut tab2).await["unread"], 0);
    assert_eq!(next_json(&mut tab1).await["unread"], 0);
    // Nothing changed: no counts frame.
    send_text(&mut tab1, r#"{"type":"read_all"}"#).await;
    assert_silent(&mut tab2, Duration::from_millis(300)).await;
    send_text(&mut tab1, r#"{"type":"read","ids":"nope"}"#).await;
    assert_eq!(next_json(&mut tab1).await["code"], "bad_request");

    // The other user's entry was never touched.
    assert_silent(&mut other, Duration::from_millis(100)).await;
    let (_, counts) = connect_since(&bridge, "other", None).await;
    assert_eq!(counts, json!({"type": "inbox", "total": 1, "unread": 1}));
    bridge.stop().await;
}

#[tokio::test]
async fn redeliveries_are_not_stored_twice_and_store_false_is_never_stored() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_inbox(store.path())).await;
    let publisher = Publisher::connect().await;
    let (mut client, _) = connect_since(&bridge, "dup", None).await;

    bridge
        .publish(&publisher, r#"{"user_id":"dup","id":"same","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut client).await["seq"], 1);
    bridge
        .publish(&publisher, r#"{"user_id":"dup","id":"same","payload":1}"#)
        .await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"dup","id":"live","store":false,"payload":{"lat":1}}"#,
        )
        .await;
    let live = next_json(&mut client).await;
    assert_eq!(
        live["id"], "live",
        "the duplicate must not be sent again: {live}"
    );
    assert!(live.get("seq").is_none(), "{live}");
    // Channel and broadcast messages are not stored either.
    bridge
        .publish(&publisher, r#"{"broadcast":true,"id":"b","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut client).await["id"], "b");

    let (_, counts) = connect_since(&bridge, "dup", None).await;
    assert_eq!(counts["total"], 1);
    assert_eq!(bridge.running().metrics.inbox_stored.get(), 1);
    bridge.stop().await;
}

#[tokio::test]
async fn the_store_survives_a_restart() {
    let store = ScratchStore::new();
    let path = store.path();
    let mut config = test_config();
    with_inbox(path.clone())(&mut config);
    let queue = config.amqp.queue.clone();
    let exchange = config.amqp.exchange.clone();
    let bridge = Bridge::start_unready(config.clone()).await;
    bridge.wait_ready().await;
    let publisher = Publisher::connect().await;
    publish_many(&bridge, &publisher, "keep", 0..3).await;
    wait_for_stored(&bridge, 3).await;
    // Stop without deleting the queue and exchange: the same instance comes back.
    let mut bridge = bridge;
    bridge.stop_keeping_topology().await;

    let mut again = test_config();
    with_inbox(path)(&mut again);
    again.amqp.queue = queue;
    again.amqp.exchange = exchange;
    let bridge = Bridge::start_unready(again).await;
    bridge.wait_ready().await;
    let (mut client, counts) = connect_since(&bridge, "keep", Some(1)).await;
    assert_eq!(counts["total"], 3);
    assert_eq!(next_json(&mut client).await["seq"], 2);
    assert_eq!(next_json(&mut client).await["seq"], 3);
    bridge.stop().await;
}

#[tokio::test]
async fn an_unusable_store_stops_startup_naming_inbox_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inbox.db");
    std::fs::write(&path, vec![0x5au8; 16384]).unwrap();
    let mut config = test_config();
    with_inbox(path)(&mut config);
    let err = notify_bridge::run(config, tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .expect("a corrupt store must stop startup");
    assert!(
        err.downcast_ref::<notify_bridge::config::ConfigError>()
            .is_some(),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("inbox.path"), "{err:#}");
}

// --- HTTP -----------------------------------------------------------------

async fn http(
    bridge: &Bridge,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    let reply = http_request(bridge.running().http_addr, method, path, &headers, body).await;
    (
        reply.status,
        serde_json::from_str(&reply.body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn http_list_and_patch() {
    let store = ScratchStore::new();
    let inbox = with_inbox(store.path());
    let bridge = Bridge::start_with(|c| {
        inbox(c);
        c.http.admin_keys = vec![ADMIN_KEY.into()];
    })
    .await;
    let publisher = Publisher::connect().await;
    publish_many(&bridge, &publisher, "h", 0..6).await;
    wait_for_stored(&bridge, 6).await;
    let me = format!("Bearer {}", token("h", &[]));
    let (mut tab, _) = connect_since(&bridge, "h", None).await;

    let (status, list) = http(
        &bridge,
        "GET",
        "/api/me/notifications?limit=2",
        Some(&me),
        "",
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        (list["total"].as_u64(), list["unread"].as_u64()),
        (Some(6), Some(6))
    );
    assert_eq!(listed_seqs(&list), vec![6, 5]);
    let items = list["notifications"].as_array().unwrap();
    assert_eq!(items[0]["id"], "h-5");
    assert_eq!(items[0]["payload"], json!({"n": 5}));
    assert_eq!(items[0]["read"], false);
    assert!(items[0]["created_at"].as_str().unwrap().ends_with('Z'));
    let (_, page) = http(
        &bridge,
        "GET",
        "/api/me/notifications?before=5&limit=50",
        Some(&me),
        "",
    )
    .await;
    assert_eq!(page["notifications"].as_array().unwrap().len(), 4);

    let (status, counts) = http(
        &bridge,
        "PATCH",
        "/api/me/notifications",
        Some(&me),
        r#"{"action":"mark_read","ids":["h-0","h-1"]}"#,
    )
    .await;
    assert_eq!((status, counts), (200, json!({"total": 6, "unread": 4})));
    assert_eq!(
        next_json(&mut tab).await,
        json!({"type": "inbox", "total": 6, "unread": 4})
    );
    let (_, unread) = http(
        &bridge,
        "GET",
        "/api/me/notifications?unread=true",
        Some(&me),
        "",
    )
    .await;
    assert_eq!(unread["notifications"].as_array().unwrap().len(), 4);
    assert_eq!(unread["total"], 6);
    let (_, counts) = http(
        &bridge,
        "PATCH",
        "/api/me/notifications",
        Some(&me),
        r#"{"action":"remove_all"}"#,
    )
    .await;
    assert_eq!(counts, json!({"total": 0, "unread": 0}));

    // Refused callers, queries and bodies: tests/http_in_process.rs
    // (`inbox_routes_refuse_bad_callers_queries_and_bodies`).

    // Admins read any user's inbox.
    publish_many(&bridge, &publisher, "h2", 0..1).await;
    wait_for_stored(&bridge, 7).await;
    let admin = format!("Bearer {ADMIN_KEY}");
    let (status, theirs) = http(
        &bridge,
        "GET",
        "/api/users/h2/notifications",
        Some(&admin),
        "",
    )
    .await;
    assert_eq!((status, theirs["total"].as_u64()), (200, Some(1)));
    bridge.stop().await;
}

#[tokio::test]
async fn inbox_frames_are_refused_when_disabled() {
    // The routes' 404: tests/http_in_process.rs.
    let bridge = Bridge::start().await;
    // Inbox frames are refused with an error frame, the connection stays.
    let mut client = bridge.connect("x").await;
    send_text(&mut client, r#"{"type":"read_all"}"#).await;
    assert_eq!(next_json(&mut client).await["code"], "bad_request");
    send_text(&mut client, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut client).await["type"], "pong");
    bridge.stop().await;
}
