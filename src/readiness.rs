//! Whether this instance is consuming from the broker, and if not, why:
//! `/readyz` reads it; the AMQP consumer and the inbox stage write it.
//!
//! Two things must hold for the instance to take traffic: the broker
//! connection consumes, and (with the inbox) the store commits. Each has its
//! own slot, so the consumer reconnecting cannot hide a store that still
//! fails, and a store that recovers cannot hide a broker that is gone.

use std::sync::Mutex;

/// Shared readiness state; the reason is what `/readyz` answers with 503.
#[derive(Debug)]
pub struct Readiness {
    broker: Mutex<Result<(), String>>,
    store: Mutex<Result<(), String>>,
    /// Cluster mode: this instance's live queue is consumed.
    live: Mutex<Result<(), String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            broker: Mutex::new(Err("not connected to the broker yet".into())),
            store: Mutex::new(Ok(())),
            live: Mutex::new(Ok(())),
        }
    }
}

fn set(slot: &Mutex<Result<(), String>>, value: Result<(), String>) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = value;
}

impl Readiness {
    /// The consumer is consuming.
    pub fn set_ready(&self) {
        set(&self.broker, Ok(()));
    }

    /// The consumer is not consuming, for `reason`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        set(&self.broker, Err(reason.into()));
    }

    /// The inbox store commits again.
    pub fn set_store_ok(&self) {
        set(&self.store, Ok(()));
    }

    /// The inbox store fails, so consumption is paused.
    pub fn set_store_failing(&self, reason: impl Into<String>) {
        set(&self.store, Err(reason.into()));
    }

    /// Cluster mode: the live queue is consumed again.
    pub fn set_live_ok(&self) {
        set(&self.live, Ok(()));
    }

    /// Cluster mode: this instance receives no live messages, for `reason`.
    pub fn set_live_failing(&self, reason: impl Into<String>) {
        set(&self.live, Err(reason.into()));
    }

    /// `Ok` while consuming with a working store (and, in cluster mode, a
    /// consumed live queue), else the first reason.
    pub fn get(&self) -> Result<(), String> {
        let read = |slot: &Mutex<Result<(), String>>| {
            slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        read(&self.broker)
            .and_then(|()| read(&self.store))
            .and_then(|()| read(&self.live))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnected_broker_does_not_hide_a_failing_store() {
        let r = Readiness::default();
        r.set_ready();
        assert_eq!(r.get(), Ok(()));
        r.set_store_failing("inbox store failing: disk full");
        r.set_not_ready("broker connection lost");
        r.set_ready(); // the consumer reconnects
        assert_eq!(r.get(), Err("inbox store failing: disk full".into()));
        r.set_store_ok();
        assert_eq!(r.get(), Ok(()));
    }

    #[test]
    fn a_recovered_store_does_not_hide_a_lost_broker() {
        let r = Readiness::default();
        r.set_store_failing("inbox store failing: disk full");
        r.set_not_ready("broker connection lost");
        r.set_store_ok();
        assert_eq!(r.get(), Err("broker connection lost".into()));
    }
}
