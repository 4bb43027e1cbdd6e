//! The development switches (CONTRACT.md, "Limits on hostile input"):
//! `auth.mode = "none"`, `http.allow_anonymous` and `http.dev_tokens` each
//! log a WARN at startup naming the switch, so a deployment that carries
//! one by mistake says so in its first lines. Checked on the real binary's
//! log.

mod common;

use common::daemon::{Daemon, Placement};

/// The startup WARN lines of a daemon started with `env`, then stopped.
async fn startup_warnings(env: &[(&str, &str)]) -> Vec<String> {
    let daemon = Daemon::start_unready_at(Placement::new(), env).await;
    let log = daemon.terminate().await;
    log.lines()
        .filter(|line| line.contains("WARN"))
        .map(str::to_string)
        .collect()
}

fn naming<'a>(warnings: &'a [String], switch: &str) -> Vec<&'a String> {
    warnings.iter().filter(|w| w.contains(switch)).collect()
}

#[tokio::test]
async fn each_development_switch_logs_one_warn_naming_it() {
    let warnings = startup_warnings(&[
        ("NOTIFY_BRIDGE_AUTH__MODE", "none"),
        ("NOTIFY_BRIDGE_HTTP__ALLOW_ANONYMOUS", "true"),
        ("NOTIFY_BRIDGE_HTTP__DEV_TOKENS", "true"),
    ])
    .await;
    for switch in ["auth.mode", "http.allow_anonymous", "http.dev_tokens"] {
        assert_eq!(
            naming(&warnings, switch).len(),
            1,
            "one WARN naming {switch}; the WARN lines:\n{}",
            warnings.join("\n")
        );
    }
}

#[tokio::test]
async fn without_the_switches_no_switch_is_warned_about() {
    let warnings = startup_warnings(&[("NOTIFY_BRIDGE_HTTP__API_KEYS", "a-key")]).await;
    for switch in ["auth.mode", "http.allow_anonymous", "http.dev_tokens"] {
        assert!(
            naming(&warnings, switch).is_empty(),
            "{switch} is off but warned about:\n{}",
            warnings.join("\n")
        );
    }
}
