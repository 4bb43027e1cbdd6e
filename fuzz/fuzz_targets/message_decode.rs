//! The broker message decoder, `notify_bridge::message::decode`: every AMQP
//! body and every `POST /api/notifications/send` body goes through it.
//!
//! Input: the raw body bytes. The first byte, when there is one, also picks
//! whether an AMQP `message_id` is given, how small the size limit is and
//! whether `max_recipients` is 2, so the `TooLarge`, `TooManyRecipients`
//! and fallback-id paths are fuzzed too (the body is the whole input either
//! way).
//!
//! Beyond "no panic", each accepted message is checked against the contract:
//! its frame is one JSON object with `type`, `id`, `event` and the payload
//! copied exactly, the channel or broadcast marker matches the target, the
//! stored-copy frame adds only `seq`, and `user_ids` has no duplicates and
//! never more users than `max_recipients`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notify_bridge::message::{decode, DecodeError, DecodeLimits, Target};
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let selector = body.first().copied().unwrap_or(0);
    let fallback = match selector % 3 {
        0 => None,
        1 => Some("amqp-message-id"),
        _ => Some(""),
    };
    let limit = if selector & 0x80 != 0 { 64 } else { 1 << 20 };
    let max_recipients = if selector & 0x40 != 0 { 2 } else { 100_000 };
    let limits = DecodeLimits {
        max_bytes: limit,
        max_recipients,
    };

    let notification = match decode(body, fallback, &limits) {
        Ok(n) => n,
        Err(DecodeError::TooLarge { size, limit: l }) => {
            assert!(size > l && size == body.len() && l == limit);
            return;
        }
        Err(DecodeError::TooManyRecipients { count, limit: l }) => {
            assert!(count > l && l == max_recipients);
            return;
        }
        Err(DecodeError::Invalid(reason)) => {
            assert!(!reason.is_empty());
            return;
        }
    };
    assert!(body.len() <= limit);
    assert!(!notification.id.is_empty(), "an accepted message has an id");
    if let Target::Users(users) = &notification.target {
        assert!(!users.is_empty() && users.len() <= max_recipients);
        let distinct: std::collections::HashSet<_> = users.iter().collect();
        assert_eq!(distinct.len(), users.len(), "duplicate user in {users:?}");
    }

    check_frame(notification.frame.as_str(), &notification, None);
    check_frame(
        notification.frame_with_seq(7).as_str(),
        &notification,
        Some(7),
    );
});

fn check_frame(text: &str, n: &notify_bridge::message::Notification, seq: Option<u64>) {
    // The payload is copied as the publisher wrote it: the frame ends with it.
    let tail = format!(r#","payload":{}}}"#, n.payload.get());
    assert!(
        text.ends_with(&tail),
        "payload not copied as received: {text}"
    );
    let frame: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            // Valid JSON that serde_json's `Value` cannot hold (nesting past
            // 128 levels, numbers such as 1e400) is copied as received, and
            // browsers parse it; anything else is a broken frame.
            assert!(
                serde_json::from_str::<Value>(n.payload.get()).is_err(),
                "frame is not JSON ({e}): {text}"
            );
            return;
        }
    };
    let object = frame.as_object().expect("the frame is a JSON object");
    assert_eq!(object.get("type"), Some(&Value::from("notification")));
    assert_eq!(object.get("id"), Some(&Value::from(n.id.as_str())));
    assert_eq!(object.get("event"), Some(&Value::from(n.event.as_str())));
    assert_eq!(object.get("seq").and_then(Value::as_u64), seq);
    match &n.target {
        Target::Channel(c) => assert_eq!(object.get("channel"), Some(&Value::from(&**c))),
        Target::Broadcast => assert_eq!(object.get("broadcast"), Some(&Value::Bool(true))),
        Target::User(_) | Target::Users(_) | Target::Connection(_) => {
            assert!(!object.contains_key("channel") && !object.contains_key("broadcast"))
        }
    }
    let payload: Value = serde_json::from_str(n.payload.get()).expect("payload is JSON");
    assert_eq!(object.get("payload"), Some(&payload));
}
