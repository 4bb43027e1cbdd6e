//! A poison flood: 10,000 malformed messages of every kind interleaved with
//! 10,000 good ones, through the real binary. Every malformed message ends
//! up in the dead-letter exchange with its body and properties, its reason
//! logged at WARN; every good one is delivered; the process never restarts
//! and nothing loops.

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{daemon::*, *};
use futures_util::StreamExt;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::AMQPValue,
    BasicProperties, Connection, ConnectionProperties,
};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// The bridge's `amqp.max_message_bytes` in this test.
const MAX_BYTES: usize = 4096;
const USERS: u64 = 10;

/// One malformed body of each kind the contract names (and some it implies),
/// with the words its logged reason must contain.
fn malformed_kinds() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let kind = |name, body: &[u8], reason| (name, body.to_vec(), reason);
    let too_large = format!(r#"{{"user_id":1,"payload":"{}"}}"#, "x".repeat(MAX_BYTES));
    vec![
        kind("not-json", b"hello there", "not valid JSON"),
        kind("empty", b"", "empty"),
        kind("not-utf8", b"\xff\xfe{\"user_id\":1}", "not UTF-8"),
        kind("array", b"[1,2,3]", "JSON"),
        kind("string", br#""just a string""#, "JSON"),
        kind("null", b"null", "JSON"),
        kind("truncated", br#"{"user_id":1,"payload":{"a":"#, "JSON"),
        kind("no-target", br#"{"payload":{}}"#, "target"),
        kind("no-payload", br#"{"user_id":1}"#, "payload"),
        kind("float-user", br#"{"user_id":1.5,"payload":1}"#, "user_id"),
        kind("bool-user", br#"{"user_id":true,"payload":1}"#, "user_id"),
        kind("empty-user", br#"{"user_id":"","payload":1}"#, "user_id"),
        kind("object-user", br#"{"user_id":{},"payload":1}"#, "user_id"),
        kind("huge-user", br#"{"user_id":1e400,"payload":1}"#, "JSON"),
        kind(
            "empty-user-ids",
            br#"{"user_ids":[],"payload":1}"#,
            "user_ids",
        ),
        kind(
            "null-in-user-ids",
            br#"{"user_ids":[1,null],"payload":1}"#,
            "user_ids",
        ),
        kind(
            "two-targets",
            br#"{"user_id":1,"channel":"x","payload":1}"#,
            "target",
        ),
        kind("empty-channel", br#"{"channel":"","payload":1}"#, "channel"),
        kind(
            "broadcast-string",
            br#"{"broadcast":"yes","payload":1}"#,
            "broadcast",
        ),
        kind(
            "store-string",
            br#"{"user_id":1,"payload":1,"store":"no"}"#,
            "store",
        ),
        kind(
            "event-number",
            br#"{"user_id":1,"payload":1,"event":5}"#,
            "event",
        ),
        kind("id-number", br#"{"user_id":1,"payload":1,"id":7}"#, "id"),
        kind(
            "duplicate-key",
            br#"{"user_id":1,"user_id":2,"payload":1}"#,
            "duplicate",
        ),
        kind("too-large", too_large.as_bytes(), "larger than"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_messages_are_dead_lettered_and_ten_thousand_good_ones_delivered() {
    const PAIRS: u64 = 10_000;
    let max_bytes = MAX_BYTES.to_string();
    let daemon = Daemon::start(&[("NOTIFY_BRIDGE_AMQP__MAX_MESSAGE_BYTES", &max_bytes)]).await;
    let pid = daemon.pid();
    let run = unique("poison");

    // A queue of our own on the dead-letter exchange (a fanout), so this
    // test counts its dead letters exactly whatever else shares the broker.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let (_capture_channel, mut dead) = watch_dead_letters(&connection).await;

    // Users listening for the good messages.
    let seen: Arc<Mutex<HashMap<String, u32>>> = Default::default();
    let mut readers = Vec::new();
    for user in 1..=USERS {
        let mut client = daemon.connect(&user.to_string()).await;
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = client.next().await {
                if let Message::Text(text) = message {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] == "notification" {
                        assert_eq!(frame["payload"]["user"], user, "{frame}");
                        let id = frame["id"].as_str().unwrap().to_string();
                        *seen.lock().unwrap().entry(id).or_default() += 1;
                    }
                }
            }
        }));
    }

    // The flood: good, malformed, good, malformed...
    let kinds = malformed_kinds();
    let publish = connection.create_channel().await.unwrap();
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut sent_bad: HashMap<String, Vec<u8>> = HashMap::new();
    let mut sent_by_kind: HashMap<String, u64> = HashMap::new();
    for i in 0..PAIRS {
        let user = i % USERS + 1;
        let good = format!(r#"{{"user_id":{user},"id":"good-{i}","payload":{{"user":{user}}}}}"#);
        let (kind, body, _) = &kinds[i as usize % kinds.len()];
        let bad_id = format!("bad-{i}-{kind}");
        for (body, message_id) in [
            (good.as_bytes(), format!("good-{i}")),
            (body, bad_id.clone()),
        ] {
            drop(
                publish
                    .basic_publish(
                        daemon.place.exchange.as_str().into(),
                        "notifications.send".into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default()
                            .with_message_id(message_id.into())
                            .with_app_id(run.as_str().into())
                            .with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
        sent_bad.insert(bad_id, body.clone());
        *sent_by_kind.entry(kind.to_string()).or_default() += 1;
        if i % 500 == 499 {
            assert!(publish.wait_for_confirms().await.unwrap().is_empty());
        }
    }
    assert!(publish.wait_for_confirms().await.unwrap().is_empty());

    // Every dead letter: one of ours, its body intact, rejected from the
    // daemon's queue with its routing key.
    let mut dead_ids = HashSet::new();
    let mut dead_by_kind: HashMap<String, u64> = HashMap::new();
    while (dead_ids.len() as u64) < PAIRS {
        let delivery = tokio::time::timeout(Duration::from_secs(30), dead.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {PAIRS} dead letters arrived:\n{}",
                    dead_ids.len(),
                    tail(&daemon.log())
                )
            })
            .unwrap()
            .unwrap();
        let props = &delivery.properties;
        if props.app_id().as_ref().map(|a| a.as_str()) != Some(run.as_str()) {
            continue; // someone else's
        }
        let id = props.message_id().as_ref().unwrap().to_string();
        assert_eq!(
            sent_bad.get(&id).map(Vec::as_slice),
            Some(delivery.data.as_slice()),
            "dead letter {id}: a good message, or a body changed on the way"
        );
        assert_eq!(delivery.routing_key.as_str(), "notifications.send");
        let death = x_death(props).expect("an x-death header");
        assert!(death.contains("rejected"), "{id}: {death}");
        assert!(death.contains(&daemon.place.queue), "{id}: {death}");
        assert!(dead_ids.insert(id.clone()), "dead-lettered twice: {id}");
        let kind = id.splitn(3, '-').nth(2).unwrap().to_string();
        *dead_by_kind.entry(kind).or_default() += 1;
    }
    // Nothing more comes: no loop, no second copy.
    let extra = tokio::time::timeout(Duration::from_secs(1), dead.next()).await;
    assert!(extra.is_err(), "an extra dead letter: {extra:?}");

    let delivered = eventually(Duration::from_secs(30), "every good message", || {
        seen.lock().unwrap().len() as u64 >= PAIRS
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.values().all(|&n| n == 1), "a good message came twice");
    assert!((0..PAIRS).all(|i| seen.contains_key(&format!("good-{i}"))));

    // The same process, its counters exact, and a logged reason per message.
    assert_eq!(daemon.pid(), pid);
    let (_, metrics_text) = http_get(daemon.http_addr, "/metrics").await;
    let count = |outcome: &str| {
        metric(
            &metrics_text,
            &format!(r#"notify_bridge_messages_total{{outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(count("invalid"), PAIRS as f64);
    assert_eq!(count("delivered"), PAIRS as f64);
    let log = daemon.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("invalid message rejected"))
        .collect();
    assert_eq!(
        warnings.len() as u64,
        PAIRS,
        "one WARN line per malformed message"
    );
    assert_eq!(dead_by_kind, sent_by_kind, "dead letters per kind");
    for (kind, _, reason) in &kinds {
        assert!(
            warnings.iter().any(|l| l.contains(reason)),
            "no WARN line gives the reason of {kind} ({reason:?})"
        );
    }
    assert!(!log.contains("panicked"), "{}", tail(&log));
    eprintln!(
        "FAULT-RESULT {}",
        serde_json::json!({
            "fault": "poison flood",
            "sent_good": PAIRS,
            "sent_malformed": PAIRS,
            "kinds": kinds.len(),
            "dead_lettered": dead_ids.len(),
            "delivered": seen.len(),
            "duplicated": 0,
            "lost": PAIRS - seen.len() as u64,
            "seconds_to_deliver_after_publish": delivered.as_secs_f64(),
        })
    );
    drop(readers);
    let _ = connection.close(200, "done".into()).await;
    daemon.cleanup().await;
}

/// The `x-death` header, flattened to text.
fn x_death(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    Some(flatten(headers.inner().get("x-death")?))
}

fn flatten(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::FieldArray(items) => items
            .as_slice()
            .iter()
            .map(flatten)
            .collect::<Vec<_>>()
            .join(","),
        AMQPValue::FieldTable(table) => table
            .inner()
            .iter()
            .map(|(k, v)| format!("{}={}", k.as_str(), flatten(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => format!("{other:?}"),
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
