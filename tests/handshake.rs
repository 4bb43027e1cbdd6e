//! Who may connect, how, and what the first frames and the keep-alive look
//! like: every handshake refusal of the contract, the three token
//! transports, compatibility paths, `auth.mode = "none"`, connection limits,
//! token expiry, and server pings.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

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
    assert_refused(ws(&format!("?token={none}")), 401, "unauthorized").await;
    // The same through the Authorization header.
    let header = format!("Bearer {none}");
    assert_refused(
        request(&bridge.ws_url("/ws"), &[("authorization", &header)]),
        401,
        "unauthorized",
    )
    .await;

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
    send_text(&mut by_path, r#"{"type":"subscribe","channel":"whatever"}"#).await;
    assert_eq!(
        next_json(&mut by_path).await,
        json!({"type": "subscribed", "channel": "whatever"})
    );
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

/// Connects `user` until accepted (limits are released asynchronously).
async fn connect_when_released(bridge: &Bridge, user: &str) -> Client {
    let url = bridge.ws_url(&format!("/ws?token={}", token(user, &[])));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((mut client, _)) => {
                assert_eq!(next_json(&mut client).await["type"], "welcome");
                return client;
            }
            Err(e) => {
                let e = describe_ws_error(e);
                assert!(e.starts_with("HTTP 503"), "{e}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the limit was not released: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
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
    let again = connect_when_released(&bridge, "1").await;
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
    let second = connect_when_released(&bridge, "2").await;
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

#[tokio::test]
async fn server_pings_keep_readers_and_drop_silent_peers() {
    let bridge = Bridge::start_with(|c| c.websocket.ping_interval = Duration::from_secs(1)).await;
    let metrics = bridge.running().metrics.clone();
    let t = token("p", &[]);

    // A raw client that completes the upgrade and then neither reads nor
    // answers anything.
    let mut silent = tokio::net::TcpStream::connect(bridge.running().ws_addr)
        .await
        .unwrap();
    let upgrade = format!(
        "GET /ws?token={t} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        bridge.running().ws_addr
    );
    silent.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, silent.read(&mut byte))
            .await
            .expect("upgrade response in time")
            .unwrap();
        assert_eq!(n, 1, "connection closed during the upgrade");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let silent_since = tokio::time::Instant::now();

    // A well-behaved client: it keeps reading, so tungstenite answers pings.
    let mut reader = bridge.connect("p").await;
    eventually(Duration::from_secs(3), "both registered", || {
        metrics.connections.get() == 2
    })
    .await;

    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut silent_dropped_after = None;
    loop {
        // Reading (so pings are answered) and watching the gauge every 10 ms.
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            frame = reader.next() => match frame {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("the reading client got {other:?}"),
            },
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        if silent_dropped_after.is_none() && metrics.connections.get() == 1 {
            silent_dropped_after = Some(silent_since.elapsed());
        }
    }
    assert!(pings >= 3, "only {pings} pings in 4 s at a 1 s interval");
    let dropped = silent_dropped_after.expect("the silent peer was never dropped");
    assert!(
        dropped >= Duration::from_millis(1500) && dropped <= Duration::from_millis(3900),
        "silent peer dropped after {dropped:?}, expected about 3 ping intervals"
    );

    // The silent peer's TCP connection is gone too: what it was sent, then EOF.
    let eof = async {
        let mut buf = [0u8; 1024];
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), eof)
        .await
        .expect("the silent peer's socket was closed");

    // The reader is still fully alive.
    reader
        .send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut reader).await, json!({"type": "pong"}));
    assert_eq!(metrics.connections.get(), 1);
    drop(reader);
    bridge.stop().await;
}

/// Upgrades a raw TCP connection and returns it; the caller never reads
/// from it again.
async fn raw_upgrade(bridge: &Bridge, token: &str) -> tokio::net::TcpStream {
    let addr = bridge.running().ws_addr;
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let upgrade = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    raw.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, raw.read(&mut byte))
            .await
            .expect("upgrade response in time")
            .unwrap();
        assert_eq!(n, 1, "connection closed during the upgrade");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    raw
}

#[tokio::test]
async fn a_peer_that_stops_reading_mid_backlog_is_still_dropped() {
    // The socket buffers fill up, so writes to the peer block; with fewer
    // messages than `send_queue` and fewer bytes than `send_queue_bytes`
    // (18 MB here, under the 64 MiB set below) nobody else closes it: the
    // ping deadline must still apply.
    let bridge = Bridge::start_with(|c| {
        c.websocket.ping_interval = Duration::from_secs(1);
        c.websocket.send_queue_bytes = 64 << 20;
    })
    .await;
    let metrics = bridge.running().metrics.clone();
    let publisher = Publisher::connect().await;
    let _stuck = raw_upgrade(&bridge, &token("stuck", &[])).await;
    eventually(Duration::from_secs(3), "registered", || {
        metrics.connections.get() == 1
    })
    .await;

    let big = "z".repeat(60_000);
    for _ in 0..300 {
        bridge
            .publish(
                &publisher,
                &format!(r#"{{"user_id":"stuck","payload":"{big}"}}"#),
            )
            .await;
    }
    let published = tokio::time::Instant::now();
    // 300 < send_queue (1024): no slow-client close.
    eventually(Duration::from_secs(10), "all routed", || {
        metrics.messages_delivered.get() == 300
    })
    .await;
    assert_eq!(metrics.slow_client_closes.get(), 0);
    eventually(Duration::from_secs(8), "the stuck peer dropped", || {
        metrics.connections.get() == 0
    })
    .await;
    assert!(
        published.elapsed() < Duration::from_secs(8),
        "{:?}",
        published.elapsed()
    );
    bridge.stop().await;
}
