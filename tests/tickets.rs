//! One-time WebSocket tickets (`POST /api/ws-ticket`, then `?ticket=K`):
//! a ticket connects once, as the token's user with the token's channels,
//! within `auth.ticket_ttl`; used, expired and unknown tickets get 401.
//! (No tickets in `auth.mode = "none"`: tests/http_in_process.rs.)

mod common;

use std::time::Duration;

use common::*;

async fn ticket_for(bridge: &Bridge, token: Option<&str>) -> HttpReply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http_request(
        bridge.running().http_addr,
        "POST",
        "/api/ws-ticket",
        &headers,
        "",
    )
    .await
}

#[tokio::test]
async fn a_ticket_connects_once_as_its_tokens_user_with_its_channels() {
    let bridge = Bridge::start().await;
    let reply = ticket_for(&bridge, Some(&token("7", &["team"]))).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["expires_in"], 30);
    let ticket = body["ticket"].as_str().unwrap().to_string();

    let url = bridge.ws_url(&format!("/ws?ticket={ticket}&channel=team"));
    let (mut client, _, welcome) = accepted(request(&url, &[])).await;
    assert_eq!(welcome["user_id"], "7", "{welcome}");
    assert_eq!(
        welcome["channels"],
        serde_json::json!(["team"]),
        "{welcome}"
    );
    bridge
        .publish(
            &Publisher::connect().await,
            r#"{"channel":"team","payload":"hi"}"#,
        )
        .await;
    assert_eq!(next_json(&mut client).await["payload"], "hi");

    // Used: refused the second time, on any path.
    let detail = assert_refused(request(&url, &[]), 401, "unauthorized").await;
    assert!(detail.contains("ticket"), "{detail}");
    let made_up = bridge.ws_url("/ws?ticket=0123456789abcdef0123456789abcdef");
    assert_refused(request(&made_up, &[]), 401, "unauthorized").await;
    // A channel the token does not grant is still refused.
    let other = ticket_for(&bridge, Some(&token("7", &["team"])))
        .await
        .json();
    let url = bridge.ws_url(&format!(
        "/ws?ticket={}&channel=secret",
        other["ticket"].as_str().unwrap()
    ));
    assert_refused(request(&url, &[]), 403, "forbidden").await;
    bridge.stop().await;
}

#[tokio::test]
async fn tickets_need_a_valid_token_and_expire() {
    let bridge = Bridge::start_with(|c| c.auth.ticket_ttl = Duration::from_millis(500)).await;
    ticket_for(&bridge, None)
        .await
        .assert_error(401, "unauthorized");
    ticket_for(&bridge, Some("not-a-token"))
        .await
        .assert_error(401, "unauthorized");
    let reply = ticket_for(&bridge, Some(&token("1", &[]))).await;
    assert_eq!(reply.json()["expires_in"], 1, "whole seconds, rounded up");
    let ticket = reply.json()["ticket"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let url = bridge.ws_url(&format!("/ws?ticket={ticket}"));
    assert_refused(request(&url, &[]), 401, "unauthorized").await;
    bridge.stop().await;
}
