//! A message on the exchange reaches exactly the right sockets.

mod common;

use std::time::Duration;

use common::{inbox::ScratchStore, *};
use futures_util::StreamExt;
use lapin::{
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn user_message_reaches_every_socket_of_that_user_and_nobody_else() {
    let bridge = Bridge::start().await;
    let publisher = Publisher::connect().await;
    let mut tab1 = bridge.connect("1").await;
    let mut tab2 = bridge.connect("1").await;
    let mut other = bridge.connect("2").await;

    bridge
        .publish(
            &publisher,
            r#"{"user_id": 1, "id": "m1", "payload": {"text": "hello"}}"#,
        )
        .await;
    for tab in [&mut tab1, &mut tab2] {
        let frame = next_json(tab).await;
        assert_eq!(
            frame,
            json!({"type": "notification", "id": "m1", "event": "notification", "payload": {"text": "hello"}})
        );
    }
    assert_silent(&mut other, QUIET).await;

    // "1" and 1 are the same user.
    bridge
        .publish(
            &publisher,
            r#"{"user_id": "1", "id": "m2", "payload": null}"#,
        )
        .await;
    assert_eq!(next_json(&mut tab1).await["id"], "m2");
    assert_eq!(next_json(&mut tab2).await["payload"], Value::Null);
    assert_silent(&mut other, QUIET).await;
    bridge.stop().await;
}

#[tokio::test]
async fn user_ids_channel_and_broadcast_targets() {
    let bridge =
        Bridge::start_with(|c| c.websocket.public_channels = vec!["public:*".into()]).await;
    let publisher = Publisher::connect().await;
    let mut a = bridge.connect_channels("a", &["team"], &["team"]).await;
    let mut b = bridge.connect_channels("b", &[], &["public:news"]).await;
    let mut c = bridge.connect("c").await;

    bridge
        .publish(
            &publisher,
            r#"{"user_ids": ["a", "b", "a"], "id": "many", "payload": 1}"#,
        )
        .await;
    assert_eq!(next_json(&mut a).await["id"], "many");
    assert_eq!(next_json(&mut b).await["id"], "many");
    assert_silent(&mut a, QUIET).await; // listed twice, received once
    assert_silent(&mut c, Duration::ZERO).await;

    bridge
        .publish(
            &publisher,
            r#"{"channel": "team", "id": "t", "payload": 2}"#,
        )
        .await;
    let frame = next_json(&mut a).await;
    assert_eq!(
        (frame["id"].as_str(), frame["channel"].as_str()),
        (Some("t"), Some("team"))
    );

    bridge
        .publish(
            &publisher,
            r#"{"channel": "public:news", "id": "n", "payload": 3}"#,
        )
        .await;
    assert_eq!(next_json(&mut b).await["id"], "n");

    bridge
        .publish(
            &publisher,
            r#"{"broadcast": true, "id": "all", "payload": 4}"#,
        )
        .await;
    for client in [&mut a, &mut b, &mut c] {
        let frame = next_json(client).await;
        assert_eq!(frame["id"], "all");
        assert_eq!(frame["broadcast"], true);
    }
    assert_silent(&mut c, QUIET).await; // c saw no channel message
    bridge.stop().await;
}

#[tokio::test]
async fn subscribe_and_unsubscribe_frames() {
    let bridge = Bridge::start().await;
    let publisher = Publisher::connect().await;
    let mut client = bridge.connect_channels("u", &["allowed"], &[]).await;

    send_text(&mut client, r#"{"type":"subscribe","channel":"secret"}"#).await;
    let refused = next_json(&mut client).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );

    change_subscription(&mut client, "subscribe", "allowed").await;
    bridge
        .publish(
            &publisher,
            r#"{"channel": "allowed", "id": "x", "payload": {}}"#,
        )
        .await;
    assert_eq!(next_json(&mut client).await["id"], "x");
    bridge
        .publish(
            &publisher,
            r#"{"channel": "secret", "id": "y", "payload": {}}"#,
        )
        .await;

    change_subscription(&mut client, "unsubscribe", "allowed").await;
    bridge
        .publish(
            &publisher,
            r#"{"channel": "allowed", "id": "z", "payload": {}}"#,
        )
        .await;
    assert_silent(&mut client, QUIET).await;
    bridge.stop().await;
}

#[tokio::test]
async fn message_without_content_type_or_message_id_gets_a_uuid() {
    let bridge = Bridge::start().await;
    let publisher = Publisher::connect().await;
    let mut client = bridge.connect("7").await;

    publisher
        .publish(
            &bridge.config.amqp.exchange,
            r#"{"user_id": 7, "payload": {"k": [1, 2]}}"#,
            BasicProperties::default(),
        )
        .await;
    let frame = next_json(&mut client).await;
    let id = frame["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);

    // With an AMQP message_id, the frame carries it.
    publisher
        .publish(
            &bridge.config.amqp.exchange,
            r#"{"user_id": 7, "payload": 1}"#,
            BasicProperties::default()
                .with_message_id("from-amqp".into())
                .with_content_type("text/plain".into()),
        )
        .await;
    assert_eq!(next_json(&mut client).await["id"], "from-amqp");
    bridge.stop().await;
}

#[tokio::test]
async fn payload_text_is_forwarded_untouched() {
    let bridge = Bridge::start().await;
    let publisher = Publisher::connect().await;
    let mut client = bridge.connect("p").await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"p","id":"raw","event":"chat","payload":{"z":1,"a":123456789012345678901234567890,"f":1.50}}"#,
        )
        .await;
    let text = loop {
        match client.next().await.unwrap().unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => break t.to_string(),
            _ => continue,
        }
    };
    assert!(
        text.contains(r#""payload":{"z":1,"a":123456789012345678901234567890,"f":1.50}"#),
        "{text}"
    );
    assert!(text.contains(r#""event":"chat""#), "{text}");
    bridge.stop().await;
}

#[tokio::test]
async fn a_thousand_messages_arrive_in_broker_order() {
    let bridge = Bridge::start().await;
    let publisher = Publisher::connect().await;
    let mut client = bridge.connect("order").await;
    // Without waiting for each confirm: the broker delivers in the order
    // of publishing on one channel.
    let bodies = (0..1000).map(|i| format!(r#"{{"user_id":"order","payload":{{"n":{i}}}}}"#));
    publisher
        .publish_all(&bridge.config.amqp.exchange, bodies)
        .await;
    for i in 0..1000 {
        let frame = next_json(&mut client).await;
        assert_eq!(frame["payload"]["n"], i, "frame {i} out of order: {frame}");
    }
    let metrics = bridge.running().metrics.clone();
    assert_eq!(metrics.messages_delivered.get(), 1000);
    assert!(metrics.delivery_seconds.count() >= 1000);
    bridge.stop().await;
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_good_ones_still_delivered() {
    let bridge = Bridge::start_with(|c| c.amqp.max_message_bytes = 2048).await;
    let publisher = Publisher::connect().await;
    let mut client = bridge.connect("dl").await;

    let (_watch_channel, mut dead) = watch_dead_letters(&publisher.connection).await;

    let too_large = format!(r#"{{"user_id":"dl","payload":"{}"}}"#, "x".repeat(3000));
    let malformed: Vec<String> = vec![
        "not json at all".into(),
        "".into(),
        "[1,2,3]".into(),
        r#"{"user_id":"dl"}"#.into(), // no payload
        r#"{"payload":{}}"#.into(),   // no target
        r#"{"user_id":"dl","channel":"c","payload":{}}"#.into(), // two targets
        r#"{"user_id":"","payload":{}}"#.into(), // empty user
        r#"{"user_id":1.5,"payload":{}}"#.into(), // not an integer
        r#"{"user_ids":[],"payload":{}}"#.into(),
        r#"{"broadcast":"yes","payload":{}}"#.into(),
        r#"{"user_id":"dl","store":"no","payload":{}}"#.into(),
        r#"{"user_id":"dl","payload":{}"#.into(), // truncated
        too_large,
    ];
    for (i, body) in malformed.iter().enumerate() {
        bridge.publish(&publisher, body).await;
        bridge
            .publish(
                &publisher,
                &format!(r#"{{"user_id":"dl","id":"good-{i}","payload":{i}}}"#),
            )
            .await;
    }
    for i in 0..malformed.len() {
        assert_eq!(next_json(&mut client).await["id"], format!("good-{i}"));
    }
    let mut seen = Vec::new();
    while seen.len() < malformed.len() {
        let delivery = tokio::time::timeout(WAIT, dead.next())
            .await
            .expect("dead letter in time")
            .unwrap()
            .unwrap();
        // Other tests' bridges may dead-letter too; keep only ours.
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let header = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(text)) => {
                String::from_utf8_lossy(text.as_bytes()).into_owned()
            }
            _ => String::new(),
        };
        let from_ours = header("x-first-death-queue") == bridge.config.amqp.queue;
        if from_ours {
            assert_eq!(header("x-first-death-reason"), "rejected");
            assert_eq!(delivery.routing_key.as_str(), "notifications.send");
            seen.push(String::from_utf8(delivery.data).unwrap());
        }
    }
    for body in &malformed {
        assert!(seen.contains(body), "not dead-lettered: {body:?}");
    }
    assert_eq!(
        bridge.running().metrics.messages_invalid.get(),
        malformed.len() as u64
    );
    bridge.stop().await;
}

#[tokio::test]
async fn client_ping_and_garbage_frames() {
    let bridge = Bridge::start().await;
    let publisher = Publisher::connect().await;
    let mut client = bridge.connect("g").await;

    send_text(&mut client, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut client).await, json!({"type": "pong"}));
    for garbage in [
        "hello",
        "{}",
        r#"{"type":"dance"}"#,
        r#"{"type":"subscribe"}"#,
        "[]",
    ] {
        send_text(&mut client, garbage).await;
        let frame = next_json(&mut client).await;
        assert_eq!(frame["type"], "error", "{garbage}");
        assert_eq!(frame["code"], "bad_request", "{garbage}");
        assert!(frame["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    // The connection is still open and still receives.
    bridge
        .publish(&publisher, r#"{"user_id":"g","id":"still","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut client).await["id"], "still");
    bridge.stop().await;
}

#[tokio::test]
async fn binary_and_oversized_frames_close_the_connection() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let bridge = Bridge::start_with(|c| c.websocket.max_message_bytes = 1024).await;

    let mut client = bridge.connect("b").await;
    client
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut client).await, Some(1003));

    let mut client = bridge.connect("b").await;
    client
        .send(Message::Text("x".repeat(4096).into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut client).await, Some(1009));
    bridge.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_and_others_keep_receiving() {
    let bridge = Bridge::start_with(|c| c.websocket.send_queue = 8).await;
    let publisher = Publisher::connect().await;
    let _slow = bridge.connect("slow").await; // never read again
    let mut fast = bridge.connect("fast").await;

    let big = "y".repeat(60_000);
    let metrics = bridge.running().metrics.clone();
    let mut sent = 0;
    while metrics.slow_client_closes.get() == 0 {
        assert!(sent < 2000, "the slow client was never closed");
        bridge
            .publish(
                &publisher,
                &format!(r#"{{"user_id":"slow","payload":"{big}"}}"#),
            )
            .await;
        sent += 1;
    }
    // The other user is served promptly, during and after.
    let started = std::time::Instant::now();
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"fast","id":"prompt","payload":1}"#,
        )
        .await;
    assert_eq!(next_json(&mut fast).await["id"], "prompt");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The slow session is gone from the router.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(metrics.connections.get(), 1);
    bridge.stop().await;
}

#[tokio::test]
async fn an_existing_non_durable_exchange_is_used_as_it_is() {
    let publisher = Publisher::connect().await;
    let mut config = test_config();
    publisher
        .channel
        .exchange_declare(
            config.amqp.exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                durable: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Even asking for another type must not fail on the existing exchange.
    config.amqp.exchange_type = "topic".into();
    let bridge = Bridge::start_unready(config).await;
    bridge.wait_ready().await;
    let mut client = bridge.connect("legacy").await;
    bridge
        .publish(&publisher, r#"{"user_id":"legacy","id":"ok","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut client).await["id"], "ok");
    bridge.stop().await;
}

#[tokio::test]
async fn a_connection_target_reaches_that_one_socket_and_is_never_stored() {
    let scratch = ScratchStore::new();
    let store = scratch.path();
    let bridge = Bridge::start_with(|c| {
        c.inbox.enabled = true;
        c.inbox.path = store;
        c.http.api_keys = vec!["connection-target-key".into()];
    })
    .await;
    let publisher = Publisher::connect().await;
    let (mut first, _, welcome) = accepted(request(
        &bridge.ws_url(&format!("/ws?token={}", token("1", &[]))),
        &[],
    ))
    .await;
    let id = welcome["connection_id"].as_str().unwrap().to_string();
    let mut second = bridge.connect("1").await;
    // Both tabs read the inbox counts frame first.
    assert_eq!(next_json(&mut first).await["type"], "inbox");
    assert_eq!(next_json(&mut second).await["type"], "inbox");

    let body = format!(r#"{{"connection_id":"{id}","payload":"just this tab"}}"#);
    bridge.publish(&publisher, &body).await;
    let frame = next_json(&mut first).await;
    assert_eq!(frame["payload"], "just this tab", "{frame}");
    assert!(frame.get("seq").is_none(), "never stored: {frame}");
    // Over HTTP too, through the same decoder.
    let reply = http_request(
        bridge.running().http_addr,
        "POST",
        "/api/notifications/send",
        &[("Authorization", "Bearer connection-target-key")],
        &format!(r#"{{"connection_id":"{id}","payload":"by http"}}"#),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(next_json(&mut first).await["payload"], "by http");
    // An id nobody has: no recipient.
    bridge
        .publish(
            &publisher,
            r#"{"connection_id":"c-424242","payload":"nobody"}"#,
        )
        .await;
    bridge
        .publish(&publisher, r#"{"user_id":"1","payload":"both"}"#)
        .await;
    assert_eq!(next_json(&mut second).await["payload"], "both");
    assert_eq!(next_json(&mut first).await["payload"], "both");
    let (_, metrics) = http_get(bridge.running().http_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "notify_bridge_messages_total{outcome=\"no_recipient\"}"
        ),
        1.0
    );
    // Only the user message was stored.
    assert_eq!(metric(&metrics, "notify_bridge_inbox_stored_total"), 1.0);
    bridge.stop().await;
}
