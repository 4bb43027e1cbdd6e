//! The side port's routes that need neither a broker nor a socket, called
//! in-process (tests/common/in_process.rs): health and readiness, metrics,
//! the OpenAPI document, the 404/405 fallbacks and their error body, the
//! demo page and its development tokens, and every refusal that comes
//! before a publish or a store read (keys, tokens, query and body checks).
//! What travels through the broker or the listener is in tests/http_api.rs,
//! tests/http_limits.rs, tests/inbox.rs and tests/hostile.rs.

mod common;

use common::{in_process::App, inbox::ScratchStore, *};
use notify_bridge::config::{AuthMode, Config};
use serde_json::{json, Value};

const API_KEY: &str = "test-api-key";
const ADMIN_KEY: &str = "test-admin-key";

fn with_keys(c: &mut Config) {
    c.http.api_keys = vec![API_KEY.into()];
    c.http.admin_keys = vec![ADMIN_KEY.into()];
    c.amqp.max_message_bytes = 4096;
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn send(app: &App, key: &str, body: &str) -> HttpReply {
    let auth = bearer(key);
    app.call(
        "POST",
        "/api/notifications/send",
        &[("authorization", &auth)],
        body,
    )
    .await
}

/// Exactly the contract's error body: `error` and a non-empty `detail`.
fn assert_error_body(reply: &HttpReply, status: u16, code: &str) {
    reply.assert_error(status, code);
    assert_eq!(reply.json().as_object().unwrap().len(), 2, "{}", reply.body);
    assert!(reply
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json")));
}

// --- health, readiness, metrics, OpenAPI -----------------------------------

// Moved from tests/http_api.rs's `health_and_openapi`, with the same
// assertions (readiness set as the consumer sets it once it consumes).
#[tokio::test]
async fn health_and_openapi() {
    let app = App::new(with_keys).await;
    assert_eq!(app.get("/healthz").await.status, 200);
    app.state.readiness.set_ready();
    assert_eq!(app.get("/readyz").await.status, 200);
    let doc = app.get("/openapi.json").await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/api/notifications/send", "post"),
        ("/api/ws-ticket", "post"),
        ("/api/connections", "get"),
        ("/api/connections/{id}", "delete"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/api/me/notifications", "get"),
        ("/api/me/notifications", "patch"),
        ("/api/users/{user}/notifications", "get"),
        ("/", "get"),
        ("/api/dev/token", "get"),
        ("/assets/demo.js", "get"),
        ("/assets/demo.css", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
}

#[tokio::test]
async fn readyz_answers_503_with_the_reason_until_every_part_is_ready() {
    let app = App::new(|_| {}).await;
    assert_eq!(app.get("/healthz").await.json(), json!({"status": "ok"}));
    let reply = app.get("/readyz").await;
    assert_error_body(&reply, 503, "not_ready");
    assert!(reply.json()["detail"].as_str().unwrap().contains("broker"));

    app.state.readiness.set_ready();
    assert_eq!(app.get("/readyz").await.json(), json!({"status": "ready"}));
    app.state
        .readiness
        .set_store_failing("inbox store failing: disk full");
    let reply = app.get("/readyz").await;
    assert_error_body(&reply, 503, "not_ready");
    assert_eq!(reply.json()["detail"], "inbox store failing: disk full");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = App::new(|_| {}).await;
    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(metric(&reply.body, "notify_bridge_connections"), 0.0);
    assert_eq!(
        metric(
            &reply.body,
            "notify_bridge_messages_total{outcome=\"delivered\"}"
        ),
        0.0
    );
}

// --- fallbacks ---------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_and_methods_get_the_contract_error_body() {
    let app = App::new(|_| {}).await;
    let reply = app.get("/nope").await;
    assert_error_body(&reply, 404, "not_found");
    assert!(reply.json()["detail"].as_str().unwrap().contains("/nope"));

    let reply = app.get("/api/notifications/send").await;
    assert_error_body(&reply, 405, "method_not_allowed");
    assert!(
        reply.header("allow").is_some_and(|a| a.contains("POST")),
        "{:?}",
        reply.headers
    );
    let reply = app.call("DELETE", "/healthz", &[], "").await;
    assert_error_body(&reply, 405, "method_not_allowed");
    assert!(reply.json()["detail"].as_str().unwrap().contains("DELETE"));
}

// --- the send endpoint's refusals --------------------------------------------

// Moved from tests/http_api.rs's `send_errors_are_json_with_fitting_statuses`
// (all but its "nothing reached the user": here the publisher's broker does
// not exist, so a request that got as far as publishing would be a 503, and
// every one below is a 4xx: none was published).
#[tokio::test]
async fn send_errors_are_json_with_fitting_statuses() {
    let app = App::new(with_keys).await;
    for body in [
        "",
        "not json",
        r#"{"user_id": "e"}"#,
        r#"{"payload": 1}"#,
        r#"{"user_id": "e", "channel": "c", "payload": 1}"#,
        r#"{"user_id": "e", "store": 3, "payload": 1}"#,
    ] {
        send(&app, API_KEY, body)
            .await
            .assert_error(400, "bad_request");
    }
    let reply = send(&app, API_KEY, r#"{"payload": 1}"#).await;
    assert!(reply.json()["detail"].as_str().unwrap().contains("target"));

    send(&app, "wrong-key", r#"{"user_id":"e","payload":1}"#)
        .await
        .assert_error(401, "unauthorized");
    app.call(
        "POST",
        "/api/notifications/send",
        &[],
        r#"{"user_id":"e","payload":1}"#,
    )
    .await
    .assert_error(401, "unauthorized");

    let big = format!(r#"{{"user_id":"e","payload":"{}"}}"#, "x".repeat(5000));
    send(&app, API_KEY, &big)
        .await
        .assert_error(413, "too_large");

    app.get("/nope").await.assert_error(404, "not_found");
    let reply = app.get("/api/notifications/send").await;
    reply.assert_error(405, "method_not_allowed");
    assert!(
        reply.header("allow").is_some_and(|a| a.contains("POST")),
        "{:?}",
        reply.headers
    );
    assert_eq!(app.state.metrics.messages_delivered.get(), 0);
}

// Moved from the first half of tests/http_api.rs's
// `no_key_configured_refuses_every_send`.
#[tokio::test]
async fn no_key_configured_refuses_every_send() {
    let app = App::new(|_| {}).await;
    send(&app, "anything", r#"{"user_id":1,"payload":1}"#)
        .await
        .assert_error(401, "unauthorized");
    // The `Token` scheme and a malformed header are refused the same way.
    let reply = app
        .call(
            "POST",
            "/api/notifications/send",
            &[("authorization", "Basic abc")],
            r#"{"user_id":1,"payload":1}"#,
        )
        .await;
    assert_error_body(&reply, 401, "unauthorized");
}

#[tokio::test]
async fn a_send_that_reaches_no_broker_is_503_never_202() {
    let app = App::new(with_keys).await;
    let started = std::time::Instant::now();
    let reply = send(&app, API_KEY, r#"{"user_id":1,"payload":1}"#).await;
    assert_error_body(&reply, 503, "unavailable");
    assert!(
        reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("nothing was queued"),
        "{}",
        reply.body
    );
    // Within the publisher's broker timeout, with room for a busy machine.
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
}

// --- admin and tickets -------------------------------------------------------

#[tokio::test]
async fn admin_routes_take_only_an_admin_key() {
    let app = App::new(with_keys).await;
    let (admin, api) = (bearer(ADMIN_KEY), bearer(API_KEY));
    for headers in [vec![], vec![("authorization", api.as_str())]] {
        assert_error_body(
            &app.call("GET", "/api/connections", &headers, "").await,
            401,
            "unauthorized",
        );
        assert_error_body(
            &app.call("DELETE", "/api/connections/c-1", &headers, "")
                .await,
            401,
            "unauthorized",
        );
    }
    let auth = [("authorization", admin.as_str())];
    let list = app.call("GET", "/api/connections", &auth, "").await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.json(), json!({"connections": []}));
    let blank = app
        .call("GET", "/api/connections?user_id=", &auth, "")
        .await;
    assert_eq!(blank.json(), json!({"connections": []}));
    for id in ["c-1", "garbage"] {
        let path = format!("/api/connections/{id}");
        assert_error_body(
            &app.call("DELETE", &path, &auth, "").await,
            404,
            "not_found",
        );
    }
}

// Moved from tests/tickets.rs's `there_are_no_tickets_without_tokens`.
#[tokio::test]
async fn there_are_no_tickets_without_tokens() {
    let app = App::new(|c| c.auth.mode = AuthMode::None).await;
    let auth = bearer(&token("1", &[]));
    app.call("POST", "/api/ws-ticket", &[("Authorization", &auth)], "")
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn tickets_need_a_valid_token() {
    let app = App::new(|_| {}).await;
    for auth in [None, Some("Bearer not-a-token".to_string())] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", &**a)).collect();
        let reply = app.call("POST", "/api/ws-ticket", &headers, "").await;
        assert_error_body(&reply, 401, "unauthorized");
    }
    let auth = bearer(&token("1", &[]));
    let reply = app
        .call("POST", "/api/ws-ticket", &[("authorization", &auth)], "")
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.json()["expires_in"], 30);
}

// --- the demo page -----------------------------------------------------------

#[tokio::test]
async fn the_demo_page_embeds_its_settings_behind_a_strict_policy() {
    let app = App::new(|c| c.inbox.enabled = false).await;
    let page = app.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let start = page
        .body
        .find(r#"<script id="settings" type="application/json">"#)
        .expect("the settings slot");
    let settings = page.body[start..].split_once('>').unwrap().1;
    let settings: Value = serde_json::from_str(settings.split_once("</script>").unwrap().0)
        .expect("settings are JSON");
    assert_eq!(
        settings,
        json!({"ws_host": "127.0.0.1", "ws_port": 8080, "ws_path": app.config.websocket.path,
               "auth_mode": "jwt", "dev_tokens": false, "inbox": false})
    );

    for (path, content_type, marker) in [
        (
            "/assets/demo.js",
            "text/javascript; charset=utf-8",
            "WebSocket",
        ),
        ("/assets/demo.css", "text/css; charset=utf-8", "@media"),
    ] {
        let asset = app.get(path).await;
        assert_eq!(asset.status, 200, "{path}");
        assert_eq!(asset.header("content-type"), Some(content_type), "{path}");
        assert_eq!(asset.header("cache-control"), Some("no-cache"), "{path}");
        assert!(asset.body.contains(marker), "{path}");
    }
}

#[tokio::test]
async fn dev_tokens_exist_only_when_switched_on() {
    let off = App::new(|_| {}).await;
    assert_error_body(&off.get("/api/dev/token?user_id=1").await, 404, "not_found");

    let on = App::new(|c| c.http.dev_tokens = true).await;
    for query in ["", "?user_id=", "?channel=a"] {
        let reply = on.get(&format!("/api/dev/token{query}")).await;
        assert_error_body(&reply, 400, "bad_request");
    }
    let reply = on
        .get("/api/dev/token?user_id=+ann+&channel=team&channel=")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(
        (body["user_id"].clone(), body["expires_in"].clone()),
        (json!("ann"), json!(3600))
    );
    // A token the bridge itself accepts, for that user and channel.
    let identity = on
        .state
        .auth
        .verify(body["token"].as_str().unwrap())
        .unwrap();
    assert_eq!(identity.user.as_str(), "ann");
    assert!(identity.channels.allows("team") && !identity.channels.allows("other"));
}

// --- the inbox routes' refusals ----------------------------------------------

const INBOX_ROUTES: [(&str, &str); 3] = [
    ("GET", "/api/me/notifications"),
    ("PATCH", "/api/me/notifications"),
    ("GET", "/api/users/x/notifications"),
];

// Moved from tests/inbox.rs's `inbox_routes_answer_404_when_disabled` (its
// HTTP part; the inbox frames' refusal stays there).
#[tokio::test]
async fn inbox_routes_answer_404_when_disabled() {
    let app = App::new(|_| {}).await;
    let me = bearer(&token("x", &[]));
    for (method, path) in INBOX_ROUTES {
        // Before any caller check: also without credentials.
        for headers in [vec![("authorization", me.as_str())], vec![]] {
            let reply = app.call(method, path, &headers, "{}").await;
            assert_error_body(&reply, 404, "not_found");
        }
    }
}

async fn with_inbox(store: &ScratchStore) -> App {
    let path = store.path();
    App::new(move |c| {
        c.inbox.enabled = true;
        c.inbox.path = path;
        c.http.admin_keys = vec![ADMIN_KEY.into()];
    })
    .await
}

/// `GET /api/me/notifications{query}`, with `auth` as the Authorization.
async fn list(app: &App, auth: Option<&str>, query: &str) -> HttpReply {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    let path = format!("/api/me/notifications{query}");
    app.call("GET", &path, &headers, "").await
}

// Moved from the "Errors." part of tests/inbox.rs's `http_list_and_patch`,
// with the same requests and statuses (and now the full error body).
#[tokio::test]
async fn inbox_routes_refuse_bad_callers_queries_and_bodies() {
    let store = ScratchStore::new();
    let app = with_inbox(&store).await;
    let me = bearer(&token("h", &[]));
    assert_error_body(&list(&app, None, "").await, 401, "unauthorized");
    assert_error_body(
        &list(&app, Some("Bearer nonsense"), "").await,
        401,
        "unauthorized",
    );
    for query in [
        "limit=0",
        "limit=501",
        "limit=x",
        "before=-1",
        "before=x",
        "unread=maybe",
        "limit=2&limit=3",
        "before=1&before=2",
    ] {
        let reply = list(&app, Some(&me), &format!("?{query}")).await;
        assert_error_body(&reply, 400, "bad_request");
    }
    for body in [
        "not json",
        r#"{"action":"explode"}"#,
        r#"{"ids":["a"]}"#,
        r#"{"action":"mark_read"}"#,
    ] {
        let reply = app
            .call(
                "PATCH",
                "/api/me/notifications",
                &[("authorization", &me)],
                body,
            )
            .await;
        assert_error_body(&reply, 400, "bad_request");
    }
    // A user's own token is not an admin key.
    let reply = app
        .call(
            "GET",
            "/api/users/h2/notifications",
            &[("authorization", &me)],
            "",
        )
        .await;
    assert_error_body(&reply, 401, "unauthorized");

    // What passes every check reads the (empty) store.
    let reply = list(&app, Some(&me), "?limit=500&before=9&unread=true").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json(),
        json!({"total": 0, "unread": 0, "notifications": []})
    );
}

#[tokio::test]
async fn in_auth_mode_none_the_inbox_caller_is_the_user_id_param() {
    let store = ScratchStore::new();
    let path = store.path();
    let app = App::new(move |c| {
        c.auth.mode = AuthMode::None;
        c.inbox.enabled = true;
        c.inbox.path = path;
    })
    .await;
    let reply = app.get("/api/me/notifications").await;
    assert_error_body(&reply, 401, "unauthorized");
    assert!(reply.json()["detail"].as_str().unwrap().contains("user_id"));
    let reply = app.get("/api/me/notifications?user_id=u").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}
