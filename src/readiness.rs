//! Whether this instance is consuming from the broker, and if not, why:
//! `/readyz` reads it, the AMQP consumer writes it.

use std::sync::Mutex;

/// Shared readiness state; the reason is what `/readyz` answers with 503.
#[derive(Debug)]
pub struct Readiness {
    state: Mutex<Result<(), String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            state: Mutex::new(Err("not connected to the broker yet".into())),
        }
    }
}

impl Readiness {
    pub fn set_ready(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Ok(());
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Err(reason.into());
    }

    /// `Ok` while consuming, else the reason.
    pub fn get(&self) -> Result<(), String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
