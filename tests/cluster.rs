//! Cluster mode against the real broker and the PostgreSQL of
//! scripts/postgres: several bridges in this process, one cluster name,
//! one database schema. (Killing an instance or the broker is in
//! tests/cluster_faults.rs, with the real binary.)

mod common;
mod pg;

use std::time::Duration;

use common::*;
use notify_bridge::config::{Config, InboxStoreKind};
use serde_json::Value;

/// Instances of one cluster sharing a fresh schema and an exchange.
struct TestCluster {
    name: String,
    exchange: String,
    db: String,
    bridges: Vec<Bridge>,
}

fn cluster_config(db: &str, name: &str, exchange: &str, instance: &str) -> Config {
    let mut c = test_config();
    c.inbox.enabled = true;
    c.inbox.store = InboxStoreKind::Postgres;
    c.inbox.postgres_url = Some(db.to_string());
    c.cluster.enabled = true;
    c.cluster.name = name.to_string();
    c.cluster.instance_id = instance.to_string();
    c.amqp.exchange = exchange.to_string();
    c.http.admin_keys = vec!["admin-key".into()];
    c
}

impl TestCluster {
    async fn start(instances: usize) -> Option<Self> {
        let db = pg::fresh_schema().await?;
        let name = unique("cl");
        let exchange = format!("{name}.exchange");
        let mut cluster = Self {
            name,
            exchange,
            db,
            bridges: Vec::new(),
        };
        for i in 0..instances {
            cluster.add(&format!("i{i}")).await;
        }
        Some(cluster)
    }

    async fn add(&mut self, instance: &str) {
        let config = cluster_config(&self.db, &self.name, &self.exchange, instance);
        let bridge = Bridge::start_unready(config).await;
        bridge.wait_ready().await;
        self.bridges.push(bridge);
    }

    async fn publish_all(&self, bodies: impl IntoIterator<Item = String>) {
        Publisher::connect()
            .await
            .publish_all(&self.exchange, bodies)
            .await;
    }

    async fn stop(self) {
        let ingest = format!("{}.ingest", self.name);
        for bridge in self.bridges {
            bridge.stop().await;
        }
        delete_topology(&ingest, &format!("{}.live", self.name)).await;
    }
}

/// Reads frames until `n` notifications came (or 20 s of silence); their
/// seqs. Counts frames are skipped.
async fn seqs(client: &mut Client, n: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let Some(frame) = next_json_within(client, Duration::from_secs(20)).await else {
            break;
        };
        if frame["type"] == "notification" {
            seen.push(frame["seq"].as_u64().expect("a stored frame has a seq"));
        }
    }
    seen
}

fn stored(user: &str, range: std::ops::Range<u64>) -> impl Iterator<Item = String> + '_ {
    range.map(move |i| format!(r#"{{"user_id":"{user}","id":"m-{i}","payload":{{"n":{i}}}}}"#))
}

#[tokio::test]
async fn tabs_on_two_instances_get_the_same_seqs_and_a_third_catches_up_with_since() {
    let Some(cluster) = TestCluster::start(3).await else {
        return;
    };
    let (a, b, c) = (
        &cluster.bridges[0],
        &cluster.bridges[1],
        &cluster.bridges[2],
    );
    let (mut tab_a, _) = common::inbox::connect_since(a, "u1", None).await;
    let (mut tab_b, _) = common::inbox::connect_since(b, "u1", None).await;
    let total = 2000u64;
    let publishing = {
        let exchange = cluster.exchange.clone();
        tokio::spawn(async move {
            let publisher = Publisher::connect().await;
            for start in (0..total).step_by(100) {
                publisher
                    .publish_all(
                        &exchange,
                        stored("u1", start..start + 100).map(|s| s.to_string()),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let first = seqs(&mut tab_a, 700).await;
    // A third tab, on C, from where A stands: the replay and live frames
    // must meet without gap or duplicate.
    let since = *first.last().unwrap();
    let (mut tab_c, _) = common::inbox::connect_since(c, "u1", Some(&since.to_string())).await;
    let rest_a = seqs(&mut tab_a, (total as usize) - first.len()).await;
    let all_b = seqs(&mut tab_b, total as usize).await;
    let all_c = seqs(&mut tab_c, (total - since) as usize).await;
    publishing.await.unwrap();
    let expected: Vec<u64> = (1..=total).collect();
    assert_eq!([first, rest_a].concat(), expected, "tab on A");
    assert_eq!(all_b, expected, "tab on B");
    assert_eq!(all_c, ((since + 1)..=total).collect::<Vec<_>>(), "tab on C");
    assert_silent(&mut tab_b, Duration::from_millis(300)).await;
    cluster.stop().await;
}

/// The last `inbox` counts frame a tab gets within `quiet` of silence.
async fn last_counts(client: &mut Client, quiet: Duration) -> Option<Value> {
    let mut last = None;
    while let Some(frame) = next_json_within(client, quiet).await {
        if frame["type"] == "inbox" {
            last = Some(frame);
        }
    }
    last
}

#[tokio::test]
async fn reads_on_one_instance_reach_tabs_on_another_and_concurrent_ones_converge() {
    let Some(cluster) = TestCluster::start(2).await else {
        return;
    };
    let (a, b) = (&cluster.bridges[0], &cluster.bridges[1]);
    let (mut tab_a, _) = common::inbox::connect_since(a, "reader", None).await;
    let (mut tab_b, _) = common::inbox::connect_since(b, "reader", None).await;
    cluster.publish_all(stored("reader", 0..100)).await;
    assert_eq!(seqs(&mut tab_a, 100).await.len(), 100);
    assert_eq!(seqs(&mut tab_b, 100).await.len(), 100);

    // One read on A: B's tab learns the counts.
    send_text(&mut tab_a, r#"{"type":"read","ids":["m-0"]}"#).await;
    let counts = last_counts(&mut tab_b, Duration::from_millis(700)).await;
    let counts = counts.expect("B's tab got the counts of A's read");
    assert_eq!(
        (counts["total"].as_u64(), counts["unread"].as_u64()),
        (Some(100), Some(99))
    );

    // 99 more reads, from both instances at once.
    for i in 1..100 {
        let tab = if i % 2 == 0 { &mut tab_a } else { &mut tab_b };
        send_text(tab, &format!(r#"{{"type":"read","ids":["m-{i}"]}}"#)).await;
    }
    for (name, tab) in [("A", &mut tab_a), ("B", &mut tab_b)] {
        let counts = last_counts(tab, Duration::from_millis(1500)).await.unwrap();
        assert_eq!(
            (counts["total"].as_u64(), counts["unread"].as_u64()),
            (Some(100), Some(0)),
            "tab on {name} ends at the latest counts: {counts}"
        );
    }
    cluster.stop().await;
}

#[tokio::test]
async fn an_instance_without_the_users_receives_none_of_their_messages() {
    let Some(cluster) = TestCluster::start(2).await else {
        return;
    };
    let (a, b) = (&cluster.bridges[0], &cluster.bridges[1]);
    let mut tabs = Vec::new();
    for u in 0..10 {
        tabs.push(
            common::inbox::connect_since(a, &format!("only-a-{u}"), None)
                .await
                .0,
        );
    }
    let total = 2000u64;
    let bodies = (0..total).map(|i| {
        format!(
            r#"{{"user_id":"only-a-{}","id":"x-{i}","payload":{i}}}"#,
            i % 10
        )
    });
    cluster.publish_all(bodies).await;
    for tab in &mut tabs {
        assert_eq!(
            seqs(tab, (total / 10) as usize).await.len() as u64,
            total / 10
        );
    }
    let live = |bridge: &Bridge| bridge.running().metrics.cluster_live_received.get();
    assert!(live(a) >= 1, "A received its users' messages live");
    assert!(
        live(a) <= total,
        "at most one live message per notification: {}",
        live(a)
    );
    assert_eq!(live(b), 0, "B holds none of these users");
    // A broadcast reaches both.
    let (mut on_b, _) = common::inbox::connect_since(b, "someone-on-b", None).await;
    cluster
        .publish_all([r#"{"broadcast":true,"payload":"all"}"#.to_string()])
        .await;
    assert_eq!(next_json(&mut on_b).await["payload"], "all");
    assert_eq!(live(b), 1);
    cluster.stop().await;
}

#[tokio::test]
async fn admin_routes_list_and_close_connections_on_every_instance() {
    let Some(cluster) = TestCluster::start(2).await else {
        return;
    };
    let (a, b) = (&cluster.bridges[0], &cluster.bridges[1]);
    let _on_a = a.connect("adm-1").await;
    let token = token("adm-2", &[]);
    let (mut on_b, _) = tokio_tungstenite::connect_async(b.ws_url(&format!("/ws?token={token}")))
        .await
        .unwrap();
    let welcome = next_json(&mut on_b).await;
    let id_b = welcome["connection_id"].as_str().unwrap().to_string();
    assert!(id_b.starts_with("c-i1-"), "{id_b}");

    let admin = |bridge: &Bridge, method: &'static str, path: String| {
        let addr = bridge.running().http_addr;
        async move {
            http_request(
                addr,
                method,
                &path,
                &[("Authorization", "Bearer admin-key")],
                "",
            )
            .await
        }
    };
    let listing = admin(a, "GET", "/api/connections".into()).await;
    assert_eq!(listing.status, 200, "{}", listing.body);
    let listed = listing.json();
    let instances: Vec<&str> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["instance"].as_str().unwrap())
        .collect();
    assert_eq!(instances, ["i0", "i1"], "{listed}");

    let deleted = admin(a, "DELETE", format!("/api/connections/{id_b}")).await;
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    assert_eq!(close_code(&mut on_b).await, Some(1008));
    for unknown in [
        id_b.to_string(),
        "c-i1-999999".into(),
        "c-ghost-1".into(),
        "c-1".into(),
    ] {
        let gone = admin(a, "DELETE", format!("/api/connections/{unknown}")).await;
        assert_eq!(gone.status, 404, "{unknown}: {}", gone.body);
    }
    cluster.stop().await;
}

#[tokio::test]
async fn two_clusters_on_one_broker_never_mix() {
    let (Some(mut x), Some(y_db)) = (TestCluster::start(1).await, pg::fresh_schema().await) else {
        return;
    };
    // Y: another cluster on the same exchange, with its own database.
    let y_name = unique("cl");
    let y_config = cluster_config(&y_db, &y_name, &x.exchange, "i0");
    let y = Bridge::start_unready(y_config).await;
    y.wait_ready().await;
    let (mut on_x, _) = common::inbox::connect_since(&x.bridges[0], "both", None).await;
    let (mut on_y, _) = common::inbox::connect_since(&y, "both", None).await;
    x.publish_all([r#"{"user_id":"both","payload":"once"}"#.to_string()])
        .await;
    x.publish_all([r#"{"broadcast":true,"payload":"b"}"#.to_string()])
        .await;
    for tab in [&mut on_x, &mut on_y] {
        assert_eq!(next_json(tab).await["payload"], "once");
        assert_eq!(next_json(tab).await["payload"], "b");
        assert_silent(tab, Duration::from_millis(500)).await;
    }
    let listing = http_request(
        x.bridges[0].running().http_addr,
        "GET",
        "/api/connections",
        &[("Authorization", "Bearer admin-key")],
        "",
    )
    .await;
    assert_eq!(listing.json()["connections"].as_array().unwrap().len(), 1);
    x.bridges.push(y);
    let y = x.bridges.pop().unwrap();
    y.stop().await;
    delete_topology(&format!("{y_name}.ingest"), &format!("{y_name}.live")).await;
    x.stop().await;
}

/// Binds or unbinds `instance`'s live queue from its own routing key, as a
/// broker losing the live hop would.
async fn live_hop(cluster: &TestCluster, instance: &str, up: bool) {
    use lapin::{options::QueueBindOptions, types::FieldTable};
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let (queue, exchange, key) = (
        format!("{}.live.{instance}", cluster.name),
        format!("{}.live", cluster.name),
        format!("i.{instance}"),
    );
    if up {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    } else {
        channel
            .queue_unbind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_lost_live_message_is_repaired_from_the_store_before_the_next_frame() {
    let Some(cluster) = TestCluster::start(1).await else {
        return;
    };
    let a = &cluster.bridges[0];
    let (mut tab, _) = common::inbox::connect_since(a, "gappy", None).await;
    cluster.publish_all(stored("gappy", 0..3)).await;
    assert_eq!(seqs(&mut tab, 3).await, [1, 2, 3]);
    // Seqs 4 and 5 are stored, but their live messages go nowhere.
    live_hop(&cluster, "i0", false).await;
    cluster.publish_all(stored("gappy", 3..5)).await;
    eventually(Duration::from_secs(10), "4 and 5 stored", || {
        a.running().metrics.inbox_stored.get() >= 5
    })
    .await;
    assert_silent(&mut tab, Duration::from_millis(300)).await;
    live_hop(&cluster, "i0", true).await;
    cluster.publish_all(stored("gappy", 5..6)).await;
    assert_eq!(
        seqs(&mut tab, 3).await,
        [4, 5, 6],
        "the jump from 3 to 6 is filled first"
    );
    assert_eq!(a.running().metrics.inbox_gap_repairs.get(), 1);
    cluster.stop().await;
}

async fn ticket_on(bridge: &Bridge, user: &str, channels: &[&str]) -> String {
    let reply = bridge
        .request_as(user, channels, "POST", "/api/ws-ticket", "")
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.json()["ticket"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_ticket_from_one_instance_works_once_on_any_instance() {
    let Some(cluster) = TestCluster::start(2).await else {
        return;
    };
    let (a, b) = (&cluster.bridges[0], &cluster.bridges[1]);
    let ticket = ticket_on(a, "tk", &["team"]).await;
    let url = b.ws_url(&format!("/ws?ticket={ticket}&channel=team"));
    let (_client, _, welcome) = accepted(request(&url, &[])).await;
    assert_eq!(welcome["user_id"], "tk", "{welcome}");
    assert_eq!(welcome["channels"], serde_json::json!(["team"]));
    for again in [a, b] {
        let url = again.ws_url(&format!("/ws?ticket={ticket}"));
        assert_refused(request(&url, &[]), 401, "unauthorized").await;
    }
    // Raced on both instances at once: exactly one connects.
    let ticket = ticket_on(b, "tk", &[]).await;
    let (on_a, on_b) = (
        a.ws_url(&format!("/ws?ticket={ticket}")),
        b.ws_url(&format!("/ws?ticket={ticket}")),
    );
    let (ra, rb) = tokio::join!(
        tokio_tungstenite::connect_async(on_a),
        tokio_tungstenite::connect_async(on_b)
    );
    assert_eq!(
        ra.is_ok() as u8 + rb.is_ok() as u8,
        1,
        "one of two redemptions wins"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_connection_target_reaches_that_connection_on_its_instance_only() {
    let Some(cluster) = TestCluster::start(2).await else {
        return;
    };
    let (a, b) = (&cluster.bridges[0], &cluster.bridges[1]);
    let (mut on_a, _) = common::inbox::connect_since(a, "dev", None).await;
    let url = b.ws_url(&format!("/ws?token={}", token("dev", &[])));
    let (mut on_b, _, welcome) = accepted(request(&url, &[])).await;
    assert_eq!(next_json(&mut on_b).await["type"], "inbox");
    let id = welcome["connection_id"].as_str().unwrap();
    cluster
        .publish_all([format!(r#"{{"connection_id":"{id}","payload":"just b"}}"#)])
        .await;
    assert_eq!(next_json(&mut on_b).await["payload"], "just b");
    assert_silent(&mut on_a, Duration::from_millis(500)).await;
    cluster.stop().await;
}

#[tokio::test]
async fn the_writer_decides_delivered_and_offline_receipts_by_presence() {
    let Some(mut cluster) = TestCluster::start(0).await else {
        return;
    };
    for instance in ["i0", "i1"] {
        let mut config = cluster_config(&cluster.db, &cluster.name, &cluster.exchange, instance);
        config.receipts.enabled = true;
        let bridge = Bridge::start_unready(config).await;
        bridge.wait_ready().await;
        cluster.bridges.push(bridge);
    }
    let mut results = common::receipts::ReceiptQueue::results(&cluster.bridges[0]).await;
    // `on` has a tab on each instance, `off` none.
    let _tab_a = common::inbox::connect_since(&cluster.bridges[0], "on", None).await;
    let _tab_b = common::inbox::connect_since(&cluster.bridges[1], "on", None).await;
    cluster
        .publish_all([r#"{"user_ids":["on","off"],"id":"r-1","payload":1}"#.to_string()])
        .await;
    let mut got = [results.body().await, results.body().await];
    got.sort_by_key(|r| r["user_id"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        got[0],
        serde_json::json!({"id":"r-1","user_id":"off","status":"offline","stored":true,"seq":1})
    );
    assert_eq!(
        got[1],
        serde_json::json!({"id":"r-1","user_id":"on","status":"delivered","connections":2,"seq":1})
    );
    results.assert_empty(Duration::from_millis(500)).await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_connection_whose_presence_cannot_be_written_is_closed_with_1011() {
    let Some(cluster) = TestCluster::start(1).await else {
        return;
    };
    let bridge = &cluster.bridges[0];
    let db = pg::connect(&cluster.db).await;
    db.batch_execute("ALTER TABLE cluster_presence RENAME TO cluster_presence_away")
        .await
        .unwrap();
    let url = bridge.ws_url(&format!("/ws?token={}", token("no-presence", &[])));
    let (mut client, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(close_code(&mut client).await, Some(1011));
    // Gone from the router too, and the next connection, once presence can
    // be written again, is served.
    let metrics = bridge.running().metrics.clone();
    eventually(Duration::from_secs(3), "connection unregistered", || {
        metrics.connections.get() == 0
    })
    .await;
    db.batch_execute("ALTER TABLE cluster_presence_away RENAME TO cluster_presence")
        .await
        .unwrap();
    let _served = bridge.connect("no-presence").await;
    cluster.stop().await;
}
