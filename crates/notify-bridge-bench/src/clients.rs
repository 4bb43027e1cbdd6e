//! The load: real WebSocket clients (JWT in the query, source addresses
//! spread over 127.0.0.2…), a pipelined AMQP publisher with confirms, and
//! the recorders both they and the baseline consumer (`baseline.rs`) fill.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use futures_util::{stream, StreamExt};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Connection, ConnectionProperties,
};
use tokio::{net::TcpSocket, task::JoinHandle};
use tokio_tungstenite::{
    tungstenite::{protocol::WebSocketConfig, Message},
    WebSocketStream,
};

use crate::stats::{Clock, Histogram, LastSeen, Progress, SeqSet};

/// A client socket: plain TCP, the bench talks to the bridge over loopback
/// only.
pub type Ws = WebSocketStream<tokio::net::TcpStream>;

/// The routing key the bridge's queue is bound with (its default).
pub const ROUTING_KEY: &str = "notifications.send";

/// The source address of the `i`-th client: 127.0.0.2, …, `per_source`
/// clients each, so no address runs out of ephemeral ports.
pub fn source_addr(i: usize, per_source: usize) -> Ipv4Addr {
    let k = 2 + (i / per_source.max(1)) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + k)
}

/// Connects one client as `user` from `source` and reads its `welcome`
/// frame: once this returns, the bridge routes to it.
pub async fn connect(
    ws_addr: SocketAddr,
    source: Ipv4Addr,
    token: &str,
    recv_buffer: Option<u32>,
) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4().context("cannot create a socket")?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .with_context(|| format!("cannot bind a client socket to {source}"))?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let tcp = socket
        .connect(ws_addr)
        .await
        .with_context(|| format!("cannot connect from {source} to {ws_addr}"))?;
    let _ = tcp.set_nodelay(true);
    let url = format!("ws://{ws_addr}/ws?token={token}");
    let config = WebSocketConfig::default()
        .read_buffer_size(8192)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .map_err(|e| anyhow!("handshake from {source} refused: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains(r#""type":"welcome""#) => Ok(ws),
        Ok(other) => bail!("expected a welcome frame, got {other:?}"),
        Err(_) => bail!("no welcome frame within 10 s"),
    }
}

/// Connects `users` (user id, source index) with at most `concurrency`
/// handshakes in flight; fails on the first refusal.
pub async fn connect_many(
    ws_addr: SocketAddr,
    users: Vec<(u64, usize)>,
    per_source: usize,
    concurrency: usize,
    tokens: &dyn Fn(u64) -> anyhow::Result<String>,
    recv_buffer: Option<u32>,
    progress: &Progress,
) -> anyhow::Result<Vec<(u64, Ws)>> {
    let mut jobs = Vec::with_capacity(users.len());
    for (user, index) in users {
        jobs.push((user, source_addr(index, per_source), tokens(user)?));
    }
    let mut connected = stream::iter(jobs)
        .map(|(user, source, token)| async move {
            connect(ws_addr, source, &token, recv_buffer)
                .await
                .map(|ws| (user, ws))
        })
        .buffer_unordered(concurrency.max(1));
    let mut out = Vec::new();
    while let Some(result) = connected.next().await {
        out.push(result?);
        progress.connected.fetch_add(1, Relaxed);
    }
    // Handshakes finish in any order; callers index by user.
    out.sort_by_key(|(user, _)| *user);
    Ok(out)
}

/// What a notification's payload carries: `{"r":RUN,"s":SEQ,"t":NANOS}`.
pub struct Stamp {
    pub run: usize,
    pub seq: u64,
    pub sent: u64,
}

/// Finds the stamp at the start of the payload of a notification frame
/// (`…"payload":{"r":1,"s":2,"t":3…`) without parsing the whole frame.
pub fn parse_stamp(frame: &str) -> Option<Stamp> {
    let at = frame.rfind(r#""payload":{"r":"#)? + r#""payload":{"r":"#.len();
    let rest = &frame[at..];
    let (run, rest) = number(rest)?;
    let rest = rest.strip_prefix(r#","s":"#)?;
    let (seq, rest) = number(rest)?;
    let rest = rest.strip_prefix(r#","t":"#)?;
    let (sent, _) = number(rest)?;
    Some(Stamp {
        run: run as usize,
        seq,
        sent,
    })
}

fn number(text: &str) -> Option<(u64, &str)> {
    let end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    Some((text[..end].parse().ok()?, &text[end..]))
}

/// Writes a message body with the stamp first in the payload.
pub fn body(out: &mut Vec<u8>, target: &str, run: usize, seq: u64, sent: u64, pad: usize) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        r#"{{{target},"id":"b{run}-{seq}","payload":{{"r":{run},"s":{seq},"t":{sent}"#
    );
    if pad > 0 {
        out.extend_from_slice(br#","pad":""#);
        out.resize(out.len() + pad, b'x');
        out.push(b'"');
    }
    out.extend_from_slice(b"}}");
}

/// Everything one measured run (phase) records.
pub struct Recorder {
    pub latency: Histogram,
    /// Unicast: which sequence numbers arrived (each once).
    pub seqs: SeqSet,
    /// Broadcast: per message, frames received and the latest arrival.
    pub per_message: Option<PerMessage>,
    pub frames: AtomicU64,
    pub last_receive: LastSeen,
}

/// Broadcast bookkeeping per message: frames seen, the last arrival and the
/// publish time (for the latency to the last socket).
pub struct PerMessage {
    pub frames: Box<[AtomicU64]>,
    pub last_arrival: Box<[AtomicU64]>,
    pub sent: Box<[AtomicU64]>,
    pub duplicates: AtomicU64,
}

impl Recorder {
    /// A recorder for a unicast run of `messages`: each sequence number must
    /// arrive once.
    pub fn unicast(messages: u64) -> Self {
        Self {
            latency: Histogram::default(),
            seqs: SeqSet::new(messages),
            per_message: None,
            frames: AtomicU64::new(0),
            last_receive: LastSeen::default(),
        }
    }

    /// A recorder for a broadcast run of `messages`: every socket gets every
    /// message, counted per message.
    pub fn broadcast(messages: u64) -> Self {
        let zeros = || (0..messages).map(|_| AtomicU64::new(0)).collect();
        Self {
            per_message: Some(PerMessage {
                frames: zeros(),
                last_arrival: zeros(),
                sent: zeros(),
                duplicates: AtomicU64::new(0),
            }),
            seqs: SeqSet::new(0),
            ..Self::unicast(0)
        }
    }
}

/// The recorders of one invocation, indexed by the payload's `r`; index 0
/// is warm-up traffic, which is not measured.
pub struct Recorders {
    pub clock: Clock,
    pub runs: Vec<Arc<Recorder>>,
    pub progress: Arc<Progress>,
}

/// One client's fate, read after the run.
#[derive(Default)]
pub struct ClientState {
    pub close_code: AtomicU32,
    pub ended: AtomicBool,
    pub errored: AtomicBool,
}

/// A reading client: its task records every notification frame.
pub struct Reader {
    pub state: Arc<ClientState>,
    pub task: JoinHandle<Option<Ws>>,
    stop: Arc<tokio::sync::Notify>,
}

impl Reader {
    /// Reads `ws` on a task of its own until stopped, recording every
    /// notification frame into the run its payload names.
    pub fn spawn(mut ws: Ws, recorders: Arc<Recorders>) -> Self {
        let state = Arc::new(ClientState::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let (state2, stop2) = (state.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // Broadcast duplicates: one bit per (run, seq) seen by this socket.
            let mut seen: Vec<Vec<u64>> = Vec::new();
            loop {
                let next = tokio::select! {
                    _ = stop2.notified() => return Some(ws),
                    next = ws.next() => next,
                };
                match next {
                    Some(Ok(Message::Text(text))) => {
                        let now = recorders.clock.now();
                        let Some(stamp) = parse_stamp(text.as_str()) else {
                            continue;
                        };
                        let Some(rec) = recorders.runs.get(stamp.run) else {
                            continue;
                        };
                        recorders.progress.received.fetch_add(1, Relaxed);
                        if stamp.run == 0 {
                            continue;
                        }
                        rec.frames.fetch_add(1, Relaxed);
                        rec.last_receive.update(now);
                        let latency = now.saturating_sub(stamp.sent);
                        match &rec.per_message {
                            None => {
                                if rec.seqs.mark(stamp.seq) {
                                    rec.latency.record(latency);
                                }
                            }
                            Some(pm) => {
                                let Some(frames) = pm.frames.get(stamp.seq as usize) else {
                                    continue;
                                };
                                if seen.len() <= stamp.run {
                                    seen.resize(stamp.run + 1, Vec::new());
                                }
                                let bits = &mut seen[stamp.run];
                                let word = (stamp.seq / 64) as usize;
                                if bits.len() <= word {
                                    bits.resize(word + 1, 0);
                                }
                                let bit = 1u64 << (stamp.seq % 64);
                                if bits[word] & bit != 0 {
                                    pm.duplicates.fetch_add(1, Relaxed);
                                    continue;
                                }
                                bits[word] |= bit;
                                frames.fetch_add(1, Relaxed);
                                pm.last_arrival[stamp.seq as usize].fetch_max(now, Relaxed);
                                rec.latency.record(latency);
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        state2
                            .close_code
                            .store(frame.map_or(1005, |f| u16::from(f.code).into()), Relaxed);
                        state2.ended.store(true, Relaxed);
                        return None;
                    }
                    Some(Ok(_)) => {} // ping (answered by tungstenite), pong, binary
                    Some(Err(_)) | None => {
                        state2.errored.store(true, Relaxed);
                        state2.ended.store(true, Relaxed);
                        return None;
                    }
                }
            }
        });
        Self { state, task, stop }
    }

    /// A reader for each socket, all recording into `recorders`: how every
    /// scenario starts listening on the sockets it connected.
    pub fn spawn_all(sockets: Vec<(u64, Ws)>, recorders: &Arc<Recorders>) -> Vec<Self> {
        sockets
            .into_iter()
            .map(|(_, ws)| Self::spawn(ws, recorders.clone()))
            .collect()
    }

    /// Stops the readers without a close handshake: the end of a
    /// scenario, whose figures were taken.
    pub fn abort_all(readers: Vec<Self>) {
        for reader in readers {
            reader.task.abort();
        }
    }

    /// Stops reading and hands the socket back (None when it had ended).
    pub async fn into_socket(self) -> Option<Ws> {
        self.stop.notify_one();
        self.task.await.ok().flatten()
    }
}

/// Reads a socket that was not read during the run, up to its end:
/// the close code the server sent, or None when the connection was
/// dropped without one, or Some(0) when it is still open after `wait`.
pub async fn drain_for_close(mut ws: Ws, wait: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Some(0),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Some(frame.map_or(1005, |f| u16::from(f.code)))
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
        }
    }
}

/// An AMQP channel in confirm mode to one exchange.
pub struct Publisher {
    connection: Connection,
    channel: lapin::Channel,
    exchange: String,
    lanes: usize,
}

/// How one publishing run went.
#[derive(Debug, Default, Clone, Copy)]
pub struct Published {
    pub sent: u64,
    pub nacked: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

impl Publisher {
    /// Connects with publisher confirms on, so a message counts as published
    /// only once the broker has it.
    pub async fn connect(url: &str, exchange: &str, lanes: usize) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("cannot connect the publisher to {url}"))?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot enable publisher confirms")?;
        Ok(Self {
            connection,
            channel,
            exchange: exchange.to_string(),
            lanes,
        })
    }

    /// Publishes `count` messages at `rate` per second (0: as fast as
    /// `window` outstanding confirms allow) from `lanes` concurrent
    /// publishing loops (lane j sends seq j, j+lanes, …; lapin's
    /// `basic_publish` waits for its frame to be written, so one loop alone
    /// cannot keep the broker busy). `make(seq, stamp_ns, out)` writes each
    /// body, stamped with the time just before it is sent.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        count: u64,
        rate: f64,
        window: usize,
        clock: Clock,
        progress: &Progress,
        make: impl Fn(u64, u64, &mut Vec<u8>),
    ) -> anyhow::Result<Published> {
        let lanes = self.lanes.max(1) as u64;
        let started = tokio::time::Instant::now();
        let first_ns = clock.now();
        let per_lane_window = (window / lanes as usize).max(1);
        let make = &make;
        let lane = |lane: u64| async move {
            let mut pending = std::collections::VecDeque::with_capacity(per_lane_window + 1);
            let mut buf = Vec::with_capacity(256);
            let mut nacked = 0u64;
            let mut seq = lane;
            while seq < count {
                if rate > 0.0 {
                    let due = started + Duration::from_secs_f64(seq as f64 / rate);
                    if due > tokio::time::Instant::now() {
                        tokio::time::sleep_until(due).await;
                    }
                }
                make(seq, clock.now(), &mut buf);
                let confirm = self
                    .channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        ROUTING_KEY.into(),
                        BasicPublishOptions::default(),
                        &buf,
                        BasicProperties::default(),
                    )
                    .await
                    .context("publish failed")?;
                pending.push_back(confirm);
                progress.published.fetch_add(1, Relaxed);
                while pending.len() >= per_lane_window {
                    if let Some(c) = pending.pop_front() {
                        if !c.await.context("publisher confirm failed")?.is_ack() {
                            nacked += 1;
                        }
                    }
                }
                seq += lanes;
            }
            for c in pending {
                if !c.await.context("publisher confirm failed")?.is_ack() {
                    nacked += 1;
                }
            }
            anyhow::Ok(nacked)
        };
        let results = futures_util::future::join_all((0..lanes).map(lane)).await;
        let mut out = Published {
            sent: count,
            first_ns,
            ..Default::default()
        };
        for r in results {
            out.nacked += r?;
        }
        out.last_ns = clock.now();
        Ok(out)
    }

    /// Closes the connection (the confirms were awaited by `run`).
    pub async fn close(self) {
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_through_a_frame() {
        let mut b = Vec::new();
        body(&mut b, r#""user_id":7"#, 2, 42, 123456789, 5);
        let text = String::from_utf8(b).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["payload"]["pad"], "xxxxx");
        let msg =
            notify_bridge::message::decode(text.as_bytes(), None, &Default::default()).unwrap();
        let s = parse_stamp(msg.frame.as_str()).unwrap();
        assert_eq!((s.run, s.seq, s.sent), (2, 42, 123456789));
        assert_eq!(source_addr(0, 1000), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_addr(254_000, 1000), Ipv4Addr::new(127, 0, 1, 0));
    }
}
