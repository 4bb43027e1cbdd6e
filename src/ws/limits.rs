//! Connection limits, global and per user, checked during the handshake so
//! that a refused client gets a 503 instead of a socket that closes at once.

use std::{collections::HashMap, sync::Arc, sync::Mutex};

use crate::message::UserId;

/// Counts open connections; the lock is taken once per connect and
/// disconnect, never on the message path.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_user: usize,
    counts: Mutex<Counts>,
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

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_user,
            counts: Mutex::new(Counts::default()),
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
}
