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
