//! Shared by the daemon's integration tests (tests/common) and the bench
//! (crates/notify-bridge-bench): what they read of a running process, so the
//! /proc formats are parsed in one place, by procfs.

pub mod proc;
