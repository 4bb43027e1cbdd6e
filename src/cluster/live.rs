//! The bodies of live messages: what the active writer sends an instance
//! about a committed message, and the small calls between instances. The
//! AMQP `type` property says which ([`Kind`]).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    message::{Notification, Target, UserId},
    router::RouteRequest,
};

/// What a live message is, from its AMQP `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Notify,
    Counts,
    List,
    Disconnect,
    Reply,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Notify => "notify",
            Kind::Counts => "counts",
            Kind::List => "list",
            Kind::Disconnect => "disconnect",
            Kind::Reply => "reply",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Kind::Notify,
            Kind::Counts,
            Kind::List,
            Kind::Disconnect,
            Kind::Reply,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// A notification for the receiving instance's own recipients; a live
/// `notify` message carries a JSON array of them (the writer's batch).
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveNotification {
    pub id: String,
    pub event: String,
    pub payload: Box<RawValue>,
    pub to: LiveTarget,
}

/// Who on the receiving instance it is for. Users come with their seq when
/// the message was stored (then every one of them has one), without when
/// it was not (`"store": false`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveTarget {
    Users(Vec<(String, Option<u64>)>),
    Channel(String),
    Broadcast,
    Connection(String),
}

impl LiveNotification {
    /// The route request the instance's router handles, as if the message
    /// had come from the broker (and, when stored, through the stage).
    pub fn into_request(self) -> Result<RouteRequest, String> {
        let (target, stored) = match self.to {
            LiveTarget::Users(users) => {
                let mut ids = Vec::with_capacity(users.len());
                let mut stored = Vec::new();
                for (user, seq) in users {
                    let user = UserId::new(&user).ok_or("an empty user id")?;
                    if seq.is_some() {
                        stored.push((user.clone(), seq));
                    }
                    ids.push(user);
                }
                (Target::Users(ids), stored)
            }
            LiveTarget::Channel(channel) => (Target::Channel(channel.into()), Vec::new()),
            LiveTarget::Broadcast => (Target::Broadcast, Vec::new()),
            LiveTarget::Connection(id) => (Target::Connection(id.into()), Vec::new()),
        };
        let store = !stored.is_empty();
        let notification = Notification::new(self.id, self.event, target, store, self.payload);
        let mut request = RouteRequest::new(notification, None);
        request.stored = stored;
        Ok(request)
    }
}

/// A user's counts after a change on some instance.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveCounts {
    pub user: String,
    pub total: u64,
    pub unread: u64,
    pub version: u64,
}

/// `list`: this instance's connections (of one user, or all).
#[derive(Debug, Serialize, Deserialize)]
pub struct ListCall {
    pub user_id: Option<String>,
}

/// `disconnect`: close this connection if it is here.
#[derive(Debug, Serialize, Deserialize)]
pub struct DisconnectCall {
    pub id: String,
}

/// The answer to a `disconnect`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DisconnectReply {
    pub found: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_live_message_becomes_a_request_with_seqs() {
        let body = r#"{"id":"m","event":"e","payload":{"n":12345678901234567890},
                       "to":{"users":[["1",7],["2",9]]}}"#;
        let live: LiveNotification = serde_json::from_str(body).unwrap();
        let request = live.into_request().unwrap();
        assert_eq!(request.stored.len(), 2);
        assert_eq!(request.stored[1].1, Some(9));
        assert!(request.notification.store);
        assert!(request
            .notification
            .frame_with_seq(7)
            .contains(r#""payload":{"n":12345678901234567890}"#));
        let live: LiveNotification =
            serde_json::from_str(r#"{"id":"m","event":"e","payload":1,"to":"broadcast"}"#).unwrap();
        assert!(live.into_request().unwrap().stored.is_empty());
        let bad: LiveNotification =
            serde_json::from_str(r#"{"id":"m","event":"e","payload":1,"to":{"users":[["",1]]}}"#)
                .unwrap();
        assert!(bad.into_request().is_err());
    }
}
