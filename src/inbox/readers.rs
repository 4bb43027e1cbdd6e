//! A small pool of store readers, used from `spawn_blocking`: reads run
//! beside the store thread instead of queueing behind (or in front of)
//! commits, and at most [`READERS`] run at once whatever the number of
//! reconnecting clients.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::store::{InboxReader, InboxStore};

/// Readers opened at start: enough to keep reads off the commit path on a
/// small machine without letting a reconnect storm take every core.
pub const READERS: usize = 4;

/// The pool.
pub struct Readers {
    idle: Mutex<Vec<Box<dyn InboxReader>>>,
    permits: Semaphore,
}

impl Readers {
    /// Opens [`READERS`] readers on `store`.
    pub fn open(store: &dyn InboxStore) -> anyhow::Result<Arc<Self>> {
        let idle = (0..READERS)
            .map(|_| store.reader())
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Arc::new(Self {
            permits: Semaphore::new(idle.len()),
            idle: Mutex::new(idle),
        }))
    }

    /// Runs `read` on an idle reader on a blocking thread, waiting for one
    /// when all are busy.
    pub async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&mut dyn InboxReader) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let _permit = self.permits.acquire().await?;
        let mut reader = self
            .idle
            .lock()
            .expect("the reader pool is never poisoned")
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no inbox reader is left"))?;
        let (reader, result) = tokio::task::spawn_blocking(move || {
            let result = read(reader.as_mut());
            (reader, result)
        })
        .await
        // A read that panicked loses its reader; the error says so.
        .map_err(|e| anyhow::anyhow!("an inbox read failed: {e}"))?;
        self.idle
            .lock()
            .expect("the reader pool is never poisoned")
            .push(reader);
        result
    }
}
