//! The HTTP side port against the real broker: REST sends travel through the
//! exchange to the user's socket, a broker that refuses gets 503, metrics
//! and the admin routes see real connections. Refusals that come before any
//! publish (and health, OpenAPI, the fallbacks) are in
//! tests/http_in_process.rs, without a broker.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const API_KEY: &str = "test-api-key";
const ADMIN_KEY: &str = "test-admin-key";

async fn http(
    bridge: &Bridge,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    http_request(bridge.running().http_addr, method, path, headers, body).await
}

fn auth(key: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {key}"))
}

async fn start() -> Bridge {
    Bridge::start_with(|c| {
        c.http.api_keys = vec![API_KEY.into()];
        c.http.admin_keys = vec![ADMIN_KEY.into()];
        c.amqp.max_message_bytes = 4096;
    })
    .await
}

async fn send(bridge: &Bridge, key: &str, body: &str) -> HttpReply {
    let (name, value) = auth(key);
    http(
        bridge,
        "POST",
        "/api/notifications/send",
        &[(name, &value)],
        body,
    )
    .await
}

#[tokio::test]
async fn rest_send_reaches_the_socket_with_the_same_id() {
    let bridge = start().await;
    let mut client = bridge.connect("42").await;

    let reply = send(
        &bridge,
        API_KEY,
        r#"{"user_id": 42, "payload": {"via": "http"}}"#,
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["status"], "queued");
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    let frame = next_json(&mut client).await;
    assert_eq!(frame["id"], id.as_str());
    assert_eq!(frame["payload"], json!({"via": "http"}));

    // The body's own id wins; trailing slash and `Token` scheme work too.
    let reply = http(
        &bridge,
        "POST",
        "/api/notifications/send/",
        &[
            ("authorization", &format!("Token {API_KEY}")),
            ("content-type", "text/plain"),
        ],
        r#"{"user_id": "42", "id": "mine", "event": "chat", "payload": [1]}"#,
    )
    .await;
    assert_eq!(
        (reply.status, reply.json()["id"].clone()),
        (202, json!("mine"))
    );
    let frame = next_json(&mut client).await;
    assert_eq!(
        (frame["id"].as_str(), frame["event"].as_str()),
        (Some("mine"), Some("chat"))
    );

    // An admin key may send as well.
    let reply = send(&bridge, ADMIN_KEY, r#"{"broadcast": true, "payload": 0}"#).await;
    assert_eq!(reply.status, 202);
    assert_eq!(next_json(&mut client).await["broadcast"], true);
    bridge.stop().await;
}

#[tokio::test]
async fn anonymous_sends_reach_the_socket_when_allowed() {
    // Without the switch and without keys every send is refused: in
    // tests/http_in_process.rs (`no_key_configured_refuses_every_send`).
    let bridge = Bridge::start_with(|c| c.http.allow_anonymous = true).await;
    let mut client = bridge.connect("anon").await;
    let reply = http(
        &bridge,
        "POST",
        "/api/notifications/send",
        &[],
        r#"{"user_id":"anon","payload":1}"#,
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(next_json(&mut client).await["id"], reply.json()["id"]);
    bridge.stop().await;
}

#[tokio::test]
async fn a_broker_that_refuses_gets_503_never_202() {
    let bridge = start().await;
    // The exchange is gone: the broker closes the publishing channel.
    let publisher = Publisher::connect().await;
    publisher
        .channel
        .exchange_delete(
            bridge.config.amqp.exchange.as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    send(&bridge, API_KEY, r#"{"user_id":1,"payload":1}"#)
        .await
        .assert_error(503, "unavailable");
    bridge.stop().await;

    // No broker at all.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut config = test_config();
    config.amqp.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    config.http.api_keys = vec![API_KEY.into()];
    let bridge = Bridge::start_unready(config).await;
    let started = std::time::Instant::now();
    send(&bridge, API_KEY, r#"{"user_id":1,"payload":1}"#)
        .await
        .assert_error(503, "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    http(&bridge, "GET", "/readyz", &[], "")
        .await
        .assert_error(503, "not_ready");
    bridge.stop().await;
}

#[tokio::test]
async fn metrics_move_by_exactly_what_was_sent() {
    let bridge = start().await;
    let mut client = bridge.connect("m").await;
    let before = http(&bridge, "GET", "/metrics", &[], "").await;
    assert_eq!(before.status, 200);
    assert!(before
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(metric(&before.body, "notify_bridge_connections"), 1.0);
    assert_eq!(metric(&before.body, "notify_bridge_amqp_connected"), 1.0);

    for i in 0..5 {
        let reply = send(
            &bridge,
            API_KEY,
            &format!(r#"{{"user_id":"m","payload":{i}}}"#),
        )
        .await;
        assert_eq!(reply.status, 202);
    }
    send(&bridge, API_KEY, r#"{"user_id":"nobody-here","payload":0}"#).await;
    for _ in 0..5 {
        next_json(&mut client).await;
    }
    // The no-recipient message is counted once the router took it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        let after = http(&bridge, "GET", "/metrics", &[], "").await.body;
        if metric(
            &after,
            "notify_bridge_messages_total{outcome=\"no_recipient\"}",
        ) >= 1.0
            || tokio::time::Instant::now() > deadline
        {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let delta = |name: &str| metric(&after, name) - metric(&before.body, name);
    assert_eq!(
        delta("notify_bridge_messages_total{outcome=\"delivered\"}"),
        5.0
    );
    assert_eq!(
        delta("notify_bridge_messages_total{outcome=\"no_recipient\"}"),
        1.0
    );
    assert_eq!(
        delta("notify_bridge_messages_total{outcome=\"invalid\"}"),
        0.0
    );
    assert_eq!(delta("notify_bridge_frames_sent_total"), 5.0);
    assert_eq!(delta("notify_bridge_delivery_seconds_count"), 5.0);
    bridge.stop().await;
}

#[tokio::test]
async fn admin_lists_and_closes_connections() {
    let bridge = start().await;
    let mut one = bridge.connect_channels("admin-u1", &["c1"], &["c1"]).await;
    let _two = bridge.connect("admin-u2").await;
    let (name, admin) = auth(ADMIN_KEY);

    let all = http(&bridge, "GET", "/api/connections", &[(name, &admin)], "").await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(all.json()["connections"].as_array().unwrap().len(), 2);

    let mine = http(
        &bridge,
        "GET",
        "/api/connections?user_id=admin-u1",
        &[(name, &admin)],
        "",
    )
    .await;
    let list = mine.json()["connections"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1);
    // `?user_id=` is read as on every route (query::user_id): the first
    // one not blank, trimmed; a blank one is none given (it was a 400).
    for query in ["user_id=&user_id=+admin-u1+", "user_id=+admin-u1"] {
        let path = format!("/api/connections?{query}");
        let reply = http(&bridge, "GET", &path, &[(name, &admin)], "").await;
        assert_eq!(reply.json()["connections"], json!(list), "{query}");
    }
    let blank = http(
        &bridge,
        "GET",
        "/api/connections?user_id=",
        &[(name, &admin)],
        "",
    )
    .await;
    assert_eq!(blank.status, 200, "{}", blank.body);
    assert_eq!(blank.json()["connections"].as_array().unwrap().len(), 2);
    let conn = &list[0];
    assert_eq!(conn["user_id"], "admin-u1");
    assert_eq!(conn["channels"], json!(["c1"]));
    assert!(conn["remote_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let connected_at = conn["connected_at"].as_str().unwrap();
    assert!(
        connected_at.ends_with('Z') && connected_at.len() == 20,
        "{connected_at}"
    );
    let id = conn["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("c-"));

    // An API key is not an admin key.
    let (_, api) = auth(API_KEY);
    http(&bridge, "GET", "/api/connections", &[(name, &api)], "")
        .await
        .assert_error(401, "unauthorized");
    http(
        &bridge,
        "DELETE",
        &format!("/api/connections/{id}"),
        &[],
        "",
    )
    .await
    .assert_error(401, "unauthorized");

    let closed = http(
        &bridge,
        "DELETE",
        &format!("/api/connections/{id}"),
        &[(name, &admin)],
        "",
    )
    .await;
    assert_eq!(closed.status, 204, "{}", closed.body);
    assert_eq!(close_code(&mut one).await, Some(1008));
    http(
        &bridge,
        "DELETE",
        &format!("/api/connections/{id}"),
        &[(name, &admin)],
        "",
    )
    .await
    .assert_error(404, "not_found");
    http(
        &bridge,
        "DELETE",
        "/api/connections/garbage",
        &[(name, &admin)],
        "",
    )
    .await
    .assert_error(404, "not_found");
    bridge.stop().await;
}
