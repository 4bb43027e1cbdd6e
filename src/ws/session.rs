//! One task per connection: it writes what the router queued (batched: feed
//! many, flush once), answers client frames, pings, and closes with the
//! right code when told to or when the client misbehaves.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::{
    tungstenite::{
        error::Error as WsError,
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message, Utf8Bytes,
    },
    WebSocketStream,
};
use tracing::{debug, Instrument};

use crate::{
    frames::{self, ClientFrame},
    inbox::{Change, Entry, Inbox},
    outbound::{self, Outbound, OutboundReceiver},
    router::{ConnectionId, SessionControl, SessionHandle},
    ws::{context::WsContext, handshake::Admission, limits::Permit},
};
// Plain or TLS (wss): the session is the same over both.
use crate::tls::ServerStream;

/// How long a close frame may take to be written before the TCP
/// connection is simply dropped.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);
/// The most frames written between two flushes.
const WRITE_BATCH: usize = 64;
/// How long writing one page of the opening frames (welcome, inbox counts,
/// then each page of the replay) may take.
const OPENING_DEADLINE: Duration = Duration::from_secs(10);

/// Runs one admitted connection to its end, in a `session` span naming
/// the connection and its user (a debug span: free at the default level,
/// where an idle socket's every byte counts).
///
/// Not an `async fn`, and everything the session owns is captured by the
/// one `async move` block, which only lends it to [`Session::run`]: an
/// `async fn` keeps each argument twice (as the argument and as the local
/// it was moved into) for the task's whole life, about 1 KB of every idle
/// connection (docs/performance.md, "Idle memory").
pub fn run(
    ws: WebSocketStream<ServerStream>,
    admission: Admission,
    permit: Permit,
    remote_addr: SocketAddr,
    ctx: Arc<WsContext>,
) -> impl Future<Output = ()> {
    let id = ConnectionId(ctx.next_connection_id.fetch_add(1, Ordering::Relaxed) + 1);
    let span =
        tracing::debug_span!("session", connection = %id, user = %admission.user, %remote_addr);
    let (outbound, queue) = outbound::queue(ctx.settings.send_queue, ctx.settings.send_queue_bytes);
    let handle = SessionHandle {
        id,
        user: admission.user.clone(),
        outbound,
        control: Arc::new(SessionControl::default()),
    };
    let session = Session {
        handle,
        admission,
        last_seq: 0,
        ctx,
    };
    // Split here, not in the task: the halves share one heap cell, so the
    // task holds two pointers rather than the whole stream.
    let (sink, stream) = ws.split();
    let mut connection = (session, sink, stream, queue);
    async move {
        let (session, sink, stream, queue) = &mut connection;
        session.run(sink, stream, queue, remote_addr).await;
    }
    .instrument(span)
    .map(move |()| drop(permit))
}

/// Cluster mode: the user's presence row (before the replay is read, so
/// whatever is committed later comes here live) and the channels' bindings
/// (before the welcome, so a channel message published after it arrives).
async fn join_cluster(ctx: &WsContext, admission: &Admission) -> anyhow::Result<()> {
    let Some(cluster) = &ctx.cluster else {
        return Ok(());
    };
    for channel in &admission.channels {
        cluster.link.join_channel(channel).await;
    }
    cluster.presence.join(admission.user.as_str()).await
}

async fn leave_cluster(ctx: &WsContext, user: &crate::message::UserId, channels: &[String]) {
    let Some(cluster) = &ctx.cluster else {
        return;
    };
    cluster.presence.leave(user.as_str()).await;
    for channel in channels {
        cluster.link.leave_channel(channel).await;
    }
}

enum Ending {
    /// Send a close frame with this code and reason.
    Close(u16, &'static str),
    /// The client sent a close frame; finish the closing handshake.
    ClientClosed,
    /// The peer is gone or unresponsive: drop the TCP connection.
    Drop,
}

impl Ending {
    /// The close `control` asks for (a plain drop when it gave no reason).
    fn asked_by(control: &SessionControl) -> Self {
        control
            .reason()
            .map_or(Ending::Drop, |(code, reason)| Ending::Close(code, reason))
    }
}

/// Resolves once the session was told to close (by the router for a slow
/// client, an admin, shutdown): the one place that turns it into an ending.
async fn told_to_close(control: &SessionControl) -> Ending {
    control.closed().await;
    Ending::asked_by(control)
}

/// Runs `work` unless the session is told to close first; the close wins,
/// also over a write that a peer which stopped reading keeps blocked.
async fn unless_closed<T>(
    control: &SessionControl,
    work: impl Future<Output = Result<T, Ending>>,
) -> Result<T, Ending> {
    tokio::select! {
        biased;
        ending = told_to_close(control) => Err(ending),
        done = work => done,
    }
}

/// A write the peer must take within `stalled_after`: one it does not
/// take means it stopped reading, and it is dropped like a peer that
/// stopped answering pings (with fewer frames pending than `send_queue`,
/// nobody else would end it: while it blocks, no ping is sent and no
/// answer is read).
///
/// A macro rather than an `async fn` taking the write: a future passed by
/// value is stored twice in the caller's (the argument and the moved copy,
/// and once more per layer), which made every session's task 14.2 KB
/// instead of 4.5 KB and an idle socket 18.9 KiB instead of 9.4 (`idle`
/// bench, docs/performance.md).
macro_rules! write_within {
    ($control:expr, $stalled_after:expr, $write:expr) => {
        tokio::select! {
            biased;
            ending = told_to_close($control) => Err(ending),
            written = tokio::time::timeout($stalled_after, $write) => stalled_or(written),
        }
    };
}

/// A write's outcome: a failed one or one not taken in time drops the peer.
fn stalled_or<T>(
    written: Result<Result<T, WsError>, tokio::time::error::Elapsed>,
) -> Result<T, Ending> {
    match written {
        Ok(written) => written.map_err(|_| Ending::Drop),
        Err(_) => {
            debug!("peer stopped reading; dropping");
            Err(Ending::Drop)
        }
    }
}

/// Writes the close frame for `ending`, then gives the client the same
/// deadline to answer it, so the close is not lost to a TCP reset.
async fn finish(sink: &mut Sink, stream: &mut Stream, ending: Ending) {
    match ending {
        Ending::Close(code, reason) => {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = tokio::time::timeout(CLOSE_DEADLINE, async {
                if sink.send(Message::Close(Some(frame))).await.is_ok() {
                    while let Some(Ok(m)) = stream.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                }
            })
            .await;
        }
        Ending::ClientClosed => {
            // tungstenite queued the close reply; write it out.
            let _ = tokio::time::timeout(CLOSE_DEADLINE, sink.close()).await;
        }
        Ending::Drop => {}
    }
}

/// Pings, and the peer that stopped answering them.
struct Heartbeat {
    interval: Duration,
    ticks: tokio::time::Interval,
    last_seen: Instant,
    /// How long a write (frames or a ping) may stay untaken: two intervals.
    stalled_after: Duration,
}

impl Heartbeat {
    fn new(id: ConnectionId, interval: Duration) -> Self {
        // The first ping at a per-connection offset within one interval, so
        // sockets that connected together (all clients of a restarted
        // instance) do not ping in one burst (measured: p99 2.26 → 1.98 ms
        // at 5,000 msg/s over 10,000 sockets).
        let spread = id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) % interval.as_nanos().max(1) as u64;
        let first_ping = Instant::now() + Duration::from_nanos(spread).max(interval / 4);
        Self {
            interval,
            ticks: tokio::time::interval_at(first_ping, interval),
            last_seen: Instant::now(),
            stalled_after: interval * 2,
        }
    }

    /// Sends the next ping, or ends a session whose peer stopped answering.
    async fn ping(&self, sink: &mut Sink, control: &SessionControl) -> Result<(), Ending> {
        if self.last_seen.elapsed() > self.interval * 2 {
            debug!("no answer to pings; dropping");
            return Err(Ending::Drop);
        }
        let ping = sink.send(Message::Ping(Default::default()));
        write_within!(control, self.stalled_after, ping)
    }
}

/// When the session's token expires; never for an `exp` further away than
/// an `Instant` reaches.
async fn expiry(expires_at: Option<SystemTime>) {
    let at = expires_at.and_then(|at| {
        let left = at.duration_since(SystemTime::now()).unwrap_or_default();
        Instant::now().checked_add(left)
    });
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Session {
    /// What the router has of this session too: its id, its queue (for the
    /// session's own pongs and error frames), its close control.
    handle: SessionHandle,
    admission: Admission,
    /// The highest inbox seq the client has, or that the store had
    /// assigned when the opening read it ("through"): stored frames up to
    /// it are duplicates, and one past `last_seq + 1` is a gap to repair.
    last_seq: u64,
    ctx: Arc<WsContext>,
}

type Sink = futures_util::stream::SplitSink<WebSocketStream<ServerStream>, Message>;

/// Where the writer stands in its user's inbox, and where to fetch what a
/// jump in seq skipped (frames lost on the way, in cluster mode).
struct SeqCursor<'a> {
    last: &'a mut u64,
    repair: Option<(&'a Inbox, &'a str)>,
    metrics: &'a crate::metrics::Metrics,
}

impl SeqCursor<'_> {
    /// `true` when a stored frame with `seq` is new; feeds the entries
    /// between the last one and it first, read from the store.
    async fn admit(&mut self, sink: &mut Sink, seq: u64) -> Result<bool, WsError> {
        if seq <= *self.last {
            return Ok(false);
        }
        if seq > *self.last + 1 {
            if let Some((inbox, user)) = self.repair {
                self.metrics.inbox_gap_repairs.inc();
                // Boxed: the store read's state (1.8 KB) would otherwise be
                // part of every session's task for its whole life, for a
                // repair that only a lost live message makes.
                Box::pin(self.fill(sink, inbox, user, seq - 1)).await?;
            }
        }
        *self.last = seq;
        Ok(true)
    }

    async fn fill(
        &mut self,
        sink: &mut Sink,
        inbox: &Inbox,
        user: &str,
        through: u64,
    ) -> Result<(), WsError> {
        while *self.last < through {
            let page = match inbox.replay_page(user, *self.last, through).await {
                Ok(page) if !page.is_empty() => page,
                Ok(_) => break,
                Err(e) => {
                    // The frame still passes; its seq shows the client the
                    // jump, and `since` on reconnect fills it.
                    tracing::error!(error = %e, "inbox read for a gap repair failed");
                    break;
                }
            };
            for entry in page {
                *self.last = entry.seq;
                let frame = crate::message::stored_frame(
                    entry.seq,
                    &entry.id,
                    &entry.event,
                    &entry.payload,
                );
                sink.feed(Message::Text(frame)).await?;
            }
        }
        Ok(())
    }
}

/// Feeds a batch of frames and flushes once; returns how many were written
/// and leaves the broker-delivery times of notification frames in
/// `latencies`. Stored notifications go through `seqs`: duplicates are
/// dropped, gaps filled from the store first.
async fn write_batch(
    sink: &mut Sink,
    batch: &mut Vec<Outbound>,
    latencies: &mut Vec<std::time::Instant>,
    seqs: &mut SeqCursor<'_>,
) -> Result<u64, WsError> {
    latencies.clear();
    let mut frames = 0;
    for out in batch.drain(..) {
        if let Some(seq) = out.seq {
            if !seqs.admit(sink, seq).await? {
                continue;
            }
        }
        if let Some(at) = out.received_at {
            latencies.push(at);
        }
        sink.feed(Message::Text(out.text)).await?;
        frames += 1;
    }
    sink.flush().await?;
    Ok(frames)
}
type Stream = futures_util::stream::SplitStream<WebSocketStream<ServerStream>>;

impl Session {
    /// `welcome`, then with the inbox: the counts, a `gap` if retention
    /// dropped entries after `since`, and the first page of the replay.
    /// Read after the session was registered, so whatever is committed
    /// later arrives live; what arrives live and was also replayed (or is
    /// at most `since`) is dropped by seq. `last_seq` starts at the last seq
    /// the store had assigned at the read ("through"), never the client's
    /// `since`: beyond it nothing is replayed and every live frame counts.
    /// Returns the frames and, when the replay has more pages, the cursor
    /// `(after, through)`.
    async fn opening_frames(&mut self) -> Result<(Vec<Outbound>, Option<(u64, u64)>), Ending> {
        let user = &self.admission.user;
        let mut frames = vec![Outbound::control(frames::welcome(
            self.ctx.router.names().name(self.handle.id),
            user,
            &self.admission.channels,
        ))];
        let Some(inbox) = &self.ctx.inbox else {
            return Ok((frames, None));
        };
        let since = self.admission.since;
        let replay = match inbox.replay(user.as_str(), since).await {
            Ok(replay) => replay,
            Err(e) => {
                tracing::error!(error = %e, user = %user, "inbox replay failed");
                return Err(Ending::Close(1011, "inbox unavailable"));
            }
        };
        frames.push(Outbound::control(frames::inbox_counts(replay.counts)));
        self.last_seq = replay.through;
        let Some(since) = since else {
            return Ok((frames, None));
        };
        if let Some(oldest) = replay.gap_oldest {
            frames.push(Outbound::control(frames::gap(since, oldest)));
            self.ctx.metrics.inbox_gaps.inc();
        }
        let more = self.replayed(&mut frames, replay.entries);
        Ok((frames, more.map(|after| (after, replay.through))))
    }

    /// Appends replayed entries as frames; the seq to read after when the
    /// page was not empty (there may be more).
    fn replayed(&self, frames: &mut Vec<Outbound>, entries: Vec<Entry>) -> Option<u64> {
        self.ctx.metrics.inbox_replayed.add(entries.len() as u64);
        let last = entries.last().map(|e| e.seq);
        frames.extend(entries.into_iter().map(|entry| {
            Outbound::control(crate::message::stored_frame(
                entry.seq,
                &entry.id,
                &entry.event,
                &entry.payload,
            ))
        }));
        last
    }

    /// Writes the opening frames, then the rest of the replay page by page:
    /// each page is written before the next is read, so a replay holds at
    /// most one page. Each write must finish within `OPENING_DEADLINE`.
    async fn write_opening(&mut self, sink: &mut Sink) -> Result<u64, Ending> {
        let (mut frames, mut cursor) = self.opening_frames().await?;
        let mut latencies = Vec::new();
        let mut written = 0;
        loop {
            let mut unchecked = 0;
            let mut seqs = SeqCursor {
                last: &mut unchecked,
                repair: None,
                metrics: &self.ctx.metrics,
            };
            let write = write_batch(sink, &mut frames, &mut latencies, &mut seqs);
            match tokio::time::timeout(OPENING_DEADLINE, write).await {
                Ok(Ok(n)) => written += n,
                _ => return Err(Ending::Drop),
            }
            let Some((after, through)) = cursor.filter(|(after, through)| after < through) else {
                return Ok(written);
            };
            let inbox = self.ctx.inbox.as_ref().expect("a replay needs the inbox");
            let page = match inbox
                .replay_page(self.admission.user.as_str(), after, through)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, user = %self.admission.user, "inbox replay failed");
                    return Err(Ending::Close(1011, "inbox unavailable"));
                }
            };
            cursor = self
                .replayed(&mut frames, page)
                .map(|after| (after, through));
        }
    }

    /// Registers, opens, serves and closes; the router and the cluster
    /// forget the connection before the close handshake.
    async fn run(
        &mut self,
        sink: &mut Sink,
        stream: &mut Stream,
        queue: &mut OutboundReceiver,
        remote_addr: SocketAddr,
    ) {
        let (id, ctx) = (self.handle.id, self.ctx.clone());
        let channels = self.admission.channels.clone();
        if !ctx
            .router
            .register(self.handle.clone(), remote_addr, channels)
            .await
        {
            return;
        }
        // Boxed: the presence write's state (2.3 KB) would otherwise be
        // part of every session's task for its whole life.
        let ending = match Box::pin(join_cluster(&ctx, &self.admission)).await {
            Ok(()) => {
                debug!("connected");
                self.open_and_serve(sink, stream, queue).await
            }
            Err(e) => {
                tracing::error!(error = %e, user = %self.admission.user, "cannot write presence; closing 1011");
                Ending::Close(1011, "inbox unavailable")
            }
        };
        ctx.router.unregister(id).await;
        leave_cluster(&ctx, &self.admission.user, &self.admission.channels).await;
        finish(sink, stream, ending).await;
        debug!("disconnected");
    }

    async fn open_and_serve(
        &mut self,
        sink: &mut Sink,
        stream: &mut Stream,
        queue: &mut OutboundReceiver,
    ) -> Ending {
        let control = self.handle.control.clone();
        // Boxed: the opening's state would otherwise enlarge every session's
        // task for its whole life.
        match unless_closed(&control, Box::pin(self.write_opening(sink))).await {
            Ok(frames) => {
                self.ctx.metrics.frames_sent.add(frames);
                self.serve(sink, stream, queue, &control).await
            }
            Err(ending) => ending,
        }
    }

    /// The session's life after the opening: what the router queued goes
    /// out, client frames are answered, pings keep the peer honest, until
    /// something ends it.
    async fn serve(
        &mut self,
        sink: &mut Sink,
        stream: &mut Stream,
        queue: &mut OutboundReceiver,
        control: &SessionControl,
    ) -> Ending {
        let mut heartbeat = Heartbeat::new(self.handle.id, self.ctx.settings.ping_interval);
        let expired = expiry(self.admission.expires_at);
        tokio::pin!(expired);
        // Allocated on the first write: an idle socket costs nothing here.
        let mut batch: Vec<Outbound> = Vec::new();
        let mut latencies: Vec<std::time::Instant> = Vec::new();
        loop {
            let step = tokio::select! {
                biased;
                ending = told_to_close(control) => Err(ending),
                _ = &mut expired => Err(Ending::Close(1008, "token expired")),
                n = queue.recv_many(&mut batch, WRITE_BATCH) => {
                    let stalled_after = heartbeat.stalled_after;
                    self.write_queued(n, sink, &mut batch, &mut latencies, control, stalled_after).await
                }
                incoming = stream.next() => {
                    heartbeat.last_seen = Instant::now();
                    self.on_incoming(incoming).await
                }
                _ = heartbeat.ticks.tick() => heartbeat.ping(sink, control).await,
            };
            if let Err(ending) = step {
                return ending;
            }
        }
    }

    /// Writes the `n` frames the router queued (0: every sender is gone).
    async fn write_queued(
        &mut self,
        n: usize,
        sink: &mut Sink,
        batch: &mut Vec<Outbound>,
        latencies: &mut Vec<std::time::Instant>,
        control: &SessionControl,
        stalled_after: Duration,
    ) -> Result<(), Ending> {
        if n == 0 {
            return Err(Ending::Close(1011, "internal error"));
        }
        let metrics = &self.ctx.metrics;
        let mut seqs = SeqCursor {
            last: &mut self.last_seq,
            repair: self
                .ctx
                .inbox
                .as_ref()
                .map(|inbox| (inbox, self.admission.user.as_str())),
            metrics,
        };
        let write = write_batch(sink, batch, latencies, &mut seqs);
        let frames = write_within!(control, stalled_after, write)?;
        metrics.frames_sent.add(frames);
        for at in latencies.drain(..) {
            metrics.delivery_seconds.observe(at.elapsed());
        }
        Ok(())
    }

    /// What the client sent: a text frame is answered, the rest may end
    /// the session with the contract's close code.
    async fn on_incoming(
        &mut self,
        incoming: Option<Result<Message, WsError>>,
    ) -> Result<(), Ending> {
        match incoming {
            Some(Ok(Message::Text(text))) => Box::pin(self.on_text(&text)).await,
            Some(Ok(Message::Binary(_))) => {
                Err(Ending::Close(1003, "binary frames are not accepted"))
            }
            Some(Ok(Message::Close(_))) => Err(Ending::ClientClosed),
            Some(Ok(_)) => Ok(()), // ping (answered by tungstenite), pong
            Some(Err(WsError::Capacity(_))) => Err(Ending::Close(1009, "message too big")),
            Some(Err(WsError::Utf8(_))) => Err(Ending::Close(1007, "invalid UTF-8")),
            Some(Err(WsError::Protocol(_))) => Err(Ending::Close(1002, "protocol error")),
            Some(Err(_)) | None => Err(Ending::Drop),
        }
    }

    /// Handles one client text frame (parse, then apply); an `Err` ends
    /// the session.
    async fn on_text(&mut self, text: &str) -> Result<(), Ending> {
        let reply = match frames::parse_client(text) {
            Ok(ClientFrame::Ping) => Some(frames::pong()),
            Ok(ClientFrame::Subscribe(channel)) => self.subscribe(channel).await,
            Ok(ClientFrame::Unsubscribe(channel)) => {
                self.unsubscribe(channel).await;
                None
            }
            Ok(ClientFrame::Inbox(change)) => self.change_inbox(change).await,
            Err(detail) => Some(frames::error("bad_request", &detail)),
        };
        let Some(reply) = reply else {
            return Ok(());
        };
        if self
            .handle
            .offer(Outbound::control(reply), &self.ctx.metrics)
        {
            Ok(())
        } else {
            Err(Ending::asked_by(&self.handle.control))
        }
    }

    /// Joins a channel if the grant allows it: the router answers
    /// `subscribed`, in order with the channel's messages; a refusal is the
    /// `error` frame returned.
    async fn subscribe(&mut self, channel: String) -> Option<Utf8Bytes> {
        let held = &self.admission.channels;
        let policy = self.ctx.policy();
        if let Err(refusal) = policy.check_join(&self.admission.grant, &channel, held) {
            if let Some(limit) = refusal.limit {
                if let Some(unlogged) = self.ctx.metrics.refused_to_log(limit) {
                    tracing::warn!(connection = %self.handle.id, limit = limit.label(), detail = %refusal.detail, refused_since_last_log = unlogged, "subscribe refused: limit reached");
                }
            }
            return Some(frames::error(refusal.code, &refusal.detail));
        }
        if !held.contains(&channel) {
            if let Some(cluster) = &self.ctx.cluster {
                cluster.link.join_channel(&channel).await;
            }
            self.admission.channels.push(channel.clone());
        }
        let confirmation = frames::subscribed(&channel);
        self.ctx
            .router
            .subscribe(self.handle.id, channel, confirmation)
            .await;
        None
    }

    /// Leaves a channel; the router answers `unsubscribed`.
    async fn unsubscribe(&mut self, channel: String) {
        let held = self.admission.channels.len();
        self.admission.channels.retain(|held| *held != channel);
        let left = held != self.admission.channels.len();
        let confirmation = frames::unsubscribed(&channel);
        self.ctx
            .router
            .unsubscribe(self.handle.id, channel.clone(), confirmation)
            .await;
        if let (true, Some(cluster)) = (left, &self.ctx.cluster) {
            cluster.link.leave_channel(&channel).await;
        }
    }

    /// Applies a read-state change; every tab of the user learns the new
    /// counts. An `error` frame when it could not be applied.
    async fn change_inbox(&self, change: Change) -> Option<Utf8Bytes> {
        let Some(inbox) = &self.ctx.inbox else {
            return Some(frames::error(
                "bad_request",
                "the inbox is not enabled on this server",
            ));
        };
        let user = &self.admission.user;
        match inbox.change(user.as_str(), change).await {
            Ok((true, counts)) => {
                let cluster = self.ctx.cluster.as_deref();
                crate::cluster::announce_counts(cluster, &self.ctx.router, user, counts).await;
                None
            }
            Ok((false, _)) => None,
            Err(e) => {
                tracing::error!(error = %e, "inbox change failed");
                Some(frames::error(
                    "unavailable",
                    "the inbox is unavailable; try again",
                ))
            }
        }
    }
}
