//! The client-frame parser, `notify_bridge::frames::parse_client`: every
//! text frame a browser sends goes through it.
//!
//! Input: the frame's text (inputs that are not UTF-8 are skipped, as a
//! WebSocket text frame is always UTF-8).
//!
//! Beyond "no panic": a refused frame's reason fits in an `error` frame that
//! is valid JSON and carries the reason exactly; an accepted frame, written
//! back as the contract spells it, parses to the same frame; the `subscribed`
//! / `unsubscribed` answer carries the channel exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notify_bridge::{
    inbox::Change,
    frames::{error, parse_client, subscribed, unsubscribed, ClientFrame},
};
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let frame = match parse_client(text) {
        Ok(frame) => frame,
        Err(reason) => {
            let sent: Value = serde_json::from_str(error("bad_request", &reason).as_str())
                .expect("an error frame is JSON");
            assert_eq!(sent["detail"], Value::from(reason));
            return;
        }
    };
    let canonical = match &frame {
        ClientFrame::Ping => json!({"type": "ping"}),
        ClientFrame::Subscribe(c) => {
            assert!(!c.is_empty());
            answer_carries(subscribed(c).as_str(), "subscribed", c);
            json!({"type": "subscribe", "channel": c})
        }
        ClientFrame::Unsubscribe(c) => {
            assert!(!c.is_empty());
            answer_carries(unsubscribed(c).as_str(), "unsubscribed", c);
            json!({"type": "unsubscribe", "channel": c})
        }
        ClientFrame::Inbox(Change::MarkRead(ids)) => json!({"type": "read", "ids": ids}),
        ClientFrame::Inbox(Change::MarkReadUpTo(n)) => json!({"type": "read", "up_to": n}),
        ClientFrame::Inbox(Change::Remove(ids)) => json!({"type": "remove", "ids": ids}),
        ClientFrame::Inbox(Change::MarkAllRead) => json!({"type": "read_all"}),
        ClientFrame::Inbox(other) => panic!("a client frame cannot ask for {other:?}"),
    };
    assert_eq!(parse_client(&canonical.to_string()), Ok(frame));
});

fn answer_carries(answer: &str, kind: &str, channel: &str) {
    let v: Value = serde_json::from_str(answer).expect("the answer is JSON");
    assert_eq!(v["type"], Value::from(kind));
    assert_eq!(v["channel"], Value::from(channel));
}
