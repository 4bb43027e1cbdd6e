//! Delivery receipts against the real broker (CONTRACT.md, "Delivery
//! receipts"): every status's exact body, `reply_to` with `correlation_id`,
//! `"receipt": false`, `invalid` for dead-lettered messages, `read` once
//! per entry (SQLite and PostgreSQL), and no ack before the receipts are
//! confirmed.

mod common;
mod pg;

use std::time::Duration;

use common::{
    inbox::{with_inbox, ScratchStore},
    receipts::ReceiptQueue as Inbox,
    *,
};
use lapin::{
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use notify_bridge::config::{Config, InboxStoreKind};
use serde_json::{json, Value};

fn receipts_on(c: &mut Config) {
    c.receipts.enabled = true;
}

fn with_sqlite_inbox(store: &ScratchStore) -> impl FnOnce(&mut Config) {
    let inbox = with_inbox(store.path());
    move |c: &mut Config| {
        receipts_on(c);
        inbox(c);
    }
}

async fn wait_for_metric(bridge: &Bridge, line: &str, at_least: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = bridge.running().metrics.render();
        if metric(&text, line) >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line} < {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn user_channel_and_broadcast_receipts_have_the_contracts_bodies() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_sqlite_inbox(&store)).await;
    let mut results = Inbox::results(&bridge).await;
    let publisher = Publisher::connect().await;
    let _tab1 = bridge.connect("1").await;
    let _tab2 = bridge.connect("1").await;
    let _news = bridge.connect_channels("3", &["news"], &["news"]).await;

    bridge
        .publish(&publisher, r#"{"id":"m1","user_ids":[1,2],"payload":1}"#)
        .await;
    let (first, properties) = results.next().await;
    assert_eq!(
        first,
        json!({"id":"m1","user_id":"1","status":"delivered","connections":2,"seq":1})
    );
    // Persistent, JSON, and marked as a receipt.
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        properties.kind().as_ref().map(|k| k.as_str()),
        Some("notify-bridge.receipt")
    );
    assert_eq!(
        results.body().await,
        json!({"id":"m1","user_id":"2","status":"offline","stored":true,"seq":1})
    );
    bridge
        .publish(
            &publisher,
            r#"{"id":"m2","user_id":2,"store":false,"payload":1}"#,
        )
        .await;
    assert_eq!(
        results.body().await,
        json!({"id":"m2","user_id":"2","status":"offline","stored":false,"seq":null})
    );
    bridge
        .publish(&publisher, r#"{"id":"m3","channel":"news","payload":1}"#)
        .await;
    assert_eq!(
        results.body().await,
        json!({"id":"m3","channel":"news","status":"delivered","connections":1})
    );
    bridge
        .publish(&publisher, r#"{"id":"m4","broadcast":true,"payload":1}"#)
        .await;
    assert_eq!(
        results.body().await,
        json!({"id":"m4","broadcast":true,"status":"delivered","connections":3})
    );
    bridge
        .publish(
            &publisher,
            r#"{"id":"m5","connection_id":"c-999","payload":1}"#,
        )
        .await;
    assert_eq!(
        results.body().await,
        json!({"id":"m5","connection_id":"c-999","status":"offline","connections":0})
    );
    results.assert_empty(Duration::from_millis(300)).await;
    let text = bridge.running().metrics.render();
    assert_eq!(
        metric(&text, "notify_bridge_receipts_total{status=\"delivered\"}"),
        3.0
    );
    assert_eq!(
        metric(&text, "notify_bridge_receipts_total{status=\"offline\"}"),
        3.0
    );
    bridge.stop().await;
}

#[tokio::test]
async fn reply_to_gets_the_receipts_with_the_id_as_correlation_id() {
    // Receipts are off: only messages with a reply_to get them.
    let bridge = Bridge::start().await;
    let mut results = Inbox::results(&bridge).await;
    let mut replies = Inbox::declare(FieldTable::default()).await;
    let publisher = Publisher::connect().await;
    let _tab = bridge.connect("7").await;
    let reply = |id: &str| {
        BasicProperties::default()
            .with_reply_to(replies.name.as_str().into())
            .with_message_id(id.into())
    };
    // Without reply_to and with receipts off: nothing.
    bridge
        .publish(&publisher, r#"{"id":"plain","user_id":7,"payload":1}"#)
        .await;
    // "receipt": false: nothing, even with a reply_to.
    publisher
        .publish(
            &bridge.config.amqp.exchange,
            r#"{"id":"quiet","user_id":7,"payload":1,"receipt":false}"#,
            reply("quiet"),
        )
        .await;
    publisher
        .publish(
            &bridge.config.amqp.exchange,
            r#"{"user_ids":[7,8],"payload":1}"#,
            reply("from-amqp"),
        )
        .await;
    for expected in [
        json!({"id":"from-amqp","user_id":"7","status":"delivered","connections":1}),
        json!({"id":"from-amqp","user_id":"8","status":"offline","stored":false,"seq":null}),
    ] {
        let (body, properties) = replies.next().await;
        assert_eq!(body, expected);
        assert_eq!(
            properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some("from-amqp")
        );
        assert_eq!(*properties.delivery_mode(), Some(2));
        // The same receipt on notifications.result.
        assert_eq!(results.body().await, expected);
    }
    replies.assert_empty(Duration::from_millis(300)).await;
    results.assert_empty(Duration::from_millis(100)).await;
    bridge.stop().await;
}

#[tokio::test]
async fn dead_lettered_messages_get_an_invalid_receipt_before_the_reject() {
    let bridge = Bridge::start_with(receipts_on).await;
    let mut results = Inbox::results(&bridge).await;
    let publisher = Publisher::connect().await;
    let exchange = bridge.config.amqp.exchange.clone();
    bridge
        .publish(&publisher, r#"{"id":"bad-1","payload":1}"#)
        .await;
    let body = results.body().await;
    assert_eq!(
        (&body["id"], &body["status"]),
        (&json!("bad-1"), &json!("invalid"))
    );
    assert!(
        body["reason"].as_str().unwrap().starts_with("no target"),
        "{body}"
    );
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");
    let with_id = BasicProperties::default().with_message_id("amqp-id".into());
    publisher.publish(&exchange, "not json", with_id).await;
    let body = results.body().await;
    assert_eq!(
        body,
        json!({"id":"amqp-id","status":"invalid","reason":"body is not a JSON object"})
    );
    publisher
        .publish(&exchange, "{", BasicProperties::default())
        .await;
    let body = results.body().await;
    assert_eq!(
        (&body["id"], &body["status"]),
        (&Value::Null, &json!("invalid"))
    );
    // An invalid body that says "receipt": false gets none; nor does a
    // receipt that found its way back to the bridge's queue.
    bridge
        .publish(&publisher, r#"{"id":"bad-2","payload":1,"receipt":false}"#)
        .await;
    let looped = BasicProperties::default().with_type("notify-bridge.receipt".into());
    publisher
        .publish(&exchange, r#"{"id":"r","status":"offline"}"#, looped)
        .await;
    results.assert_empty(Duration::from_millis(500)).await;
    wait_for_metric(
        &bridge,
        "notify_bridge_messages_total{outcome=\"invalid\"}",
        5.0,
    )
    .await;
    let text = bridge.running().metrics.render();
    assert_eq!(
        metric(&text, "notify_bridge_receipts_total{status=\"invalid\"}"),
        3.0
    );
    bridge.stop().await;
}

/// Offline messages, then reads from a tab and the HTTP API: one `read`
/// receipt per entry, the first time only; removing an unread entry sends
/// nothing.
async fn read_receipts_are_sent_once(bridge: &Bridge) {
    let mut results = Inbox::results(bridge).await;
    let publisher = Publisher::connect().await;
    let bodies =
        ["a", "b", "c", "d"].map(|id| format!(r#"{{"id":"{id}","user_id":"r","payload":1}}"#));
    publisher
        .publish_all(&bridge.config.amqp.exchange, bodies)
        .await;
    for seq in 1..=4 {
        assert_eq!(results.body().await["seq"], seq);
    }
    let (mut tab, _) = common::inbox::connect_since(bridge, "r", None).await;
    send_text(&mut tab, r#"{"type":"read","ids":["a"]}"#).await;
    assert_eq!(
        results.body().await,
        json!({"id":"a","user_id":"r","seq":1,"status":"read"})
    );
    // Read again (tab and HTTP), and remove an unread one: nothing.
    send_text(&mut tab, r#"{"type":"read","ids":["a"]}"#).await;
    send_text(&mut tab, r#"{"type":"remove","ids":["b"]}"#).await;
    let patch = |body: &'static str| async move {
        let path = "/api/me/notifications";
        bridge
            .request_as("r", &[], "PATCH", path, body)
            .await
            .status
    };
    assert_eq!(patch(r#"{"action":"mark_read","ids":["a"]}"#).await, 200);
    results.assert_empty(Duration::from_millis(500)).await;
    // read_all flips c and d only.
    send_text(&mut tab, r#"{"type":"read_all"}"#).await;
    let mut flipped = vec![results.body().await, results.body().await];
    flipped.sort_by_key(|r| r["seq"].as_u64());
    assert_eq!(
        flipped,
        [
            json!({"id":"c","user_id":"r","seq":3,"status":"read"}),
            json!({"id":"d","user_id":"r","seq":4,"status":"read"}),
        ]
    );
    assert_eq!(patch(r#"{"action":"mark_all_read"}"#).await, 200);
    results.assert_empty(Duration::from_millis(500)).await;
    let text = bridge.running().metrics.render();
    assert_eq!(
        metric(&text, "notify_bridge_receipts_total{status=\"read\"}"),
        3.0
    );
}

#[tokio::test]
async fn read_receipts_once_per_entry_sqlite() {
    let store = ScratchStore::new();
    let bridge = Bridge::start_with(with_sqlite_inbox(&store)).await;
    read_receipts_are_sent_once(&bridge).await;
    bridge.stop().await;
}

#[tokio::test]
async fn read_receipts_once_per_entry_postgres() {
    let Some(url) = pg::fresh_schema().await else {
        return;
    };
    let bridge = Bridge::start_with(move |c| {
        receipts_on(c);
        c.inbox.enabled = true;
        c.inbox.store = InboxStoreKind::Postgres;
        c.inbox.postgres_url = Some(url);
    })
    .await;
    read_receipts_are_sent_once(&bridge).await;
    bridge.stop().await;
}

/// A reply queue that refuses every message (`x-max-length` 0 with
/// `reject-publish`) makes the broker nack the receipt: the message and the
/// one after it must stay unacked and come back, until the receipt can be
/// confirmed.
#[tokio::test]
async fn no_ack_before_the_receipts_are_confirmed() {
    let bridge = Bridge::start().await;
    let mut results = Inbox::results(&bridge).await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let refusing = Inbox::declare(arguments).await;
    let publisher = Publisher::connect().await;
    let mut tab = bridge.connect("9").await;
    let reply = BasicProperties::default().with_reply_to(refusing.name.as_str().into());
    let exchange = bridge.config.amqp.exchange.clone();
    publisher
        .publish(&exchange, r#"{"id":"held","user_id":9,"payload":1}"#, reply)
        .await;
    bridge
        .publish(&publisher, r#"{"id":"next","user_id":9,"payload":2}"#)
        .await;
    // Each is delivered, not acked, and delivered again after the
    // reconnect: "next" has no receipt, but an ack for it would cover
    // "held" (multiple), so it is held back too.
    let mut seen = Vec::new();
    let times = |seen: &[String], id: &str| seen.iter().filter(|s| *s == id).count();
    while times(&seen, "held") < 2 || times(&seen, "next") < 2 {
        let frame = next_json(&mut tab).await;
        seen.push(frame["id"].as_str().unwrap().to_string());
    }
    wait_for_metric(&bridge, "notify_bridge_amqp_reconnects_total", 1.0).await;
    let text = bridge.running().metrics.render();
    assert_eq!(
        metric(&text, "notify_bridge_receipts_total{status=\"delivered\"}"),
        0.0
    );
    // Once the reply queue is gone, the receipt is confirmed (unroutable
    // through the default exchange is still a confirm) and the message acked.
    refusing
        .channel
        .queue_delete(refusing.name.as_str().into(), Default::default())
        .await
        .unwrap();
    let body = loop {
        let body = results.body().await;
        if body["id"] == "held" {
            break body;
        }
    };
    assert_eq!(
        body,
        json!({"id":"held","user_id":"9","status":"delivered","connections":1})
    );
    // Acked now: after the last redelivery drains, nothing more comes.
    while next_json_within(&mut tab, Duration::from_secs(2))
        .await
        .is_some()
    {}
    assert_silent(&mut tab, Duration::from_secs(1)).await;
    bridge.stop().await;
}
