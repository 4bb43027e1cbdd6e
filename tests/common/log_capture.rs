//! What the bridge logs while a test runs in this thread: a `fmt`
//! subscriber (plain text, as an operator's terminal shows it) set as the
//! thread's default, for tests whose bridge runs on the test's own
//! current-thread runtime.

use std::sync::{Arc, Mutex};

use tracing::subscriber::DefaultGuard;

/// The captured text; keep the guard alive while the bridge runs.
#[derive(Clone, Default)]
pub struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Starts capturing on this thread until the guard is dropped.
    pub fn start() -> (Self, DefaultGuard) {
        let log = Self::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // Call sites reached before, while nobody listened, listen again.
        tracing::callsite::rebuild_interest_cache();
        (log, guard)
    }

    /// The first line containing `needle`, if one was logged.
    pub fn line_with(&self, needle: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().find(|l| l.contains(needle)).map(String::from)
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
