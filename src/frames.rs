//! The JSON frames of the WebSocket protocol: server-to-client frames are
//! built here (notification frames are built once per message by
//! `message`), client-to-server frames are parsed here.

use serde::Serialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::{
    inbox::{Change, Counts},
    message::UserId,
};

fn to_frame<T: Serialize>(value: &T) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(value).expect("frames always serialize"))
}

/// The first frame of every connection, sent once it is registered.
pub fn welcome(connection_id: String, user: &UserId, channels: &[String]) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Welcome<'a> {
        r#type: &'static str,
        connection_id: String,
        user_id: &'a str,
        channels: &'a [String],
    }
    to_frame(&Welcome {
        r#type: "welcome",
        connection_id,
        user_id: user.as_str(),
        channels,
    })
}

pub fn pong() -> Utf8Bytes {
    Utf8Bytes::from_static(r#"{"type":"pong"}"#)
}

// The frames below are structs (not `json!`, which sorts keys) so that
// `type` comes first, as in the contract's examples.

#[derive(Serialize)]
struct ChannelFrame<'a> {
    r#type: &'static str,
    channel: &'a str,
}

pub fn subscribed(channel: &str) -> Utf8Bytes {
    to_frame(&ChannelFrame {
        r#type: "subscribed",
        channel,
    })
}

pub fn unsubscribed(channel: &str) -> Utf8Bytes {
    to_frame(&ChannelFrame {
        r#type: "unsubscribed",
        channel,
    })
}

/// An `error` frame; the connection stays open.
pub fn error(code: &str, detail: &str) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Error<'a> {
        r#type: &'static str,
        code: &'a str,
        detail: &'a str,
    }
    to_frame(&Error {
        r#type: "error",
        code,
        detail,
    })
}

/// `{"type":"inbox","total":T,"unread":U}`: sent on connect and after every
/// read-state change, to every socket of the user.
pub fn inbox_counts(counts: Counts) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Inbox {
        r#type: &'static str,
        total: u64,
        unread: u64,
    }
    to_frame(&Inbox {
        r#type: "inbox",
        total: counts.total,
        unread: counts.unread,
    })
}

/// `{"type":"gap","since":N,"oldest":M}`: retention dropped entries after N.
pub fn gap(since: u64, oldest: u64) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Gap {
        r#type: &'static str,
        since: u64,
        oldest: u64,
    }
    to_frame(&Gap {
        r#type: "gap",
        since,
        oldest,
    })
}

/// A frame a client may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Ping,
    Subscribe(String),
    Unsubscribe(String),
    /// `read`, `remove`, `read_all`: inbox read-state changes.
    Inbox(Change),
}

/// Parses a client text frame; the error text goes into a `bad_request`
/// error frame.
pub fn parse_client(text: &str) -> Result<ClientFrame, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("frame is not valid JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or("frame must be a JSON object with a `type`")?;
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err("`type` must be a string".into()),
        None => return Err("frame lacks the `type` field".into()),
    };
    let channel = || match object.get("channel") {
        Some(Value::String(c)) if !c.is_empty() => Ok(c.clone()),
        Some(_) => Err(format!("`{kind}` needs `channel` as a non-empty string")),
        None => Err(format!("`{kind}` frame lacks the `channel` field")),
    };
    let ids = || match object.get("ids") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|id| id.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("`{kind}` needs `ids` as an array of strings")),
        Some(_) => Err(format!("`{kind}` needs `ids` as an array of strings")),
        None => Err(format!("`{kind}` frame lacks the `ids` field")),
    };
    match kind {
        "ping" => Ok(ClientFrame::Ping),
        "subscribe" => channel().map(ClientFrame::Subscribe),
        "unsubscribe" => channel().map(ClientFrame::Unsubscribe),
        "read" => match object.get("up_to") {
            Some(up_to) => up_to
                .as_u64()
                .map(|n| ClientFrame::Inbox(Change::MarkReadUpTo(n)))
                .ok_or_else(|| "`up_to` must be a non-negative integer".to_string()),
            None => ids()
                .map(|ids| ClientFrame::Inbox(Change::MarkRead(ids)))
                .map_err(|_| "`read` needs `ids` (an array of strings) or `up_to` (a seq)".to_string()),
        },
        "remove" => ids().map(|ids| ClientFrame::Inbox(Change::Remove(ids))),
        "read_all" => Ok(ClientFrame::Inbox(Change::MarkAllRead)),
        other => Err(format!(
            "unknown frame type `{other}`; expected ping, subscribe, unsubscribe, read, remove or read_all"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_frames() {
        assert_eq!(parse_client(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping));
        assert_eq!(
            parse_client(r#"{"type":"subscribe","channel":"a"}"#),
            Ok(ClientFrame::Subscribe("a".into()))
        );
        assert_eq!(
            parse_client(r#"{"type":"unsubscribe","channel":"a"}"#),
            Ok(ClientFrame::Unsubscribe("a".into()))
        );
        assert!(parse_client("nope").unwrap_err().contains("JSON"));
        assert!(parse_client("[]").unwrap_err().contains("object"));
        assert!(parse_client(r#"{"type":"dance"}"#)
            .unwrap_err()
            .contains("unknown"));
        assert!(parse_client(r#"{"type":"subscribe"}"#)
            .unwrap_err()
            .contains("channel"));
        assert!(parse_client(r#"{"type":"subscribe","channel":""}"#).is_err());
        assert!(parse_client(r#"{"kind":"ping"}"#)
            .unwrap_err()
            .contains("type"));
    }

    #[test]
    fn server_frames_are_json() {
        let w = welcome("c-3".into(), &UserId::new("1").unwrap(), &["g".into()]);
        let v: Value = serde_json::from_str(w.as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"welcome","connection_id":"c-3","user_id":"1","channels":["g"]})
        );
        assert!(subscribed("c")
            .as_str()
            .starts_with(r#"{"type":"subscribed""#));
        assert_eq!(
            inbox_counts(Counts {
                total: 2,
                unread: 1,
                ..Default::default()
            })
            .as_str(),
            r#"{"type":"inbox","total":2,"unread":1}"#
        );
        assert_eq!(gap(3, 7).as_str(), r#"{"type":"gap","since":3,"oldest":7}"#);
        let e: Value = serde_json::from_str(error("bad_request", "x\"y").as_str()).unwrap();
        assert_eq!(e["detail"], "x\"y");
    }
}
