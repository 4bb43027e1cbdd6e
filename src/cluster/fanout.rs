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
        let mut batches = LiveBatches::default();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut failed = None;
        for (request, users) in batch.iter().zip(recipients) {
            let n = &request.notification;
            outcomes.push(match &request.settlement {
                Some(s) if s.receipts_wanted(n) => {
                    Some(self.outcome(n, &users, &holders, &mut instances).await)
                }
                _ => None,
            });
            if let Err(e) = self.add(&mut batches, n, users, &holders).await {
                failed = Some(e);
            }
        }
        if let Err(e) = batches.flush(&self.link).await {
            failed = Some(e);
        }
        if let Some(e) = failed {
            warn!(error = %e, "cannot send live messages; stored entries reach clients from the inbox");
        }
        for (request, outcome) in batch.into_iter().zip(outcomes) {
            if let Some(settlement) = request.settlement {
                settlement.routed(&request.notification, outcome);
            }
        }
    }

    /// Runs the fanout on a task of its own: the commit stage hands it each
    /// committed batch and goes on to commit the next one while this one's
    /// presence is read and its live messages sent (in order: one task).
    /// Two batches may wait; past that the stage waits (backpressure).
    pub fn spawn(self) -> tokio::sync::mpsc::Sender<Vec<RouteRequest>> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<RouteRequest>>(2);
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                self.send(batch).await;
            }
        });
        tx
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

    /// Adds `n` to the live messages of the batch: one per instance (and
    /// broadcast) for user and connection targets; a channel or broadcast
    /// message is sent on its own, after what came before it, so that an
    /// instance receiving from several keys gets everything in order.
    async fn add(
        &self,
        batches: &mut LiveBatches,
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
        match &n.target {
            Target::Channel(channel) => {
                batches.flush(&self.link).await?;
                let item = outgoing(LiveTarget::Channel(channel.to_string()));
                batches.add(channel_key(channel), &item)?;
                batches.flush(&self.link).await
            }
            Target::Broadcast => {
                batches.flush(&self.link).await?;
                batches.add(BROADCAST_KEY.into(), &outgoing(LiveTarget::Broadcast))?;
                batches.flush(&self.link).await
            }
            Target::Connection(id) => match connection_id::instance_of(id) {
                Some(instance) => batches.add(
                    instance_key(instance),
                    &outgoing(LiveTarget::Connection(id.to_string())),
                ),
                None => Ok(()),
            },
            Target::User(_) | Target::Users(_) => {
                let Some(holders) = holders else {
                    return batches.add(BROADCAST_KEY.into(), &outgoing(LiveTarget::Users(users)));
                };
                for (instance, users) in by_instance(users, holders) {
                    batches.add(instance_key(&instance), &outgoing(LiveTarget::Users(users)))?;
                }
                Ok(())
            }
        }
    }
}

/// The live messages being gathered for one batch: per routing key, a JSON
/// array of notifications, in order. One live message per instance and
/// batch instead of one per notification (one publish each was 45 % of
/// the writer's loop, docs/performance.md).
#[derive(Default)]
struct LiveBatches {
    by_key: BTreeMap<String, Vec<u8>>,
}

impl LiveBatches {
    fn add(&mut self, key: String, item: &Outgoing<'_>) -> anyhow::Result<()> {
        let body = self.by_key.entry(key).or_insert_with(|| b"[".to_vec());
        if body.len() > 1 {
            body.push(b',');
        }
        serde_json::to_writer(&mut *body, item)?;
        Ok(())
    }

    /// Publishes what was gathered; every key is tried even when one fails.
    async fn flush(&mut self, link: &LiveLink) -> anyhow::Result<()> {
        let mut result = Ok(());
        for (key, mut body) in std::mem::take(&mut self.by_key) {
            body.push(b']');
            if let Err(e) = link.publish(&key, Kind::Notify, &body).await {
                result = Err(e);
            }
        }
        result
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
    fn a_batch_for_one_key_reads_back_as_its_live_notifications() {
        let payload = RawValue::from_string(r#"{"big":12345678901234567890}"#.into()).unwrap();
        let item = Outgoing {
            id: "m",
            event: "e",
            payload: &payload,
            to: LiveTarget::Users(vec![("1".into(), Some(3))]),
        };
        let mut batches = LiveBatches::default();
        batches.add("i.a".into(), &item).unwrap();
        batches.add("i.a".into(), &item).unwrap();
        let mut array = batches.by_key.remove("i.a").unwrap();
        array.push(b']');
        let back: Vec<super::super::live::LiveNotification> =
            serde_json::from_slice(&array).unwrap();
        assert_eq!(back.len(), 2);
        let request = back.into_iter().next().unwrap().into_request().unwrap();
        assert!(request
            .notification
            .frame_with_seq(3)
            .contains("12345678901234567890"));
    }
}
