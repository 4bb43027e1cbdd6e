//! The repository's service scripts (scripts/rabbitmq, scripts/postgres),
//! run the way a developer runs them, for the tests that stop and start the
//! shared broker or database.

use std::process::Command;

/// `scripts/NAME ARGS` from the repository root; its stdout, or a panic
/// with all it printed when it fails.
pub fn run_script(name: &str, args: &[&str]) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .arg(format!("{root}/scripts/{name}"))
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    assert!(
        output.status.success(),
        "scripts/{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether `scripts/NAME` may stop the service the tests use: only a server
/// this checkout started (`status` says "our ... is running") on the URL the
/// tests were given. A reused server (another checkout's, or one the
/// developer runs) is left alone, so its fault cannot be inflicted here:
/// `Err` says why, for the test to print. Not a failure even under CI=true:
/// the scripts reuse a server that answers, and a suite that failed for it
/// would punish that; CI's fresh machine only has servers of its own.
pub fn ours_to_stop(name: &str, test_url: &str) -> Result<(), String> {
    let status = run_script(name, &["status"]);
    let script_url = run_script(name, &["url"]);
    let ours = status
        .lines()
        .any(|l| l.contains(": our ") && l.ends_with(" is running"));
    let same_server = test_url.starts_with(script_url.trim());
    if ours && same_server {
        return Ok(());
    }
    let why = format!(
        "the server at {test_url} is not one this checkout's scripts/{name} started \
         (status: {}); a reused server is never stopped by the tests",
        status.trim().replace('\n', "; ")
    );
    Err(why)
}
