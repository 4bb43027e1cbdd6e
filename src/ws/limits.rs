//! Connection limits, global and per user, checked during the handshake so
//! that a refused client gets a 503 instead of a socket that closes at once;
//! and a cap on handshakes in progress, so that sockets which connect and
//! never finish their request (slowloris, floods) cannot hold unbounded
//! tasks and buffers while they wait for `websocket.handshake_timeout`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use crate::message::UserId;

/// The fewest handshakes allowed in progress at once, however small
/// `websocket.max_connections` is: one slow client must not turn others
/// away.
pub const MIN_PENDING_HANDSHAKES: usize = 64;

/// The most handshakes allowed in progress at once, however large
/// `websocket.max_connections` is. Each holds a task and a request buffer
/// (2 KiB, at most 16 KiB) for at most `websocket.handshake_timeout`; a
/// legitimate handshake takes milliseconds, so 4,096 at once is a burst of
/// reconnects far beyond what one instance sees, and bounds the worst case
/// to 64 MiB of buffers.
pub const MAX_PENDING_HANDSHAKES: usize = 4096;

/// Counts open connections; the lock is taken once per connect and
/// disconnect, never on the message path.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_user: usize,
    counts: Mutex<Counts>,
    /// Handshakes in progress (accepted sockets without an answer yet).
    pending: AtomicUsize,
    max_pending: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_user: HashMap<UserId, usize>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    user: UserId,
}

/// One handshake in progress; dropping it frees its place.
#[derive(Debug)]
pub struct PendingHandshake {
    limits: Arc<ConnectionLimits>,
}

impl ConnectionLimits {
    /// Limits of `max_total` open connections, `max_per_user` per user, and
    /// `max_total` handshakes in progress, clamped to
    /// [`MIN_PENDING_HANDSHAKES`]..=[`MAX_PENDING_HANDSHAKES`].
    pub fn new(max_total: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_user,
            counts: Mutex::new(Counts::default()),
            pending: AtomicUsize::new(0),
            max_pending: max_total.clamp(MIN_PENDING_HANDSHAKES, MAX_PENDING_HANDSHAKES),
        })
    }

    /// How many handshakes may be in progress at once.
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// A place for one more handshake in progress, or `None` when as many
    /// as allowed are already waiting for their request: the accept loop
    /// then answers 503 at once instead of spawning a task.
    pub fn begin_handshake(self: &Arc<Self>) -> Option<PendingHandshake> {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_pending).then_some(n + 1)
            })
            .ok()
            .map(|_| PendingHandshake {
                limits: self.clone(),
            })
    }

    /// A place for one more connection of `user`, or why there is none.
    pub fn acquire(self: &Arc<Self>, user: &UserId) -> Result<Permit, &'static str> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.max_total {
            return Err("connection limit reached (websocket.max_connections)");
        }
        let mine = counts.per_user.get(user).copied().unwrap_or(0);
        if mine >= self.max_per_user {
            return Err(
                "connection limit for this user reached (websocket.max_connections_per_user)",
            );
        }
        counts.total += 1;
        counts.per_user.insert(user.clone(), mine + 1);
        Ok(Permit {
            limits: self.clone(),
            user: user.clone(),
        })
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.limits.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if let Some(n) = counts.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.per_user.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_enforced_and_released() {
        let limits = ConnectionLimits::new(3, 2);
        let u1 = UserId::new("1").unwrap();
        let u2 = UserId::new("2").unwrap();
        let a = limits.acquire(&u1).unwrap();
        let _b = limits.acquire(&u1).unwrap();
        assert!(limits.acquire(&u1).unwrap_err().contains("this user"));
        let _c = limits.acquire(&u2).unwrap();
        assert!(limits.acquire(&u2).unwrap_err().contains("max_connections"));
        drop(a);
        assert!(limits.acquire(&u1).is_ok());
    }

    #[test]
    fn pending_handshakes_are_capped_and_released() {
        assert_eq!(
            ConnectionLimits::new(1, 1).max_pending(),
            MIN_PENDING_HANDSHAKES
        );
        assert_eq!(
            ConnectionLimits::new(1_000_000, 1).max_pending(),
            MAX_PENDING_HANDSHAKES
        );
        let limits = ConnectionLimits::new(200, 1);
        let held: Vec<_> = (0..200)
            .map(|_| limits.begin_handshake().unwrap())
            .collect();
        assert!(limits.begin_handshake().is_none());
        drop(held);
        assert!(limits.begin_handshake().is_some());
    }
}
