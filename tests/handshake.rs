//! Who may connect, how, and what the first frames and the keep-alive look
//! like: every handshake refusal of the contract, the three token
//! transports, compatibility paths, `auth.mode = "none"`, connection limits,
//! and token expiry over a real socket (its timing, and server pings, with
//! paused time in src/ws/session_tests.rs).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn every_bad_token_is_refused_with_401() {
    let bridge = Bridge::start().await;
    let ws = |q: &str| request(&bridge.ws_url(&format!("/ws{q}")), &[]);

    let detail = assert_refused(ws(""), 401, "unauthorized").await;
    assert!(detail.contains("token"), "{detail}");

    // Signed with another secret.
    let mut other = test_config().auth;
    other.jwt_secret = Some("some-other-secret-0123456789".into());
    let forged = notify_bridge::auth::mint(&other, "1", &[], Duration::from_secs(3600)).unwrap();
    let detail = assert_refused(ws(&format!("?token={forged}")), 401, "unauthorized").await;
    assert!(detail.contains("signature"), "{detail}");

    // Not a JWT at all.
    assert_refused(ws("?token=not-a-token"), 401, "unauthorized").await;

    // Expired by more than the clock leeway.
    let expired = token_with_claims(json!({"sub": "1", "exp": unix_now() - 120}));
    let detail = assert_refused(ws(&format!("?token={expired}")), 401, "unauthorized").await;
    assert!(detail.contains("expired"), "{detail}");

    // `alg: none`, no signature, otherwise a fine token.
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(format!(r#"{{"sub":"1","exp":{}}}"#, unix_now() + 3600).as_bytes())
    );
    // In the query and through the Authorization header.
    assert_token_refused(&bridge, &none).await;

    // No `exp`.
    let eternal = token_with_claims(json!({"sub": "1"}));
    let detail = assert_refused(ws(&format!("?token={eternal}")), 401, "unauthorized").await;
    assert!(detail.contains("exp"), "{detail}");

    // A good signature but no usable user.
    let anonymous = token_with_claims(json!({"exp": unix_now() + 3600}));
    assert_refused(ws(&format!("?token={anonymous}")), 401, "unauthorized").await;

    // `bearer` offered as a subprotocol without a token after it.
    assert_refused(
        request(
            &bridge.ws_url("/ws"),
            &[("sec-websocket-protocol", "bearer")],
        ),
        401,
        "unauthorized",
    )
    .await;

    // A token just past `exp` but within the leeway is still accepted.
    let recent = token_with_claims(json!({"sub": "1", "exp": unix_now() - 5}));
    let url = bridge.ws_url(&format!("/ws?token={recent}"));
    let result = tokio_tungstenite::connect_async(url).await;
    assert!(
        result.is_ok(),
        "a token 5 s past exp is within the leeway: {:?}",
        result.err().map(describe_ws_error)
    );
    drop(result);
    bridge.stop().await;
}

#[tokio::test]
async fn origins_are_checked_only_against_a_configured_list() {
    let bridge = Bridge::start_with(|c| {
        c.websocket.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let url = bridge.ws_url(&format!("/ws?token={}", token("1", &[])));

    let detail = assert_refused(
        request(&url, &[("origin", "https://evil.example")]),
        403,
        "forbidden",
    )
    .await;
    assert!(detail.contains("origin"), "{detail}");
    // The origin is refused even before the token is looked at.
    assert_refused(
        request(&bridge.ws_url("/ws"), &[("origin", "https://evil.example")]),
        403,
        "forbidden",
    )
    .await;

    let (_, _, welcome) = accepted(request(&url, &[("origin", "https://app.example")])).await;
    assert_eq!(welcome["user_id"], "1");
    // No Origin header (servers, scripts) is never refused for its origin.
    let (_, _, _) = accepted(request(&url, &[])).await;
    bridge.stop().await;

    // An empty list (the default) allows every origin.
    let open = Bridge::start().await;
    let url = open.ws_url(&format!("/ws?token={}", token("1", &[])));
    let (_, _, _) = accepted(request(&url, &[("origin", "https://anything.example")])).await;
    open.stop().await;
}

#[tokio::test]
async fn the_token_works_in_query_header_and_subprotocol() {
    let bridge = Bridge::start().await;
    let t = token("42", &[]);

    let (mut by_query, response, welcome) =
        accepted(request(&bridge.ws_url(&format!("/ws?token={t}")), &[])).await;
    assert_eq!(welcome["user_id"], "42");
    assert!(
        response.headers().get("sec-websocket-protocol").is_none(),
        "no subprotocol was offered, none may be answered"
    );

    let header = format!("Bearer {t}");
    let (mut by_header, _, welcome) = accepted(request(
        &bridge.ws_url("/ws"),
        &[("authorization", &header)],
    ))
    .await;
    assert_eq!(welcome["user_id"], "42");

    let offered = format!("bearer, {t}");
    let (mut by_protocol, response, welcome) = accepted(request(
        &bridge.ws_url("/ws"),
        &[("sec-websocket-protocol", &offered)],
    ))
    .await;
    assert_eq!(welcome["user_id"], "42");
    let answered: Vec<&str> = response
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(answered, vec!["bearer"]);
    for (name, value) in response.headers() {
        assert!(
            !value.to_str().unwrap_or("").contains(&t),
            "the token is echoed in {name}"
        );
    }

    // All three are live sessions of the same user.
    let publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, r#"{"user_id":42,"id":"t3","payload":1}"#)
        .await;
    for client in [&mut by_query, &mut by_header, &mut by_protocol] {
        assert_eq!(next_json(client).await["id"], "t3");
    }
    // Clients that are gone let the bridge stop without waiting for their
    // close replies.
    drop((by_query, by_header, by_protocol));
    bridge.stop().await;
}

#[tokio::test]
async fn channels_at_connect_need_the_claim_or_a_public_pattern() {
    let bridge =
        Bridge::start_with(|c| c.websocket.public_channels = vec!["public:*".into()]).await;
    let t = token("1", &["team"]);
    let url = |q: &str| bridge.ws_url(&format!("/ws?token={t}{q}"));

    let detail = assert_refused(request(&url("&channel=secret"), &[]), 403, "forbidden").await;
    assert!(detail.contains("secret"), "{detail}");
    // The pattern is a glob over the whole name, not a prefix of it.
    assert_refused(
        request(&url("&channel=private:public:x"), &[]),
        403,
        "forbidden",
    )
    .await;
    // One refused channel refuses the whole connection.
    assert_refused(
        request(&url("&channel=team&channel=secret"), &[]),
        403,
        "forbidden",
    )
    .await;

    let (_, _, welcome) = accepted(request(&url("&channel=public%3Anews"), &[])).await;
    assert_eq!(welcome["channels"], json!(["public:news"]));
    let (_, _, welcome) = accepted(request(
        &url("&channel=team&channel=public:news&channel=team"),
        &[],
    ))
    .await;
    assert_eq!(welcome["channels"], json!(["team", "public:news"]));
    bridge.stop().await;
}

#[tokio::test]
async fn compatibility_paths_must_name_the_token_user() {
    let bridge = Bridge::start().await;
    let t = token("7", &[]);

    for path in ["/ws/7", "/ws/7/", "/ws/notifications/7/", "/ws/"] {
        let (_c, _, welcome) =
            accepted(request(&bridge.ws_url(&format!("{path}?token={t}")), &[])).await;
        assert_eq!(welcome["user_id"], "7", "{path}");
    }
    for path in ["/ws/8", "/ws/notifications/8/"] {
        let detail = assert_refused(
            request(&bridge.ws_url(&format!("{path}?token={t}")), &[]),
            403,
            "forbidden",
        )
        .await;
        assert!(detail.contains('8'), "{path}: {detail}");
    }
    for path in ["/other", "/wsx", "/", "/api/ws"] {
        assert_refused(
            request(&bridge.ws_url(&format!("{path}?token={t}")), &[]),
            404,
            "not_found",
        )
        .await;
    }
    bridge.stop().await;
}

#[tokio::test]
async fn auth_mode_none_takes_the_user_from_the_url() {
    let bridge = Bridge::start_with(|c| {
        c.auth.mode = notify_bridge::config::AuthMode::None;
        c.auth.jwt_secret = None;
    })
    .await;
    let publisher = Publisher::connect().await;

    let (mut by_query, _, welcome) = accepted(request(
        &bridge.ws_url("/ws?user_id=5&channel=anything"),
        &[],
    ))
    .await;
    assert_eq!(welcome["user_id"], "5");
    assert_eq!(welcome["channels"], json!(["anything"]));
    let (mut by_path, _, welcome) = accepted(request(&bridge.ws_url("/ws/6"), &[])).await;
    assert_eq!(welcome["user_id"], "6");

    assert_refused(request(&bridge.ws_url("/ws"), &[]), 401, "unauthorized").await;
    assert_refused(
        request(&bridge.ws_url("/ws?user_id="), &[]),
        401,
        "unauthorized",
    )
    .await;

    // Every channel may be joined later too.
    change_subscription(&mut by_path, "subscribe", "whatever").await;
    bridge
        .publish(&publisher, r#"{"user_id":5,"id":"n5","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut by_query).await["id"], "n5");
    bridge
        .publish(&publisher, r#"{"channel":"whatever","id":"w","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut by_path).await["id"], "w");
    drop((by_query, by_path));
    bridge.stop().await;
}

#[tokio::test]
async fn per_user_connection_limit() {
    let bridge = Bridge::start_with(|c| c.websocket.max_connections_per_user = 1).await;
    let mut first = bridge.connect("1").await;

    let url = bridge.ws_url(&format!("/ws?token={}", token("1", &[])));
    let detail = assert_refused(request(&url, &[]), 503, "unavailable").await;
    assert!(detail.contains("max_connections_per_user"), "{detail}");
    // Another user is not limited by user 1's connection.
    let other = bridge.connect("2").await;
    // The refused attempt took no place.
    assert_eq!(bridge.running().metrics.connections.get(), 2);

    first.close(None).await.unwrap();
    drop(first);
    let again = bridge.connect_when_released("1").await;
    assert_refused(request(&url, &[]), 503, "unavailable").await;
    drop((other, again));
    bridge.stop().await;
}

#[tokio::test]
async fn global_connection_limit() {
    let bridge = Bridge::start_with(|c| c.websocket.max_connections = 1).await;
    let first = bridge.connect("1").await;

    let url = bridge.ws_url(&format!("/ws?token={}", token("2", &[])));
    let detail = assert_refused(request(&url, &[]), 503, "unavailable").await;
    assert!(detail.contains("max_connections"), "{detail}");

    // Dropping the TCP connection without a close frame also frees it.
    drop(first);
    let second = bridge.connect_when_released("2").await;
    assert_refused(request(&url, &[]), 503, "unavailable").await;
    drop(second);
    bridge.stop().await;
}

#[tokio::test]
async fn a_connection_is_closed_with_1008_when_its_token_expires() {
    let bridge = Bridge::start().await;
    // The bridge tolerates up to 30 s past exp at connect, so a token about
    // to expire is still accepted, and must be cut off when it does.
    let t = token_with_claims(json!({"sub": "1", "exp": unix_now() + 2}));
    let connected = tokio::time::Instant::now();
    let (mut client, _, welcome) =
        accepted(request(&bridge.ws_url(&format!("/ws?token={t}")), &[])).await;
    assert_eq!(welcome["user_id"], "1");
    let code = close_code(&mut client).await;
    let after = connected.elapsed();
    assert_eq!(code, Some(1008));
    assert!(
        after >= Duration::from_millis(500) && after <= Duration::from_secs(6),
        "closed after {after:?}"
    );
    // The closed session is gone from the router.
    let metrics = bridge.running().metrics.clone();
    eventually(Duration::from_secs(3), "connection unregistered", || {
        metrics.connections.get() == 0
    })
    .await;
    bridge.stop().await;
}

#[tokio::test]
async fn the_welcome_frame_has_exactly_the_contract_shape() {
    let bridge = Bridge::start().await;
    let t = token("1", &["general"]);
    let url = bridge.ws_url(&format!("/ws?token={t}&channel=general"));
    let (a, _, first) = accepted(request(&url, &[])).await;
    let (b, _, second) = accepted(request(&url, &[])).await;

    for welcome in [&first, &second] {
        let id = welcome["connection_id"].as_str().expect("a string id");
        assert!(id.starts_with("c-") && id.len() > 2, "connection_id {id:?}");
        let mut expected = json!({
            "type": "welcome",
            "user_id": "1",
            "channels": ["general"],
        });
        expected["connection_id"] = Value::String(id.to_string());
        assert_eq!(*welcome, expected);
    }
    assert_ne!(first["connection_id"], second["connection_id"]);
    drop((a, b));

    // Without channels the list is empty, not missing; an integer-like
    // user claim comes back as a string.
    let t = token_with_claims(json!({"sub": 1, "exp": unix_now() + 3600}));
    let (_, _, welcome) = accepted(request(&bridge.ws_url(&format!("/ws?token={t}")), &[])).await;
    assert_eq!(welcome["user_id"], "1");
    assert_eq!(welcome["channels"], json!([]));
    bridge.stop().await;
}

// Pings (a reader stays, a silent peer is dropped within three intervals)
// and a peer that stops reading mid-backlog (dropped after two intervals,
// no 1013) are driven with paused time in src/ws/session_tests.rs; dead and
// slow peers over real sockets in tests/client_faults.rs.
