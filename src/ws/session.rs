//! One task per connection: it writes what the router queued (batched: feed
//! many, flush once), answers client frames, pings, and closes with the
//! right code when told to or when the client misbehaves.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::{
    tungstenite::{
        error::{CapacityError, Error as WsError},
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message, Utf8Bytes,
    },
    WebSocketStream,
};
use tracing::debug;

use crate::{
    inbox::{Entry, Inbox},
    metrics::Limit,
    outbound::{self, Outbound, OutboundReceiver, OutboundSender, PushError},
    router::{ConnectionId, SessionControl, SessionHandle},
    ws::{
        frames::{self, ClientFrame},
        handshake::Admission,
        limits::Permit,
        server::WsContext,
    },
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

/// Runs one admitted connection to its end.
pub async fn run(
    ws: WebSocketStream<ServerStream>,
    admission: Admission,
    permit: Permit,
    remote_addr: SocketAddr,
    ctx: Arc<WsContext>,
) {
    let id = ConnectionId(ctx.next_connection_id.fetch_add(1, Ordering::Relaxed) + 1);
    let (outbound, mut queue) =
        outbound::queue(ctx.settings.send_queue, ctx.settings.send_queue_bytes);
    let control = Arc::new(SessionControl::default());
    let handle = SessionHandle {
        id,
        user: admission.user.clone(),
        remote_addr,
        connected_at: SystemTime::now(),
        outbound: outbound.clone(),
        control: control.clone(),
    };
    if !ctx
        .router
        .register(handle, admission.channels.clone())
        .await
    {
        return;
    }
    if let Err(e) = join_cluster(&ctx, &admission).await {
        tracing::error!(error = %e, user = %admission.user, "cannot write presence; closing 1011");
        ctx.router.unregister(id).await;
        leave_cluster(&ctx, &admission.user, &admission.channels).await;
        let mut ws = ws;
        let _ = tokio::time::timeout(
            CLOSE_DEADLINE,
            ws.close(Some(CloseFrame {
                code: CloseCode::from(1011),
                reason: Utf8Bytes::from_static("inbox unavailable"),
            })),
        )
        .await;
        return;
    }
    debug!(connection = %id, user = %admission.user, %remote_addr, "connected");

    let (mut sink, mut stream) = ws.split();
    let mut session = Session {
        id,
        admission,
        outbound,
        last_seq: 0,
        ctx: ctx.clone(),
    };
    // Boxed: the opening's state would otherwise enlarge every session's
    // task for its whole life.
    let opened = tokio::select! {
        biased;
        _ = control.closed() => Err(control.reason().map_or(Ending::Drop, |(c, r)| Ending::Close(c, r))),
        opened = Box::pin(session.write_opening(&mut sink)) => opened,
    };
    let ending = match opened {
        Ok(frames) => {
            ctx.metrics.frames_sent.add(frames);
            session
                .serve(&mut sink, &mut stream, &mut queue, &control)
                .await
        }
        Err(ending) => ending,
    };

    ctx.router.unregister(id).await;
    leave_cluster(&ctx, &session.admission.user, &session.admission.channels).await;
    match ending {
        Ending::Close(code, reason) => {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: Utf8Bytes::from_static(reason),
            };
            // Write the close frame, then give the client the same deadline
            // to answer it, so the close is not lost to a TCP reset.
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
    drop(permit);
    debug!(connection = %id, "disconnected");
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

struct Session {
    id: ConnectionId,
    admission: Admission,
    /// The session's own handle on its queue, for pongs and error frames.
    outbound: OutboundSender,
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
                self.fill(sink, inbox, user, seq - 1).await?;
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
            self.ctx.router.names().name(self.id),
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

    async fn serve(
        &mut self,
        sink: &mut Sink,
        stream: &mut Stream,
        queue: &mut OutboundReceiver,
        control: &SessionControl,
    ) -> Ending {
        let ping_interval = self.ctx.settings.ping_interval;
        // The first ping at a per-connection offset within one interval, so
        // sockets that connected together (all clients of a restarted
        // instance) do not ping in one burst (measured: p99 2.26 → 1.98 ms at
        // 5,000 msg/s over 10,000 sockets).
        let spread =
            self.id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) % ping_interval.as_nanos().max(1) as u64;
        let first_ping = Instant::now() + Duration::from_nanos(spread).max(ping_interval / 4);
        let mut ping = tokio::time::interval_at(first_ping, ping_interval);
        let mut last_seen = Instant::now();
        // A write (frames or a ping) the peer has not taken within two ping
        // intervals means it stopped reading: it is dropped like a peer that
        // stopped answering pings.
        let stalled_after = ping_interval * 2;
        // An `exp` further away than an `Instant` reaches never comes.
        let expiry = self.admission.expires_at.and_then(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            Instant::now().checked_add(left)
        });
        let expired = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        // Allocated on the first write: an idle socket costs nothing here.
        let mut batch: Vec<Outbound> = Vec::new();
        let mut latencies: Vec<std::time::Instant> = Vec::new();

        loop {
            tokio::select! {
                biased;
                _ = control.closed() => {
                    return control.reason().map_or(Ending::Drop, |(c, r)| Ending::Close(c, r));
                }
                _ = &mut expired => return Ending::Close(1008, "token expired"),
                n = queue.recv_many(&mut batch, WRITE_BATCH) => {
                    if n == 0 {
                        return Ending::Close(1011, "internal error");
                    }
                    let mut seqs = SeqCursor {
                        last: &mut self.last_seq,
                        repair: self.ctx.inbox.as_ref().map(|inbox| (inbox, self.admission.user.as_str())),
                        metrics: &self.ctx.metrics,
                    };
                    // A peer that stops reading blocks the write; the router
                    // then finds the queue full and asks us to close, which
                    // must win over the blocked write.
                    tokio::select! {
                        biased;
                        _ = control.closed() => {
                            return control.reason().map_or(Ending::Drop, |(c, r)| Ending::Close(c, r));
                        }
                        written = write_batch(sink, &mut batch, &mut latencies, &mut seqs) => match written {
                            Ok(frames) => {
                                let metrics = &self.ctx.metrics;
                                metrics.frames_sent.add(frames);
                                for at in latencies.drain(..) {
                                    metrics.delivery_seconds.observe(at.elapsed());
                                }
                            }
                            Err(_) => return Ending::Drop,
                        },
                        // With fewer frames pending than `send_queue`, nobody
                        // else ends a write the peer never takes: while it
                        // blocks, no ping is sent and no answer is read.
                        _ = tokio::time::sleep(stalled_after) => {
                            debug!(connection = %self.id, "peer stopped reading; dropping");
                            return Ending::Drop;
                        }
                    }
                }
                incoming = stream.next() => {
                    last_seen = Instant::now();
                    match incoming {
                        Some(Ok(Message::Text(text))) => {
                            if let Some(ending) = Box::pin(self.on_text(&text)).await {
                                return ending;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            return Ending::Close(1003, "binary frames are not accepted");
                        }
                        Some(Ok(Message::Close(_))) => return Ending::ClientClosed,
                        Some(Ok(_)) => {} // ping (answered by tungstenite), pong
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                            return Ending::Close(1009, "message too big");
                        }
                        Some(Err(WsError::Capacity(_))) => return Ending::Close(1009, "message too big"),
                        Some(Err(WsError::Utf8(_))) => return Ending::Close(1007, "invalid UTF-8"),
                        Some(Err(WsError::Protocol(_))) => return Ending::Close(1002, "protocol error"),
                        Some(Err(_)) | None => return Ending::Drop,
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > ping_interval * 2 {
                        debug!(connection = %self.id, "no answer to pings; dropping");
                        return Ending::Drop;
                    }
                    tokio::select! {
                        biased;
                        _ = control.closed() => {
                            return control.reason().map_or(Ending::Drop, |(c, r)| Ending::Close(c, r));
                        }
                        sent = sink.send(Message::Ping(Default::default())) => {
                            if sent.is_err() {
                                return Ending::Drop;
                            }
                        }
                        _ = tokio::time::sleep(stalled_after) => {
                            debug!(connection = %self.id, "peer stopped reading; dropping");
                            return Ending::Drop;
                        }
                    }
                }
            }
        }
    }

    /// Handles one client text frame; `Some` ends the session.
    async fn on_text(&mut self, text: &str) -> Option<Ending> {
        let reply = match frames::parse_client(text) {
            Ok(ClientFrame::Ping) => frames::pong(),
            Ok(ClientFrame::Subscribe(channel)) => {
                let held = &self.admission.channels;
                match self
                    .ctx
                    .policy()
                    .check_join(&self.admission.grant, &channel, held)
                {
                    Ok(()) => {
                        if !held.contains(&channel) {
                            if let Some(cluster) = &self.ctx.cluster {
                                cluster.link.join_channel(&channel).await;
                            }
                            self.admission.channels.push(channel.clone());
                        }
                        // The router answers `subscribed`, in order with the
                        // channel's messages.
                        self.ctx.router.subscribe(self.id, channel).await;
                        return None;
                    }
                    Err(refusal) => {
                        if let Some(limit) = refusal.limit {
                            if let Some(unlogged) = self.ctx.metrics.refused_to_log(limit) {
                                tracing::warn!(connection = %self.id, limit = limit.label(), detail = %refusal.detail, refused_since_last_log = unlogged, "subscribe refused: limit reached");
                            }
                        }
                        frames::error(refusal.code, &refusal.detail)
                    }
                }
            }
            Ok(ClientFrame::Unsubscribe(channel)) => {
                let held = self.admission.channels.len();
                self.admission.channels.retain(|held| *held != channel);
                let left = held != self.admission.channels.len();
                self.ctx.router.unsubscribe(self.id, channel.clone()).await;
                if let (true, Some(cluster)) = (left, &self.ctx.cluster) {
                    cluster.link.leave_channel(&channel).await;
                }
                return None;
            }
            Ok(ClientFrame::Inbox(change)) => match &self.ctx.inbox {
                None => frames::error("bad_request", "the inbox is not enabled on this server"),
                Some(inbox) => {
                    let user = &self.admission.user;
                    match inbox.change(user.as_str(), change).await {
                        Ok((true, counts)) => {
                            // Every tab of the user learns the new counts.
                            crate::cluster::announce_counts(
                                self.ctx.cluster.as_deref(),
                                &self.ctx.router,
                                user,
                                counts,
                            )
                            .await;
                            return None;
                        }
                        Ok((false, _)) => return None,
                        Err(e) => {
                            tracing::error!(error = %e, "inbox change failed");
                            frames::error("unavailable", "the inbox is unavailable; try again")
                        }
                    }
                }
            },
            Err(detail) => frames::error("bad_request", &detail),
        };
        match self.outbound.try_push(Outbound::control(reply)) {
            Ok(()) => None,
            Err(PushError::Closed) => Some(Ending::Drop),
            Err(full) => {
                if full == PushError::BytesFull {
                    self.ctx.metrics.refused(Limit::SendQueueBytes);
                }
                self.ctx.metrics.slow_client_closes.inc();
                Some(Ending::Close(1013, "client reads too slowly"))
            }
        }
    }
}
