//! Gives memory back to the operating system after a crowd of connections
//! has gone.
//!
//! A socket's buffers are many small heap blocks. When thousands of
//! connections close at once (a deploy elsewhere, a network blip, a flood of
//! dead or slow clients closed by the bridge), glibc's allocator keeps the
//! freed pages: RSS stays at the peak although nothing uses them, and an
//! operator reading RSS sees what looks like a leak. `malloc_trim(0)` hands
//! the free pages back. It walks the heap while holding the allocator's
//! locks, so it runs only after a real drop in connections, never on a
//! timer alone, and on a blocking thread.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the connection count is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// This many connections closed since the last trim make the next one.
const MIN_CLOSED: u64 = 500;

/// Trims the heap once [`MIN_CLOSED`] or more connections closed since the
/// last trim and the connection count held still for a check interval (the
/// crowd has finished leaving), or once ten times as many closed whatever
/// the count does (busy churn).
pub async fn reclaim_after_disconnects(metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let closed = || {
        metrics
            .connections_total
            .get()
            .saturating_sub(metrics.connections.get().max(0) as u64)
    };
    let mut closed_at_last_trim = closed();
    let mut previous = metrics.connections.get();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = metrics.connections.get();
        let settled = now == previous;
        previous = now;
        let closed_now = closed();
        let closed_since = closed_now.saturating_sub(closed_at_last_trim);
        if (closed_since >= MIN_CLOSED && settled) || closed_since >= 10 * MIN_CLOSED {
            let _ = tokio::task::spawn_blocking(trim_heap).await;
            closed_at_last_trim = closed_now;
        }
    }
}
/// Returns free heap pages to the OS where the allocator supports it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim has no preconditions; it only releases memory
    // the allocator itself knows to be free.
    let released = unsafe { malloc_trim(0) };
    tracing::debug!(released = released != 0, "heap trimmed after disconnects");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}
