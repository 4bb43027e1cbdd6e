//! The active writer's step after each commit: find which instances hold
//! the batch's recipients (presence is read after the commit, so a socket
//! that registered during it was either in the replay it read or is found
//! here), send each of them one live message per notification, then ack
//! the batch in order. Nothing is sent to an instance with no recipient.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Serialize;
use serde_json::value::RawValue;
use tracing::{debug, warn};

use super::{
    channel_key, instance_key,
    link::LiveLink,
    live::{Kind, LiveTarget},
    presence::Presence,
    BROADCAST_KEY,
};
use crate::{
    connection_id,
    inbox::PgStore,
    message::{Notification, Target, UserId},
    receipts::{Kept, Outcome, UserOutcome},
    router::RouteRequest,
};

/// A live notification as sent; read back as [`super::live::LiveNotification`].
#[derive(Serialize)]
struct Outgoing<'a> {
    id: &'a str,
    event: &'a str,
    payload: &'a RawValue,
    to: LiveTarget,
}

/// What the writer needs to send live messages.
pub struct Fanout {
    pub link: Arc<LiveLink>,
    pub presence: Arc<Presence>,
    pub store: Arc<PgStore>,
}

/// A user recipient with their seq (when stored).
type Recipient = (String, Option<u64>);

impl Fanout {
    /// Sends the committed batch live, then acks it in order. A message
    /// that cannot be sent live is acked all the same once committed: the
    /// live hop is best effort, stored entries are repaired from the inbox.
    pub async fn send(&self, batch: Vec<RouteRequest>) {
        let mut recipients: Vec<Vec<Recipient>> = batch.iter().map(recipients_of).collect();
        self.fill_redelivered_seqs(&batch, &mut recipients).await;
        let holders = self.holders(&recipients).await;
        let mut instances = None;
        for (request, users) in batch.into_iter().zip(recipients) {
            let n = &request.notification;
            let outcome = match &request.settlement {
                Some(s) if s.receipts_wanted(n) => {
                    Some(self.outcome(n, &users, &holders, &mut instances).await)
                }
                _ => None,
            };
            if let Err(e) = self.send_one(n, users, &holders).await {
                warn!(error = %e, id = %n.id, "cannot send a message live; stored entries reach clients from the inbox");
            }
            if let Some(settlement) = request.settlement {
                settlement.routed(n, outcome);
            }
        }
    }

    /// What the receipts say in cluster mode, decided here by presence:
    /// a user is `delivered` to the instances holding them (`connections`
    /// counts instances), else `offline`; a channel or broadcast message
    /// counts the live instances it was sent to, a connection target the
    /// instance named in it when that one is live.
    async fn outcome(
        &self,
        n: &Notification,
        users: &[Recipient],
        holders: &Option<HashMap<String, Vec<String>>>,
        instances: &mut Option<Vec<String>>,
    ) -> Outcome {
        if let Target::User(_) | Target::Users(_) = n.target {
            return Outcome::Users(
                users
                    .iter()
                    .filter_map(|(user, seq)| {
                        Some(UserOutcome {
                            user: UserId::new(user)?,
                            connections: holders
                                .as_ref()
                                .and_then(|h| h.get(user))
                                .map_or(0, Vec::len),
                            kept: seq.map_or(Kept::No, Kept::Seq),
                        })
                    })
                    .collect(),
            );
        }
        if instances.is_none() {
            *instances = Some(self.presence.live_instances().await.unwrap_or_default());
        }
        let live = instances.as_deref().unwrap_or_default();
        Outcome::Connections(match &n.target {
            Target::Connection(id) => connection_id::instance_of(id)
                .is_some_and(|i| live.iter().any(|l| l == i))
                .into(),
            _ => live.len(),
        })
    }

    /// A redelivered message's users already hold it: they get it live
    /// again with the seq it has (their sessions drop what they had).
    async fn fill_redelivered_seqs(
        &self,
        batch: &[RouteRequest],
        recipients: &mut [Vec<Recipient>],
    ) {
        let missing: Vec<(&str, &str)> = batch
            .iter()
            .zip(recipients.iter())
            .filter(|(request, _)| !request.stored.is_empty())
            .flat_map(|(request, users)| {
                users
                    .iter()
                    .filter(|(_, seq)| seq.is_none())
                    .map(|(user, _)| (user.as_str(), request.notification.id.as_str()))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        let known = match self.store.seqs_of(&missing).await {
            Ok(known) => known,
            Err(e) => {
                warn!(error = %e, "cannot read the seqs of redelivered messages");
                return;
            }
        };
        for (request, users) in batch.iter().zip(recipients.iter_mut()) {
            if request.stored.is_empty() {
                continue;
            }
            let id = &request.notification.id;
            for (user, seq) in users.iter_mut() {
                if seq.is_none() {
                    *seq = known.get(&(user.clone(), id.clone())).copied();
                }
            }
            // One the store lost in between (removed) is not sent at all.
            users.retain(|(_, seq)| seq.is_some());
        }
    }

    /// Who holds the batch's users; `None` when presence cannot be read,
    /// or may be incomplete after a database restart (then user messages go
    /// to every instance, which costs but loses nothing).
    async fn holders(&self, recipients: &[Vec<Recipient>]) -> Option<HashMap<String, Vec<String>>> {
        let mut users: Vec<&str> = recipients
            .iter()
            .flatten()
            .map(|(u, _)| u.as_str())
            .collect();
        if users.is_empty() {
            return Some(HashMap::new());
        }
        users.sort_unstable();
        users.dedup();
        match self.presence.holders(&users).await {
            Ok(None) => {
                debug!("presence is being rebuilt after a database restart; sending user messages to every instance");
                None
            }
            Ok(Some(rows)) => {
                let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
                for (user, instance) in rows {
                    by_user.entry(user).or_default().push(instance);
                }
                Some(by_user)
            }
            Err(e) => {
                warn!(error = %e, "cannot read presence; sending user messages to every instance");
                None
            }
        }
    }

    async fn send_one(
        &self,
        n: &Notification,
        users: Vec<Recipient>,
        holders: &Option<HashMap<String, Vec<String>>>,
    ) -> anyhow::Result<()> {
        let outgoing = |to| Outgoing {
            id: &n.id,
            event: &n.event,
            payload: &n.payload,
            to,
        };
        let publish = |key: String, body: Outgoing<'_>| {
            let body = serde_json::to_vec(&body);
            async move { self.link.publish(&key, Kind::Notify, &body?).await }
        };
        match &n.target {
            Target::Channel(channel) => {
                publish(
                    channel_key(channel),
                    outgoing(LiveTarget::Channel(channel.to_string())),
                )
                .await
            }
            Target::Broadcast => {
                publish(BROADCAST_KEY.into(), outgoing(LiveTarget::Broadcast)).await
            }
            Target::Connection(id) => match connection_id::instance_of(id) {
                Some(instance) => {
                    publish(
                        instance_key(instance),
                        outgoing(LiveTarget::Connection(id.to_string())),
                    )
                    .await
                }
                None => Ok(()),
            },
            Target::User(_) | Target::Users(_) => {
                let Some(holders) = holders else {
                    return publish(BROADCAST_KEY.into(), outgoing(LiveTarget::Users(users))).await;
                };
                for (instance, users) in by_instance(users, holders) {
                    publish(instance_key(&instance), outgoing(LiveTarget::Users(users))).await?;
                }
                Ok(())
            }
        }
    }
}

/// Each holding instance with its share of the users.
fn by_instance(
    users: Vec<Recipient>,
    holders: &HashMap<String, Vec<String>>,
) -> BTreeMap<String, Vec<Recipient>> {
    let mut out: BTreeMap<String, Vec<Recipient>> = BTreeMap::new();
    for (user, seq) in users {
        for instance in holders.get(&user).into_iter().flatten() {
            out.entry(instance.clone())
                .or_default()
                .push((user.clone(), seq));
        }
    }
    out
}

/// A request's user recipients: the stored ones with their seqs (`None`
/// for a redelivery, filled in later), or the targets of an unstored one.
fn recipients_of(request: &RouteRequest) -> Vec<Recipient> {
    if !request.stored.is_empty() {
        return request
            .stored
            .iter()
            .map(|(user, seq)| (user.to_string(), *seq))
            .collect();
    }
    match &request.notification.target {
        Target::User(user) => vec![(user.to_string(), None)],
        Target::Users(users) => users.iter().map(|u| (u.to_string(), None)).collect(),
        Target::Channel(_) | Target::Broadcast | Target::Connection(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_go_to_their_holders_only() {
        let holders = HashMap::from([
            ("1".to_string(), vec!["a".to_string(), "b".to_string()]),
            ("2".to_string(), vec!["b".to_string()]),
        ]);
        let users = vec![
            ("1".into(), Some(5)),
            ("2".into(), Some(9)),
            ("3".into(), Some(1)),
        ];
        let out = by_instance(users, &holders);
        assert_eq!(out.len(), 2);
        assert_eq!(out["a"], vec![("1".to_string(), Some(5))]);
        assert_eq!(
            out["b"],
            vec![("1".to_string(), Some(5)), ("2".to_string(), Some(9))]
        );
    }

    #[test]
    fn what_is_sent_reads_back_as_a_live_notification() {
        let payload = RawValue::from_string(r#"{"big":12345678901234567890}"#.into()).unwrap();
        let body = serde_json::to_vec(&Outgoing {
            id: "m",
            event: "e",
            payload: &payload,
            to: LiveTarget::Users(vec![("1".into(), Some(3))]),
        })
        .unwrap();
        let back: super::super::live::LiveNotification = serde_json::from_slice(&body).unwrap();
        let request = back.into_request().unwrap();
        assert!(request
            .notification
            .frame_with_seq(3)
            .contains("12345678901234567890"));
    }
}
