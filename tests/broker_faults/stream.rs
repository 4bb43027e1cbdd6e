//! A confirmed message stream that outlives broker outages, and the users who
//! receive it: what the outage tests of `broker_faults.rs` count with.
//!
//! The publisher behaves as a careful production publisher does: persistent
//! messages, publisher confirms, a bounded window of unconfirmed messages,
//! and whatever was not confirmed (nacked, timed out, connection lost) is
//! published again after reconnecting. Each attempt carries its number in
//! the payload, so a recipient can tell a duplicate the publisher made (same
//! id, another attempt) from one the bridge made (same id, same attempt:
//! a broker redelivery).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{stream::FuturesUnordered, SinkExt, StreamExt};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Connection, ConnectionProperties,
};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{amqp_url, Client};

/// The user message `i` is addressed to: users 1..=`users` in turn.
pub fn recipient(i: u64, users: u64) -> u64 {
    i % users + 1
}

/// What the publisher did, for the report.
#[derive(Debug, Default)]
pub struct PublishTally {
    /// basic.publish calls, retries included.
    pub sent: AtomicU64,
    /// Distinct messages the broker confirmed (acked).
    pub confirmed: AtomicU64,
    /// Publishes that were not confirmed and were sent again.
    pub retried: AtomicU64,
    /// Successful (re)connections after the first.
    pub reconnects: AtomicU64,
}

/// Publishes messages 0..total to `exchange` at `rate` per second until the
/// broker has confirmed every one. `started` is set once the first message
/// is confirmed; the returned task ends when all are confirmed.
pub fn publish_until_confirmed(
    exchange: String,
    users: u64,
    total: u64,
    rate: u64,
    tally: Arc<PublishTally>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        const WINDOW: usize = 400;
        const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
        let tick = Duration::from_millis(10);
        let per_tick = (rate as f64 * tick.as_secs_f64()).ceil().max(1.0) as u64;
        let mut attempts = vec![0u32; total as usize];
        let mut confirmed = vec![false; total as usize];
        let mut retry: VecDeque<u64> = VecDeque::new();
        let mut next_fresh = 0u64;
        let mut first_connection = true;
        while tally.confirmed.load(Relaxed) < total {
            // (Re)connect, as often as it takes.
            let channel = match connect_confirming().await {
                Some(channel) => channel,
                None => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if !first_connection {
                tally.reconnects.fetch_add(1, Relaxed);
            }
            first_connection = false;
            let mut inflight = FuturesUnordered::new();
            let mut pace = tokio::time::interval(tick);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut broken = false;
            while !broken && tally.confirmed.load(Relaxed) < total {
                tokio::select! {
                    _ = pace.tick() => {
                        for _ in 0..per_tick {
                            if inflight.len() >= WINDOW {
                                break;
                            }
                            let i = match retry.pop_front() {
                                Some(i) => i,
                                None if next_fresh < total => {
                                    next_fresh += 1;
                                    next_fresh - 1
                                }
                                None => break,
                            };
                            attempts[i as usize] += 1;
                            let body = format!(
                                r#"{{"user_id":{},"id":"m-{i}","payload":{{"i":{i},"a":{}}}}}"#,
                                recipient(i, users),
                                attempts[i as usize]
                            );
                            tally.sent.fetch_add(1, Relaxed);
                            let published = channel
                                .basic_publish(
                                    exchange.as_str().into(),
                                    "notifications.send".into(),
                                    BasicPublishOptions::default(),
                                    body.as_bytes(),
                                    BasicProperties::default().with_delivery_mode(2),
                                )
                                .await;
                            match published {
                                Ok(confirm) => inflight.push(async move {
                                    let outcome =
                                        tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await;
                                    (i, matches!(outcome, Ok(Ok(c)) if c.is_ack()))
                                }),
                                Err(_) => {
                                    retry.push_back(i);
                                    broken = true;
                                    break;
                                }
                            }
                        }
                    }
                    Some((i, acked)) = inflight.next(), if !inflight.is_empty() => {
                        if acked {
                            if !std::mem::replace(&mut confirmed[i as usize], true) {
                                tally.confirmed.fetch_add(1, Relaxed);
                            }
                        } else {
                            retry.push_back(i);
                            broken = true;
                        }
                    }
                }
            }
            // Whatever is still unconfirmed on a broken channel is retried.
            // A confirm may still arrive; wait for each briefly.
            while let Some((i, acked)) = inflight.next().await {
                if acked {
                    if !std::mem::replace(&mut confirmed[i as usize], true) {
                        tally.confirmed.fetch_add(1, Relaxed);
                    }
                } else if !confirmed[i as usize] {
                    retry.push_back(i);
                }
            }
            tally.retried.store(
                attempts
                    .iter()
                    .map(|&a| u64::from(a.saturating_sub(1)))
                    .sum(),
                Relaxed,
            );
            if broken {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

async fn connect_confirming() -> Option<lapin::Channel> {
    let connection = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()?;
    let channel = connection.create_channel().await.ok()?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .ok()?;
    Some(channel)
}

/// Every notification the users received, keyed by message number.
#[derive(Debug, Default)]
pub struct Received {
    /// message → (attempt → times received).
    pub by_message: Mutex<HashMap<u64, HashMap<u64, u32>>>,
    /// Frames that reached a user they were not addressed to.
    pub misrouted: AtomicU64,
    /// Sockets that closed or failed while they should have stayed open.
    pub closed: AtomicU64,
    pub frames: AtomicU64,
}

impl Received {
    /// Distinct messages received at least once.
    pub fn distinct(&self) -> u64 {
        self.by_message.lock().unwrap().len() as u64
    }
}

/// Counts the report needs: duplicates the bridge made (a broker
/// redelivery: same attempt twice) and the publisher made (several attempts
/// of one message received).
pub struct Duplicates {
    pub redelivered: u64,
    pub republished: u64,
}

impl Received {
    pub fn duplicates(&self) -> Duplicates {
        let map = self.by_message.lock().unwrap();
        let mut d = Duplicates {
            redelivered: 0,
            republished: 0,
        };
        for attempts in map.values() {
            d.republished += attempts.len() as u64 - 1;
            d.redelivered += attempts.values().map(|&n| u64::from(n - 1)).sum::<u64>();
        }
        d
    }
}

/// A user's socket read in the background; `finish` proves it still answers.
pub struct Listener {
    finish: oneshot::Sender<()>,
    task: JoinHandle<bool>,
}

impl Listener {
    /// Reads `client` (user `user` of `users`) into `received` until told to
    /// finish.
    pub fn spawn(mut client: Client, user: u64, users: u64, received: Arc<Received>) -> Self {
        let (finish, mut finish_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut pinged = false;
            loop {
                let next = tokio::select! {
                    next = client.next() => next,
                    _ = &mut finish_rx, if !pinged => {
                        pinged = true;
                        if client.send(Message::Text(r#"{"type":"ping"}"#.into())).await.is_err() {
                            received.closed.fetch_add(1, Relaxed);
                            return false;
                        }
                        continue;
                    }
                };
                let text = match next {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => {
                        received.closed.fetch_add(1, Relaxed);
                        return false;
                    }
                };
                let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                match frame["type"].as_str() {
                    Some("pong") if pinged => return true,
                    Some("notification") => {
                        received.frames.fetch_add(1, Relaxed);
                        let i = frame["payload"]["i"].as_u64().expect("payload.i");
                        let attempt = frame["payload"]["a"].as_u64().expect("payload.a");
                        if recipient(i, users) != user {
                            received.misrouted.fetch_add(1, Relaxed);
                        }
                        *received
                            .by_message
                            .lock()
                            .unwrap()
                            .entry(i)
                            .or_default()
                            .entry(attempt)
                            .or_default() += 1;
                    }
                    _ => {}
                }
            }
        });
        Self { finish, task }
    }

    /// Pings and waits for the pong: true when the socket is still open.
    pub async fn finish(self) -> bool {
        let _ = self.finish.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .map(|r| r.unwrap_or(false))
            .unwrap_or(false)
    }
}

/// Statuses `/readyz` answered, in order, with repeats collapsed.
#[derive(Debug, Default)]
pub struct ReadinessLog {
    pub seen: Mutex<Vec<u16>>,
    pub stop: AtomicBool,
}

/// Polls `/readyz` every 20 ms until `log.stop` is set.
pub fn watch_readiness(http: std::net::SocketAddr, log: Arc<ReadinessLog>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !log.stop.load(Relaxed) {
            let polled = tokio::time::timeout(
                Duration::from_secs(2),
                crate::common::http_get(http, "/readyz"),
            )
            .await;
            let status = polled.map(|(status, _)| status).unwrap_or(0);
            {
                let mut seen = log.seen.lock().unwrap();
                if seen.last() != Some(&status) {
                    seen.push(status);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Waits until `done` holds or `within` passed; true when it held.
pub async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}
