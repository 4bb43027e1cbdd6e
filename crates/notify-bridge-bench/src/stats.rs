//! Measurements shared by every client task: a latency histogram, a
//! received-once bitset (loss and duplicates), and the progress line on
//! stderr.

use std::{
    io::{IsTerminal, Write},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// A latency histogram in nanoseconds that many tasks record into at once
/// (HdrHistogram, 3 significant digits, behind a mutex: a record is a few
/// nanoseconds of the lock next to a frame's microseconds).
pub struct Histogram(Mutex<hdrhistogram::Histogram<u64>>);

impl Default for Histogram {
    fn default() -> Self {
        let h = hdrhistogram::Histogram::new(3).expect("3 significant digits are valid");
        Self(Mutex::new(h))
    }
}

/// What a histogram says, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean: f64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Histogram {
    fn lock(&self) -> std::sync::MutexGuard<'_, hdrhistogram::Histogram<u64>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records one latency; never fails (values past the range saturate).
    pub fn record(&self, nanos: u64) {
        let mut h = self.lock();
        // Grows to fit (auto-resize); only a value past u64::MAX / 2 fails.
        if h.record(nanos).is_err() {
            h.saturating_record(nanos);
        }
    }

    /// The percentiles the report prints (zeros when nothing was recorded).
    pub fn summary(&self) -> Summary {
        let h = self.lock();
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            mean: h.mean(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    /// The cumulative distribution as (latency ns, fraction ≤ it) points,
    /// one per recorded value bucket, for the plot.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let h = self.lock();
        let total = h.len() as f64;
        let mut seen = 0;
        h.iter_recorded()
            .map(|v| {
                seen += v.count_since_last_iteration();
                (v.value_iterated_to() as f64, seen as f64 / total)
            })
            .collect()
    }
}

/// One bit per sequence number: who arrived, who arrived twice.
pub struct SeqSet {
    bits: Box<[AtomicU64]>,
    len: u64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    out_of_range: AtomicU64,
}

impl SeqSet {
    /// A set for sequence numbers `0..len`; others count as strays.
    pub fn new(len: u64) -> Self {
        Self {
            bits: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_range: AtomicU64::new(0),
        }
    }

    /// Marks `seq` as received; false when it had been already.
    pub fn mark(&self, seq: u64) -> bool {
        if seq >= self.len {
            self.out_of_range.fetch_add(1, Relaxed);
            return false;
        }
        let bit = 1u64 << (seq % 64);
        let before = self.bits[(seq / 64) as usize].fetch_or(bit, Relaxed);
        if before & bit != 0 {
            self.duplicates.fetch_add(1, Relaxed);
            false
        } else {
            self.unique.fetch_add(1, Relaxed);
            true
        }
    }

    /// Sequence numbers seen at least once: the delivered count.
    pub fn unique(&self) -> u64 {
        self.unique.load(Relaxed)
    }

    /// Second and later sightings of a sequence number (should be 0).
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Relaxed)
    }

    /// Frames whose sequence number was not part of the run (should be 0).
    pub fn strays(&self) -> u64 {
        self.out_of_range.load(Relaxed)
    }
}

/// The latest instant something happened, as nanoseconds since the epoch.
#[derive(Default)]
pub struct LastSeen(AtomicU64);

impl LastSeen {
    /// Moves the instant forward (never back), from any task.
    pub fn update(&self, nanos: u64) {
        self.0.fetch_max(nanos, Relaxed);
    }
    /// The latest instant recorded (0: none).
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The clock every payload timestamp is read from: nanoseconds since the
/// bench started (publisher and clients live in this one process, so a
/// monotonic `Instant` is shared by both ends).
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    /// Starts the clock: every timestamp of the run counts from here.
    pub fn new() -> Self {
        Self(Instant::now())
    }
    /// Nanoseconds since the clock started.
    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Counters the progress line shows; scenarios update them.
#[derive(Default)]
pub struct Progress {
    pub phase: Mutex<String>,
    pub connected: AtomicU64,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub target: AtomicU64,
}

impl Progress {
    /// Names what the run is doing, for the progress line.
    pub fn phase(&self, phase: &str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.to_string();
        }
    }

    fn line(&self, started: Instant) -> String {
        let phase = self.phase.lock().map(|p| p.clone()).unwrap_or_default();
        let target = self.target.load(Relaxed);
        let received = self.received.load(Relaxed);
        let bar = match (received.min(target) * 20).checked_div(target) {
            Some(done) => {
                let done = done as usize;
                format!("[{}{}] ", "#".repeat(done), ".".repeat(20 - done))
            }
            None => String::new(),
        };
        format!(
            "{bar}{phase:<22} {:>6.1}s  sockets {:>6}  published {:>9}  received {:>10}",
            started.elapsed().as_secs_f64(),
            self.connected.load(Relaxed),
            self.published.load(Relaxed),
            received,
        )
    }

    /// Draws the progress line on stderr until the returned guard is
    /// dropped: carriage-return updates on a terminal, a plain line every
    /// 5 s otherwise (CI logs).
    pub fn spawn_printer(self: &Arc<Self>) -> ProgressGuard {
        let progress = self.clone();
        let tty = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let every = if tty {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let line = progress.line(started);
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r{line}\x1b[K")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
        });
        ProgressGuard { task, tty }
    }
}

/// Stops the progress line (and clears it on a terminal) when dropped.
pub struct ProgressGuard {
    task: tokio::task::JoinHandle<()>,
    tty: bool,
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.task.abort();
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

/// A small deterministic PRNG (xorshift64*), so runs pick the same users.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is taken as 1: xorshift needs a non-zero
    /// state).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    /// The next value of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_seqs() {
        let h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50 as f64 - 500_000.0).abs() < 20_000.0, "{s:?}");
        assert!((s.p99 as f64 - 990_000.0).abs() < 40_000.0, "{s:?}");
        // HdrHistogram's 3 significant digits: within 0.1 % of the value.
        assert!(s.max.abs_diff(1_000_000) <= 1_000, "{s:?}");
        assert!(s.min.abs_diff(1_000) <= 1, "{s:?}");
        let cdf = h.cdf();
        assert_eq!(cdf.last().map(|p| p.1), Some(1.0));
        assert!(cdf.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        let set = SeqSet::new(100);
        assert!(set.mark(3));
        assert!(!set.mark(3));
        assert!(!set.mark(100));
        assert_eq!((set.unique(), set.duplicates(), set.strays()), (1, 1, 1));
    }
}
