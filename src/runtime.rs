//! The tokio runtime the daemon runs on: a worker thread per core it may
//! use, or as many as `TOKIO_WORKER_THREADS` says, as for any tokio
//! program, but a value that is not a positive number is refused with exit
//! code 2 and the variable named, where tokio would panic.
//!
//! Fewer workers cost less CPU per notification on a box the broker shares:
//! lapin parses frames on a thread of its own (`lapin-io-loop`) and tokio
//! wakes a second worker to search whenever a woken one finds work. On two
//! cores, one worker cost 6–20 % less than two, but with the bench and the
//! broker on the same cores its p99 was worse in some runs (one preempted
//! thread holds every session), so the default stays a worker per core
//! (docs/performance.md, "Worker threads").

use std::io;

/// The environment variable tokio itself reads for the worker count.
pub const WORKER_THREADS_VAR: &str = "TOKIO_WORKER_THREADS";

/// How many workers to start on `cores` usable cores, or what
/// `TOKIO_WORKER_THREADS` says (`configured`); an error names a value that
/// is not a positive number.
pub fn worker_threads(cores: usize, configured: Option<&str>) -> Result<usize, String> {
    match configured {
        None => Ok(cores.max(1)),
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{WORKER_THREADS_VAR}={text:?} is not a positive number of worker threads"
            )),
        },
    }
}

/// The daemon's multi-threaded runtime with `workers` worker threads.
pub fn build(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn a_worker_per_core_but_at_least_one() {
        assert_eq!(worker_threads(2, None), Ok(2));
        assert_eq!(worker_threads(0, None), Ok(1));
        assert_eq!(worker_threads(16, None), Ok(16));
    }

    #[test]
    fn tokio_worker_threads_sets_the_count_and_nonsense_is_refused() {
        assert_eq!(worker_threads(2, Some("2")), Ok(2));
        assert_eq!(worker_threads(2, Some(" 4 ")), Ok(4));
        for bad in ["0", "-1", "two", ""] {
            let error = worker_threads(2, Some(bad)).unwrap_err();
            assert!(error.contains("TOKIO_WORKER_THREADS"), "{error}");
        }
    }
}
