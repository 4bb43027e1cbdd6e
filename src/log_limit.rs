//! A WARN that a flood cannot turn into a flood of log lines: the first
//! event is logged, then at most one line per interval, carrying how many
//! events went unlogged in between. Every event is still counted in the
//! metrics by the caller; this only bounds the log.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// How often one kind of refusal may be logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The state of one rate-limited log line, shared by the tasks that report
/// the same kind of event.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Default for LogLimit {
    /// One line per [`LOG_INTERVAL`].
    fn default() -> Self {
        Self::new(LOG_INTERVAL)
    }
}

impl LogLimit {
    /// One line per `interval` at most.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State::default()),
        }
    }

    /// Records one event. `Some(n)` means log it now, mentioning the `n`
    /// events since the last line that were not logged; `None` means stay
    /// quiet.
    pub fn event(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = state
            .last_logged
            .is_none_or(|at| at.elapsed() >= self.interval);
        if due {
            state.last_logged = Some(Instant::now());
            Some(std::mem::take(&mut state.unlogged))
        } else {
            state.unlogged += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_one_per_interval_with_the_unlogged_count() {
        let limit = LogLimit::new(Duration::from_millis(200));
        assert_eq!(limit.event(), Some(0));
        assert_eq!(limit.event(), None);
        assert_eq!(limit.event(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limit.event(), Some(2));
        assert_eq!(limit.event(), None);
    }
}
