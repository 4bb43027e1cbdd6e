//! Cluster mode when things die, with the real binary: the active writer
//! killed with SIGKILL mid-stream (another instance takes over, every
//! user's seqs are exactly 1..N), an instance holding users killed (they
//! reconnect elsewhere with `since` and miss nothing; its presence
//! expires), the broker killed and PostgreSQL stopped `-m immediate`
//! mid-stream (nothing stored is lost, `/readyz` dips and returns).
//! `NOTIFY_BRIDGE_FAULTS_LONG=1` runs the 20,000-message version.

mod common;
mod pg;

use std::time::Duration;

use common::{
    daemon::*,
    scripts::{ours_to_stop, run_script},
    *,
};
use serde_json::Value;
use tokio::sync::Mutex;

/// The broker and database faults would disturb the other tests here.
static SERIAL: Mutex<()> = Mutex::const_new(());

const ADMIN_KEY: &str = "cluster-admin-key";

struct Setup {
    place: Placement,
    db: String,
    name: String,
}

impl Setup {
    async fn new() -> Option<Self> {
        Some(Self {
            place: Placement::new(),
            db: pg::fresh_schema().await?,
            name: unique("clf"),
        })
    }

    async fn instance(&self, id: &str) -> Daemon {
        let env = [
            ("NOTIFY_BRIDGE_HTTP__ADMIN_KEYS", ADMIN_KEY),
            ("NOTIFY_BRIDGE_INBOX__ENABLED", "true"),
            ("NOTIFY_BRIDGE_INBOX__STORE", "postgres"),
            ("NOTIFY_BRIDGE_INBOX__POSTGRES_URL", self.db.as_str()),
            ("NOTIFY_BRIDGE_INBOX__MAX_PER_USER", "50000"),
            ("NOTIFY_BRIDGE_CLUSTER__ENABLED", "true"),
            ("NOTIFY_BRIDGE_CLUSTER__NAME", self.name.as_str()),
            ("NOTIFY_BRIDGE_CLUSTER__INSTANCE_ID", id),
        ];
        Daemon::start_at(self.place.clone(), &env).await
    }

    async fn cleanup(self) {
        delete_topology(
            &format!("{}.ingest", self.name),
            &format!("{}.live", self.name),
        )
        .await;
        delete_topology(&self.place.queue, &self.place.exchange).await;
    }
}

fn long() -> bool {
    std::env::var_os("NOTIFY_BRIDGE_FAULTS_LONG").is_some()
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> Option<Value> {
    let auth = format!("Bearer {ADMIN_KEY}");
    let reply = http_request(addr, "GET", path, &[("authorization", &auth)], "").await;
    serde_json::from_str(&reply.body).ok()
}

async fn stored_for(addr: std::net::SocketAddr, user: &str) -> u64 {
    admin_get(addr, &format!("/api/users/{user}/notifications?limit=1"))
        .await
        .and_then(|v| v["total"].as_u64())
        .unwrap_or(0)
}

async fn metric_of(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics").await;
    metric(&text, name)
}

/// A tab of `user` on `daemon`, with `?since=` when given, past its
/// welcome and counts frames.
async fn tab(daemon: &Daemon, user: &str, since: Option<u64>) -> Client {
    let mut url = format!("ws://{}/ws?token={}", daemon.ws_addr, token(user, &[]));
    if let Some(since) = since {
        url.push_str(&format!("&since={since}"));
    }
    let (mut client, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_json(&mut client).await["type"], "welcome");
    assert_eq!(next_json(&mut client).await["type"], "inbox");
    client
}

/// Seqs of notifications until `n` came or 20 s passed in silence.
async fn read_seqs(client: &mut Client, n: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match next_json_within(client, Duration::from_secs(20)).await {
            Some(f) if f["type"] == "notification" => seen.push(f["seq"].as_u64().unwrap()),
            Some(_) => {}
            None => break,
        }
    }
    seen
}

fn bodies(users: u64, range: std::ops::Range<u64>) -> impl Iterator<Item = String> {
    range.map(move |i| {
        format!(
            r#"{{"user_id":"u{}","id":"m-{i}","payload":{i}}}"#,
            i % users
        )
    })
}

#[tokio::test]
async fn the_active_writer_killed_mid_stream_hands_over_and_seqs_stay_1_to_n() {
    let _serial = SERIAL.lock().await;
    let Some(setup) = Setup::new().await else {
        return;
    };
    // The first instance consuming the new ingest queue is its active one.
    let mut writer = setup.instance("w0").await;
    let standby = setup.instance("w1").await;
    let users = 10u64;
    let total = if long() { 20_000 } else { 4_000 };
    let mut tabs = Vec::new();
    for u in 0..users {
        tabs.push(tab(&standby, &format!("u{u}"), None).await);
    }
    let publisher = Publisher::connect().await;
    let mut killed = false;
    for start in (0..total).step_by(200) {
        publisher
            .publish_all(&setup.place.exchange, bodies(users, start..start + 200))
            .await;
        if !killed && stored_for(standby.http_addr, "u0").await >= total / users / 5 {
            assert!(metric_of(writer.http_addr, "notify_bridge_inbox_stored_total").await > 0.0);
            writer.kill_9().await;
            killed = true;
        }
    }
    assert!(killed, "the writer was killed mid-stream");
    let per_user = (total / users) as usize;
    let expected: Vec<u64> = (1..=per_user as u64).collect();
    for (u, tab) in tabs.iter_mut().enumerate() {
        // Live frames, repaired from the store where the dead writer's
        // were lost; the redelivered ones are dropped as duplicates.
        assert_eq!(read_seqs(tab, per_user).await, expected, "u{u}'s tab");
    }
    for u in 0..users {
        assert_eq!(
            stored_for(standby.http_addr, &format!("u{u}")).await,
            per_user as u64
        );
    }
    assert!(metric_of(standby.http_addr, "notify_bridge_inbox_stored_total").await > 0.0);
    standby.terminate().await;
    setup.cleanup().await;
}

async fn live_presence_rows(db: &str, instance: &str) -> i64 {
    let client = pg::connect(db).await;
    client
        .query_one(
            "SELECT COUNT(*) FROM cluster_presence p JOIN cluster_instances i USING (cluster, instance_id)
             WHERE p.instance_id = $1 AND i.heartbeat_at > now() - interval '10 seconds'",
            &[&instance],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn users_of_a_killed_instance_reconnect_elsewhere_and_miss_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(setup) = Setup::new().await else {
        return;
    };
    let other = setup.instance("h0").await;
    let mut holder = setup.instance("h1").await;
    let mut on_holder = tab(&holder, "mover", None).await;
    assert_eq!(live_presence_rows(&setup.db, "h1").await, 1);
    let total = 1000u64;
    let exchange = setup.place.exchange.clone();
    let publishing = tokio::spawn(async move {
        let publisher = Publisher::connect().await;
        for start in (0..total).step_by(50) {
            let bodies = (start..start + 50)
                .map(|i| format!(r#"{{"user_id":"mover","id":"v-{i}","payload":{i}}}"#));
            publisher.publish_all(&exchange, bodies).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut seen = read_seqs(&mut on_holder, 300).await;
    holder.kill_9().await;
    let since = *seen.last().unwrap();
    let mut moved = tab(&other, "mover", Some(since)).await;
    seen.extend(read_seqs(&mut moved, (total - since) as usize).await);
    publishing.await.unwrap();
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while live_presence_rows(&setup.db, "h1").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "h1's presence did not expire"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    other.terminate().await;
    setup.cleanup().await;
}

/// Takes scripts/`script`'s server away with `stop`, and checks that
/// `watcher`'s /readyz dips without it and returns after `start`. A server
/// the tests only reuse is never stopped: the test says so and goes on.
async fn outage(script: &str, url: &str, stop: &str, what: &str, watcher: &Daemon) {
    if let Err(why) = ours_to_stop(script, url) {
        eprintln!("SKIPPED the {what} outage: {why}");
        return;
    }
    run_script(script, &[stop]);
    assert!(
        readyz_becomes(watcher.http_addr, 503).await,
        "/readyz dips without the {what}"
    );
    run_script(script, &["start"]);
    assert!(
        readyz_becomes(watcher.http_addr, 200).await,
        "/readyz returns with the {what}"
    );
}

/// Polls `/readyz` until it answers `want`; false after 60 s.
async fn readyz_becomes(addr: std::net::SocketAddr, want: u16) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if http_get(addr, "/readyz").await.0 == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_broker_kill_and_a_database_stop_mid_stream_lose_nothing_stored() {
    let _serial = SERIAL.lock().await;
    let Some(setup) = Setup::new().await else {
        return;
    };
    let a = setup.instance("f0").await;
    let b = setup.instance("f1").await;
    let users = 4u64;
    let slice = 500u64;
    let publisher = Publisher::connect().await;
    publisher
        .publish_all(&setup.place.exchange, bodies(users, 0..slice))
        .await;
    drop(publisher);
    // The broker dies while the writer works through the slice.
    outage("rabbitmq", &amqp_url(), "kill", "broker", &a).await;
    assert!(readyz_becomes(b.http_addr, 200).await);

    let publisher = Publisher::connect().await;
    publisher
        .publish_all(&setup.place.exchange, bodies(users, slice..2 * slice))
        .await;
    // An open tab must keep receiving live frames across the database's
    // crash restart (its presence row, unlogged, is gone after it).
    let mut open_tab = tab(&b, "u0", None).await;
    // The database stops at once while the next slice is committed.
    outage("postgres", &setup.db, "stop-immediate", "database", &a).await;
    publisher
        .publish_all(&setup.place.exchange, bodies(users, 2 * slice..3 * slice))
        .await;

    let per_user = 3 * slice / users;
    let mut last_live = 0;
    while last_live < per_user {
        match next_json_within(&mut open_tab, Duration::from_secs(30)).await {
            Some(f) if f["type"] == "notification" => last_live = f["seq"].as_u64().unwrap(),
            Some(_) => {}
            None => panic!(
                "the open tab stopped at seq {last_live} of {per_user}\n--- a ---\n{}\n--- b ---\n{}",
                a.log(),
                b.log()
            ),
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for u in 0..users {
        let user = format!("u{u}");
        while stored_for(b.http_addr, &user).await < per_user {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user}: not all stored"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            stored_for(b.http_addr, &user).await,
            per_user,
            "{user}: stored once each"
        );
        let mut replayed = tab(&a, &user, Some(0)).await;
        let seqs = read_seqs(&mut replayed, per_user as usize).await;
        assert_eq!(seqs, (1..=per_user).collect::<Vec<_>>(), "{user}'s replay");
    }
    a.terminate().await;
    b.terminate().await;
    setup.cleanup().await;
}
