//! Delivery receipts (CONTRACT.md, "Delivery receipts"): what became of each
//! message, so that a publisher can fall back to e-mail or mobile push for a
//! user who was offline. This module decides which receipts a message gets
//! and writes their bodies; `amqp::receipt_publisher` publishes them with
//! confirms before the message is acked, and `amqp::read_receipts` publishes
//! the `read` ones.
//!
//! Bodies, exactly as the contract shows them:
//!
//! ```text
//! {"id":"…","user_id":"1","status":"delivered","connections":2,"seq":7,"at":"…"}
//! {"id":"…","user_id":"2","status":"offline","stored":true,"seq":3,"at":"…"}
//! {"id":"…","channel":"news","status":"delivered","connections":40,"at":"…"}
//! {"id":"…","status":"invalid","reason":"no target","at":"…"}
//! {"id":"…","user_id":"1","seq":7,"status":"read","at":"…"}
//! ```

use std::{sync::Arc, time::SystemTime};

use crate::{
    config::ReceiptsConfig,
    inbox::ReadEntry,
    message::{push_json_string, Notification, Target, UserId},
};

/// The AMQP `type` property every receipt carries, so the bridge never
/// answers a receipt that came back to its own queue (a topic or fanout
/// exchange) with an `invalid` receipt, which would loop.
pub const RECEIPT_TYPE: &str = "notify-bridge.receipt";

/// A receipt's `status`, also the label of `notify_bridge_receipts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Delivered,
    Offline,
    Invalid,
    Read,
}

impl Status {
    /// Every status, in the order the metric lists them.
    pub const ALL: [Status; 4] = [
        Status::Delivered,
        Status::Offline,
        Status::Invalid,
        Status::Read,
    ];

    /// The text in the body and in the metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Status::Delivered => "delivered",
            Status::Offline => "offline",
            Status::Invalid => "invalid",
            Status::Read => "read",
        }
    }
}

/// One receipt, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub status: Status,
    /// The JSON body.
    pub body: String,
    /// The message's `reply_to` queue, if it had one: the receipt goes
    /// there too, through the default exchange.
    pub reply_to: Option<Arc<str>>,
    /// The message's id, as the reply's `correlation_id` (none for an
    /// invalid message whose id could not be read).
    pub correlation_id: Option<String>,
}

/// Whether, and where, the inbox kept one user's copy of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Not stored (`"store": false`, the inbox disabled).
    No,
    /// Stored now, with this seq.
    Seq(u64),
    /// A redelivery: the user's inbox already held the id, so nothing was
    /// sent again and its seq is not known here.
    AlreadyHeld,
}

/// What routing did for one target user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserOutcome {
    pub user: UserId,
    /// How many of the user's open connections the frame was handed to.
    pub connections: usize,
    pub kept: Kept,
}

/// What routing did for one message, as the receipts need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `user_id` / `user_ids` targets: one receipt per user.
    Users(Vec<UserOutcome>),
    /// Channel, broadcast and connection targets: one receipt per message,
    /// with how many connections the frame was handed to.
    Connections(usize),
}

/// Decides which receipts a message gets and writes their bodies. Cheap to
/// share; built once from the `receipts` section.
#[derive(Debug, Clone)]
pub struct Receipts {
    enabled: bool,
}

impl Receipts {
    pub fn new(config: &ReceiptsConfig) -> Self {
        Self {
            enabled: config.enabled,
        }
    }

    /// Whether the routing outcome of `n` is needed at all: receipts are
    /// on, or it has a `reply_to`, and it did not say `"receipt": false`.
    pub fn wanted(&self, n: &Notification) -> bool {
        n.receipt && (self.enabled || n.reply_to.is_some())
    }

    /// Whether `read` receipts are sent: only with `receipts.enabled` (a
    /// stored entry does not keep its message's `reply_to`).
    pub fn reads_wanted(&self) -> bool {
        self.enabled
    }

    /// The receipts of a routed message (none when not [`Self::wanted`]).
    pub fn for_delivery(&self, n: &Notification, outcome: &Outcome) -> Vec<Receipt> {
        match outcome {
            Outcome::Users(users) => self.user_outcomes(n, users),
            Outcome::Connections(count) => self.target_outcome(n, *count),
        }
    }

    /// One receipt per (message, user): `delivered` with `connections` (and
    /// `seq` when stored) or `offline` with `stored` and `seq`. The
    /// interface for any path that knows the per-user outcome (cluster
    /// mode's presence as well as the local router).
    pub fn user_outcomes(&self, n: &Notification, users: &[UserOutcome]) -> Vec<Receipt> {
        if !self.wanted(n) {
            return Vec::new();
        }
        let at = now();
        users
            .iter()
            .map(|u| self.for_message(n, user_body(&n.id, u, &at), status_of(u)))
            .collect()
    }

    /// The one receipt of a channel, broadcast or connection target.
    pub fn target_outcome(&self, n: &Notification, connections: usize) -> Vec<Receipt> {
        if !self.wanted(n) {
            return Vec::new();
        }
        let mut body = String::with_capacity(128);
        body.push_str(r#"{"id":"#);
        push_json_string(&mut body, &n.id);
        let status = match &n.target {
            Target::Channel(channel) => {
                body.push_str(r#","channel":"#);
                push_json_string(&mut body, channel);
                Status::Delivered
            }
            Target::Connection(id) => {
                body.push_str(r#","connection_id":"#);
                push_json_string(&mut body, id);
                if connections > 0 {
                    Status::Delivered
                } else {
                    Status::Offline
                }
            }
            Target::Broadcast | Target::User(_) | Target::Users(_) => {
                body.push_str(r#","broadcast":true"#);
                Status::Delivered
            }
        };
        body.push_str(&format!(
            r#","status":"{}","connections":{connections},"at":"{}"}}"#,
            status.label(),
            now()
        ));
        vec![self.for_message(n, body, status)]
    }

    /// The receipt of a dead-lettered message: `id` when it could be read,
    /// `reason` as logged. `None` when receipts are off for it.
    pub fn invalid(
        &self,
        id: Option<&str>,
        reason: &str,
        reply_to: Option<Arc<str>>,
        receipt: bool,
    ) -> Option<Receipt> {
        if !receipt || !(self.enabled || reply_to.is_some()) {
            return None;
        }
        let mut body = String::with_capacity(96 + reason.len());
        body.push_str(r#"{"id":"#);
        match id {
            Some(id) => push_json_string(&mut body, id),
            None => body.push_str("null"),
        }
        body.push_str(r#","status":"invalid","reason":"#);
        push_json_string(&mut body, reason);
        body.push_str(&format!(r#","at":"{}"}}"#, now()));
        Some(Receipt {
            status: Status::Invalid,
            body,
            reply_to,
            correlation_id: id.map(str::to_string),
        })
    }

    /// One `read` receipt per entry that was unread until this change.
    pub fn read(&self, user: &str, entries: &[ReadEntry]) -> Vec<Receipt> {
        if !self.reads_wanted() {
            return Vec::new();
        }
        let at = now();
        entries
            .iter()
            .map(|entry| {
                let mut body = String::with_capacity(96 + entry.id.len());
                body.push_str(r#"{"id":"#);
                push_json_string(&mut body, &entry.id);
                body.push_str(r#","user_id":"#);
                push_json_string(&mut body, user);
                body.push_str(&format!(
                    r#","seq":{},"status":"read","at":"{at}"}}"#,
                    entry.seq
                ));
                Receipt {
                    status: Status::Read,
                    body,
                    reply_to: None,
                    correlation_id: None,
                }
            })
            .collect()
    }

    fn for_message(&self, n: &Notification, body: String, status: Status) -> Receipt {
        Receipt {
            status,
            body,
            reply_to: n.reply_to.clone(),
            correlation_id: n.reply_to.as_ref().map(|_| n.id.clone()),
        }
    }
}

fn status_of(u: &UserOutcome) -> Status {
    if u.connections > 0 {
        Status::Delivered
    } else {
        Status::Offline
    }
}

/// `delivered` (with `seq` only when stored now) or `offline` (with
/// `stored` and `seq`, null when not stored or already held).
fn user_body(id: &str, u: &UserOutcome, at: &str) -> String {
    let mut body = String::with_capacity(128 + id.len());
    body.push_str(r#"{"id":"#);
    push_json_string(&mut body, id);
    body.push_str(r#","user_id":"#);
    push_json_string(&mut body, u.user.as_str());
    let seq = match u.kept {
        Kept::Seq(seq) => seq.to_string(),
        Kept::No | Kept::AlreadyHeld => "null".into(),
    };
    if u.connections > 0 {
        body.push_str(&format!(
            r#","status":"delivered","connections":{}"#,
            u.connections
        ));
        if let Kept::Seq(seq) = u.kept {
            body.push_str(&format!(r#","seq":{seq}"#));
        }
    } else {
        let stored = u.kept != Kept::No;
        body.push_str(&format!(
            r#","status":"offline","stored":{stored},"seq":{seq}"#
        ));
    }
    body.push_str(&format!(r#","at":"{at}"}}"#));
    body
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn note(body: &str, reply_to: Option<&str>) -> Notification {
        let mut n =
            crate::message::decode(body.as_bytes(), None, &Default::default()).expect("valid");
        n.reply_to = reply_to.map(Arc::from);
        n
    }

    fn on() -> Receipts {
        Receipts { enabled: true }
    }

    /// The body without `at`, which must be an RFC 3339 UTC time.
    fn shape(r: &Receipt) -> Value {
        let mut v: Value = serde_json::from_str(&r.body).unwrap();
        let at = v.as_object_mut().unwrap().remove("at").unwrap();
        assert!(at.as_str().unwrap().ends_with('Z'), "{at}");
        v
    }

    fn user(id: &str, connections: usize, kept: Kept) -> UserOutcome {
        UserOutcome {
            user: UserId::new(id).unwrap(),
            connections,
            kept,
        }
    }

    #[test]
    fn user_bodies_are_the_contracts() {
        let n = note(r#"{"id":"m","user_ids":[1,2,3,4],"payload":1}"#, None);
        let r = on().user_outcomes(
            &n,
            &[
                user("1", 2, Kept::Seq(7)),
                user("2", 0, Kept::Seq(3)),
                user("3", 0, Kept::No),
                user("4", 1, Kept::No),
            ],
        );
        let shapes: Vec<Value> = r.iter().map(shape).collect();
        assert_eq!(
            shapes,
            [
                json!({"id":"m","user_id":"1","status":"delivered","connections":2,"seq":7}),
                json!({"id":"m","user_id":"2","status":"offline","stored":true,"seq":3}),
                json!({"id":"m","user_id":"3","status":"offline","stored":false,"seq":null}),
                json!({"id":"m","user_id":"4","status":"delivered","connections":1}),
            ]
        );
        // Key order as the contract writes it.
        assert!(r[0].body.starts_with(
            r#"{"id":"m","user_id":"1","status":"delivered","connections":2,"seq":7,"at":""#
        ));
        assert_eq!(r[1].status, Status::Offline);
        assert!(r.iter().all(|r| r.reply_to.is_none()));
    }

    #[test]
    fn a_redelivery_already_held_says_stored_without_a_seq() {
        let n = note(r#"{"id":"m","user_id":1,"payload":1}"#, None);
        let r = on().user_outcomes(&n, &[user("1", 0, Kept::AlreadyHeld)]);
        assert_eq!(
            shape(&r[0]),
            json!({"id":"m","user_id":"1","status":"offline","stored":true,"seq":null})
        );
    }

    #[test]
    fn channel_broadcast_and_connection_bodies() {
        let r = on().target_outcome(
            &note(r#"{"id":"c","channel":"news","payload":1}"#, None),
            40,
        );
        assert_eq!(
            shape(&r[0]),
            json!({"id":"c","channel":"news","status":"delivered","connections":40})
        );
        let r = on().target_outcome(&note(r#"{"id":"b","broadcast":true,"payload":1}"#, None), 0);
        assert_eq!(
            shape(&r[0]),
            json!({"id":"b","broadcast":true,"status":"delivered","connections":0})
        );
        let n = note(r#"{"id":"k","connection_id":"c-9","payload":1}"#, None);
        assert_eq!(
            shape(&on().target_outcome(&n, 0)[0]),
            json!({"id":"k","connection_id":"c-9","status":"offline","connections":0})
        );
        assert_eq!(on().target_outcome(&n, 1)[0].status, Status::Delivered);
    }

    #[test]
    fn who_gets_receipts() {
        let off = Receipts { enabled: false };
        let plain = note(r#"{"id":"m","user_id":1,"payload":1}"#, None);
        let replied = note(r#"{"id":"m","user_id":1,"payload":1}"#, Some("q"));
        let silent = note(
            r#"{"id":"m","user_id":1,"payload":1,"receipt":false}"#,
            Some("q"),
        );
        assert!(!off.wanted(&plain) && on().wanted(&plain));
        assert!(off.wanted(&replied));
        assert!(!off.wanted(&silent) && !on().wanted(&silent));
        let r = off.user_outcomes(&replied, &[user("1", 1, Kept::No)]);
        assert_eq!(r[0].reply_to.as_deref(), Some("q"));
        assert_eq!(r[0].correlation_id.as_deref(), Some("m"));
        assert!(off
            .user_outcomes(&plain, &[user("1", 1, Kept::No)])
            .is_empty());
    }

    #[test]
    fn invalid_and_read_bodies() {
        let r = on().invalid(None, "no target", None, true).unwrap();
        assert_eq!(
            shape(&r),
            json!({"id":null,"status":"invalid","reason":"no target"})
        );
        let r = Receipts { enabled: false }
            .invalid(Some("x"), "bad", Some(Arc::from("q")), true)
            .unwrap();
        assert_eq!(r.correlation_id.as_deref(), Some("x"));
        assert!(on().invalid(Some("x"), "bad", None, false).is_none());
        assert!(Receipts { enabled: false }
            .invalid(Some("x"), "bad", None, true)
            .is_none());
        let entries = [ReadEntry {
            id: "m".into(),
            seq: 7,
        }];
        let r = on().read("1", &entries);
        assert_eq!(
            shape(&r[0]),
            json!({"id":"m","user_id":"1","seq":7,"status":"read"})
        );
        assert!(r[0]
            .body
            .starts_with(r#"{"id":"m","user_id":"1","seq":7,"status":"read","at":"#));
        assert!(Receipts { enabled: false }.read("1", &entries).is_empty());
    }
}
