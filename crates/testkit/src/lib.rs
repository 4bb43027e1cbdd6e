//! Shared by the daemon's integration tests (tests/common) and the bench
//! (crates/notify-bridge-bench): what they read of a running process, so the
//! /proc formats are parsed in one place, by procfs, and one HTTP client.

pub mod http;
pub mod proc;

/// A log line without its ANSI color codes: the bridge colors its log on a
/// terminal, and the tests and the bench read that log back for fields.
pub fn strip_ansi(line: &str) -> String {
    strip_ansi_escapes::strip_str(line)
}
