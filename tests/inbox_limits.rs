//! The inbox under hostile input (issue 11): a payload addressed to many
//! users is stored once, `since` at the edge of u64, a PATCH with more ids
//! than SQLite has variables, private file modes, the migration of a store
//! written by the first schema, and listings read in pages.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{
    inbox::{wait_for_stored, with_inbox, ScratchStore},
    *,
};
use serde_json::{json, Value};

async fn connect_since(bridge: &Bridge, user: &str, since: &str) -> (Client, Value) {
    common::inbox::connect_since(bridge, user, Some(since)).await
}

async fn http(bridge: &Bridge, method: &str, path: &str, user: &str, body: &str) -> (u16, Value) {
    let reply = bridge.request_as(user, &[], method, path, body).await;
    let value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
    (reply.status, value)
}

/// Bytes of every file in `dir` (the store and its -wal and -shm).
fn folder_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn open_raw(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

#[tokio::test]
async fn a_message_to_many_users_stores_its_payload_once() {
    let store = ScratchStore::new();
    let path = store.path();
    let bridge = Bridge::start_with(with_inbox(path.clone())).await;
    let publisher = Publisher::connect().await;
    let users: Vec<String> = (0..200).map(|i| format!("many-{i}")).collect();
    let pad = "x".repeat(300 * 1024);
    let body = json!({"user_ids": users, "id": "big", "payload": {"pad": pad}}).to_string();
    bridge.publish(&publisher, &body).await;
    wait_for_stored(&bridge, 200).await;

    // 200 copies would be 60 MB; one payload and 200 small rows stay small.
    let bytes = folder_bytes(path.parent().unwrap());
    assert!(bytes < 3 * 1024 * 1024, "the store grew to {bytes} bytes");
    let db = open_raw(&path);
    let payloads: i64 = db
        .query_row("SELECT COUNT(*) FROM inbox_payloads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(payloads, 1);

    // Every user still gets the whole payload.
    let (mut client, counts) = connect_since(&bridge, "many-199", "0").await;
    assert_eq!(counts["total"], 1);
    let frame = next_json(&mut client).await;
    assert_eq!(
        (frame["seq"].as_u64(), frame["id"].as_str()),
        (Some(1), Some("big"))
    );
    assert_eq!(
        frame["payload"]["pad"].as_str().map(str::len),
        Some(pad.len())
    );

    // Removing it for every user frees the payload.
    for user in &users {
        let (status, _) = http(
            &bridge,
            "PATCH",
            "/api/me/notifications",
            user,
            r#"{"action":"remove_all"}"#,
        )
        .await;
        assert_eq!(status, 200);
    }
    let payloads: i64 = db
        .query_row("SELECT COUNT(*) FROM inbox_payloads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(payloads, 0, "no entry refers to the payload any more");
    bridge.stop().await;
}

#[tokio::test]
async fn since_beyond_i64_replays_nothing_and_live_frames_still_arrive() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_inbox(store.path())).await;
    let publisher = Publisher::connect().await;
    for i in 0..2 {
        bridge
            .publish(
                &publisher,
                &format!(r#"{{"user_id":"edge","id":"old-{i}","payload":{i}}}"#),
            )
            .await;
    }
    wait_for_stored(&bridge, 2).await;

    let mut clients = Vec::new();
    for since in ["9223372036854775808", "18446744073709551615"] {
        let (mut client, counts) = connect_since(&bridge, "edge", since).await;
        assert_eq!(counts["total"], 2, "since={since}");
        assert_silent(&mut client, Duration::from_millis(300)).await;
        clients.push(client);
    }
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"edge","id":"new","payload":"live"}"#,
        )
        .await;
    for client in &mut clients {
        let frame = next_json(client).await;
        assert_eq!(
            (frame["id"].as_str(), frame["seq"].as_u64()),
            (Some("new"), Some(3)),
            "{frame}"
        );
    }
    bridge.stop().await;
}

#[tokio::test]
async fn a_patch_with_40000_ids_works() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_inbox(store.path())).await;
    let publisher = Publisher::connect().await;
    for i in 0..3 {
        bridge
            .publish(
                &publisher,
                &format!(r#"{{"user_id":"lots","id":"id-{i}","payload":{i}}}"#),
            )
            .await;
    }
    wait_for_stored(&bridge, 3).await;
    let ids: Vec<String> = (0..40_000).map(|i| format!("id-{i}")).collect();
    let (status, counts) = http(
        &bridge,
        "PATCH",
        "/api/me/notifications",
        "lots",
        &json!({"action": "mark_read", "ids": ids[1..]}).to_string(),
    )
    .await;
    assert_eq!((status, counts), (200, json!({"total": 3, "unread": 1})));
    let (status, counts) = http(
        &bridge,
        "PATCH",
        "/api/me/notifications",
        "lots",
        &json!({"action": "remove", "ids": ids}).to_string(),
    )
    .await;
    assert_eq!((status, counts), (200, json!({"total": 0, "unread": 0})));
    bridge.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_inbox_folder_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let store = ScratchStore::new();
    let path = store.path();
    let bridge = Bridge::start_with(with_inbox(path.clone())).await;
    let publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, r#"{"user_id":"modes","id":"m","payload":1}"#)
        .await;
    wait_for_stored(&bridge, 1).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for folder in [
        path.parent().unwrap(),
        path.parent().unwrap().parent().unwrap(),
    ] {
        assert_eq!(mode(folder), 0o700, "{}", folder.display());
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    bridge.stop().await;
}

/// The first schema (`SCHEMA` in src/inbox/store.rs before payloads were
/// stored once), verbatim. A frozen copy on purpose: the migration test must
/// start from the schema as the first release wrote it, never from today's code.
const V1_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox_users (
    user_id TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    -- the highest seq retention dropped: a `since` below it has a gap
    dropped_through INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox_entries (
    user_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    read INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS inbox_entries_id ON inbox_entries (user_id, id);
CREATE INDEX IF NOT EXISTS inbox_entries_created ON inbox_entries (created_at);
";

/// A store as the first schema's code wrote it: user `a` lost seq 1 to
/// retention and holds 2..=4 (3 read); `b` holds the same message `m3` as
/// `a` (one batch, one timestamp) at seq 1.
fn write_v1_store(path: &std::path::Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let db = rusqlite::Connection::open(path).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.execute_batch(V1_SCHEMA).unwrap();
    let now = unix_now() as i64 * 1000;
    db.execute_batch(&format!(
        "INSERT INTO inbox_users VALUES ('a', 5, 1), ('b', 2, 0);
         INSERT INTO inbox_entries VALUES
           ('a', 2, 'm2', 'notification', '{{\"n\":2}}', {now}, 0),
           ('a', 3, 'm3', 'alert', '{{\"n\":3}}', {}, 1),
           ('a', 4, 'm4', 'notification', '{{\"n\":4}}', {}, 0),
           ('b', 1, 'm3', 'alert', '{{\"n\":3}}', {}, 0);",
        now + 1,
        now + 2,
        now + 1
    ))
    .unwrap();
}

#[tokio::test]
async fn a_store_written_by_the_first_schema_is_migrated() {
    let store = ScratchStore::new();
    let path = store.path();
    write_v1_store(&path);
    let bridge = Bridge::start_with(with_inbox(path.clone())).await;

    let db = open_raw(&path);
    let version: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
    let payloads: i64 = db
        .query_row("SELECT COUNT(*) FROM inbox_payloads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(payloads, 3, "m3 is shared by a and b");

    // Seqs, events, payloads, read state and the gap survive.
    let (mut client, counts) = connect_since(&bridge, "a", "0").await;
    assert_eq!(counts, json!({"type": "inbox", "total": 3, "unread": 2}));
    assert_eq!(
        next_json(&mut client).await,
        json!({"type": "gap", "since": 0, "oldest": 2})
    );
    for (seq, event) in [(2, "notification"), (3, "alert"), (4, "notification")] {
        let frame = next_json(&mut client).await;
        assert_eq!(
            (frame["seq"].as_u64(), frame["event"].as_str()),
            (Some(seq), Some(event))
        );
        assert_eq!(frame["payload"], json!({"n": seq}));
    }
    let (_, listing) = http(&bridge, "GET", "/api/me/notifications", "a", "").await;
    let read: Vec<bool> = listing["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["read"].as_bool().unwrap())
        .collect();
    assert_eq!(read, vec![false, true, false]);

    // Dedup by (user, id) survives; new entries continue the seqs.
    let publisher = Publisher::connect().await;
    bridge
        .publish(
            &publisher,
            r#"{"user_ids":["a","b"],"id":"m3","payload":0}"#,
        )
        .await;
    bridge
        .publish(
            &publisher,
            r#"{"user_ids":["a","b"],"id":"m5","payload":5}"#,
        )
        .await;
    let frame = next_json(&mut client).await;
    assert_eq!(
        (frame["id"].as_str(), frame["seq"].as_u64()),
        (Some("m5"), Some(5))
    );
    wait_for_stored(&bridge, 2).await;
    assert_eq!(bridge.running().metrics.inbox_stored.get(), 2);
    let (mut b, _) = connect_since(&bridge, "b", "0").await;
    assert_eq!(next_json(&mut b).await["id"], "m3");
    assert_eq!(next_json(&mut b).await["seq"], 2);
    bridge.stop().await;
}

#[tokio::test]
async fn long_listings_and_replays_come_whole_and_in_order_across_pages() {
    let store = ScratchStore::new();
    let path = store.path();
    let bridge = Bridge::start_with(with_inbox(path)).await;
    let publisher = Publisher::connect().await;
    let pad = "p".repeat(40 * 1024);
    let bodies = (0..300).map(|i| {
        json!({"user_id": "pages", "id": format!("p-{i}"), "payload": {"i": i, "pad": pad}})
            .to_string()
    });
    publisher
        .publish_all(&bridge.config.amqp.exchange, bodies)
        .await;
    wait_for_stored(&bridge, 300).await;

    let path = "/api/me/notifications?limit=500&before=290";
    let reply = bridge.request_as("pages", &[], "GET", path, "").await;
    assert_eq!(reply.status, 200);
    // Streamed a page at a time, not built whole (11 MB here).
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let listing = reply.json();
    assert_eq!(
        (listing["total"].as_u64(), listing["unread"].as_u64()),
        (Some(300), Some(300))
    );
    assert_eq!(listed_seqs(&listing), (1..290).rev().collect::<Vec<_>>());

    let (mut client, _) = connect_since(&bridge, "pages", "7").await;
    for seq in 8..=300u64 {
        let frame = next_json(&mut client).await;
        assert_eq!(frame["seq"], seq);
        assert_eq!(frame["payload"]["i"], seq - 1);
    }
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"pages","id":"after","payload":1}"#,
        )
        .await;
    assert_eq!(next_json(&mut client).await["seq"], 301);
    bridge.stop().await;
}
