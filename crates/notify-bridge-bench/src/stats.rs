//! Measurements shared by every client task without locks: a log-linear
//! latency histogram, a received-once bitset (loss and duplicates), and the
//! progress line on stderr.

use std::{
    io::{IsTerminal, Write},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Sub-buckets per power of two: 32, so a bucket is at most ~3 % wide.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (SUB as usize) * (64 - SUB_BITS as usize + 1);

/// A latency histogram in nanoseconds that many tasks record into at once.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    total: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
    min: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let mantissa = (v >> (e - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(e - SUB_BITS) * SUB + mantissa) as usize
}

/// The lowest value of bucket `i` and its width.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, 1);
    }
    let e = (i - SUB) / SUB + u64::from(SUB_BITS);
    let mantissa = (i - SUB) % SUB;
    let width = 1u64 << (e - u64::from(SUB_BITS));
    ((SUB + mantissa) * width, width)
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
    pub fn record(&self, nanos: u64) {
        self.counts[index(nanos)].fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        self.sum.fetch_add(nanos, Relaxed);
        self.max.fetch_max(nanos, Relaxed);
        self.min.fetch_min(nanos, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// The value at quantile `q` (0..=1): the middle of its bucket, clamped
    /// to the exact min and max.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Relaxed);
            if seen >= rank {
                let (low, width) = bounds(i);
                let mid = low + width / 2;
                return mid.clamp(self.min.load(Relaxed), self.max.load(Relaxed));
            }
        }
        self.max.load(Relaxed)
    }

    pub fn summary(&self) -> Summary {
        let count = self.count();
        if count == 0 {
            return Summary::default();
        }
        Summary {
            count,
            mean: self.sum.load(Relaxed) as f64 / count as f64,
            min: self.min.load(Relaxed),
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            max: self.max.load(Relaxed),
        }
    }

    /// The cumulative distribution as (latency ns, fraction ≤ it) points,
    /// one per non-empty bucket, for the plot.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let total = self.count();
        let mut out = Vec::new();
        if total == 0 {
            return out;
        }
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            let c = c.load(Relaxed);
            if c == 0 {
                continue;
            }
            seen += c;
            let (low, width) = bounds(i);
            let top = (low + width).min(self.max.load(Relaxed).max(1));
            out.push((top as f64, seen as f64 / total as f64));
        }
        out
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

    pub fn unique(&self) -> u64 {
        self.unique.load(Relaxed)
    }

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
    pub fn update(&self, nanos: u64) {
        self.0.fetch_max(nanos, Relaxed);
    }
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
    pub fn new() -> Self {
        Self(Instant::now())
    }
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
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
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
    fn buckets_cover_values_within_three_percent() {
        for v in [
            0u64,
            1,
            31,
            32,
            33,
            100,
            1_000,
            123_456,
            9_999_999,
            u64::MAX / 3,
        ] {
            let (low, width) = bounds(index(v));
            assert!(
                low <= v && v < low.saturating_add(width),
                "{v}: {low}+{width}"
            );
            assert!(width as f64 <= (v as f64 / 32.0).max(1.0) * 1.01, "{v}");
        }
    }

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
        assert_eq!(s.max, 1_000_000);
        let set = SeqSet::new(100);
        assert!(set.mark(3));
        assert!(!set.mark(3));
        assert!(!set.mark(100));
        assert_eq!((set.unique(), set.duplicates(), set.strays()), (1, 1, 1));
    }
}
