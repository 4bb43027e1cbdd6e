//! A session's outbound queue: the frames the router (and the session
//! itself) queued for one connection and its writer has not taken yet.
//!
//! It is bounded twice, in frames (`websocket.send_queue`) and in bytes of
//! frame text (`websocket.send_queue_bytes`): 1,024 frames of 1 MiB would
//! otherwise let one slow reader pin a GiB. Either bound full means the
//! connection reads too slowly and is closed with 1013; pushing never waits,
//! so a slow client never slows the router.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Instant,
};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One frame waiting in a session's outbound queue.
#[derive(Debug)]
pub struct Outbound {
    /// A text frame (wrapped in `Message::Text` only when written, which
    /// keeps a queue slot small).
    pub text: Utf8Bytes,
    /// When the broker delivered the message this frame carries, for the
    /// delivery-latency histogram; `None` for control frames.
    pub received_at: Option<Instant>,
    /// The inbox position of a stored notification, so a session can drop
    /// a live frame that its replay already sent.
    pub seq: Option<u64>,
}

impl Outbound {
    /// A frame that carries no notification (welcome, pong, counts, …).
    pub fn control(text: Utf8Bytes) -> Self {
        Self {
            text,
            received_at: None,
            seq: None,
        }
    }
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// `websocket.send_queue` frames are waiting already.
    FramesFull,
    /// The frame would take the queue past `websocket.send_queue_bytes`.
    BytesFull,
    /// The session has ended.
    Closed,
}

/// Makes a queue bounded by `frames` and `bytes`.
pub fn queue(frames: usize, bytes: usize) -> (OutboundSender, OutboundReceiver) {
    let (tx, rx) = mpsc::channel(frames.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    (
        OutboundSender {
            tx,
            queued: queued.clone(),
            max_bytes: bytes,
        },
        OutboundReceiver { rx, queued },
    )
}

/// The pushing side, held by the router and by the session (for its own
/// replies); cheap to clone.
#[derive(Debug, Clone)]
pub struct OutboundSender {
    tx: mpsc::Sender<Outbound>,
    /// Bytes of frame text queued and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl OutboundSender {
    /// Queues `out` unless a bound is reached. A frame larger than the
    /// byte bound on its own still goes into an empty queue, so a small
    /// `send_queue_bytes` cannot make one message undeliverable.
    pub fn try_push(&self, out: Outbound) -> Result<(), PushError> {
        let len = out.text.len();
        let before = self.queued.fetch_add(len, Relaxed);
        if before > 0 && before + len > self.max_bytes {
            self.queued.fetch_sub(len, Relaxed);
            return Err(PushError::BytesFull);
        }
        self.tx.try_send(out).map_err(|e| {
            self.queued.fetch_sub(len, Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => PushError::FramesFull,
                mpsc::error::TrySendError::Closed(_) => PushError::Closed,
            }
        })
    }
}

/// The writer's side, owned by the session.
#[derive(Debug)]
pub struct OutboundReceiver {
    rx: mpsc::Receiver<Outbound>,
    queued: Arc<AtomicUsize>,
}

impl OutboundReceiver {
    /// Moves up to `limit` frames into `batch` (waiting for the first);
    /// they stop counting against the byte bound. 0 once every sender is gone.
    pub async fn recv_many(&mut self, batch: &mut Vec<Outbound>, limit: usize) -> usize {
        let start = batch.len();
        let n = self.rx.recv_many(batch, limit).await;
        let taken: usize = batch[start..].iter().map(|out| out.text.len()).sum();
        self.queued.fetch_sub(taken, Relaxed);
        n
    }

    /// Takes one frame if one is waiting (tests and tools).
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let out = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(out.text.len(), Relaxed);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Outbound {
        Outbound::control(Utf8Bytes::from("x".repeat(len)))
    }

    #[tokio::test]
    async fn bounded_by_frames_and_by_bytes() {
        let (tx, mut rx) = queue(3, 100);
        assert_eq!(tx.try_push(frame(60)), Ok(()));
        assert_eq!(tx.try_push(frame(50)), Err(PushError::BytesFull));
        assert_eq!(tx.try_push(frame(40)), Ok(()));
        assert_eq!(tx.try_push(frame(0)), Ok(()));
        assert_eq!(tx.try_push(frame(0)), Err(PushError::FramesFull));
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 64).await, 3);
        // Taken by the writer: the bytes are free again.
        assert_eq!(tx.try_push(frame(100)), Ok(()));
        let (tx, rx) = queue(3, 100);
        drop(rx);
        assert_eq!(tx.try_push(frame(1)), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn one_oversized_frame_still_enters_an_empty_queue() {
        let (tx, mut rx) = queue(8, 10);
        assert_eq!(tx.try_push(frame(50)), Ok(()));
        assert_eq!(tx.try_push(frame(1)), Err(PushError::BytesFull));
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, 64).await;
        assert_eq!(batch[0].text.len(), 50);
        assert_eq!(tx.try_push(frame(1)), Ok(()));
    }
}
