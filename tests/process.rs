//! The real `notify-bridge` binary, configured the way operators do it:
//! environment variables, a TOML file, the command line. Signals, exit
//! codes, and the `token` and `check-config` commands.

mod common;

use std::{process::Output, time::Duration};

use common::{daemon::*, *};
use notify_bridge::{auth::Authenticator, config::AuthConfig};
use serde_json::json;
use tokio::{process::Command, time::Instant};

/// Runs a command that is expected to end by itself.
async fn run(mut command: Command) -> Output {
    let output = tokio::time::timeout(COMMAND_WAIT, command.output())
        .await
        .expect("the command ends in time")
        .expect("the binary runs");
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the daemon with a minimal valid environment plus `var=value` (a
/// setting it must refuse before it starts): its exit code and stderr.
async fn run_with_env(var: &str, value: &str) -> (Option<i32>, String) {
    let dir = TempDir::new();
    let mut command = bridge_command(dir.path());
    command
        .env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET)
        .env("NOTIFY_BRIDGE_WEBSOCKET__LISTEN", "127.0.0.1:0")
        .env("NOTIFY_BRIDGE_HTTP__LISTEN", "127.0.0.1:0")
        .env(var, value);
    let output = run(command).await;
    (output.status.code(), text(&output.stderr))
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let mut daemon = Daemon::start(&[]).await;
    let mut a = daemon.connect("1").await;
    let mut b = daemon.connect("2").await;

    let pid = daemon.child.id().expect("still running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let signalled = Instant::now();

    let (code_a, code_b) = tokio::join!(close_code(&mut a), close_code(&mut b));
    assert_eq!(
        (code_a, code_b),
        (Some(1001), Some(1001)),
        "{}",
        daemon.log()
    );

    // The shutdown timeout is 5 s; give the process a moment to exit after it.
    let status = tokio::time::timeout(Duration::from_secs(6), daemon.child.wait())
        .await
        .unwrap_or_else(|_| panic!("no exit within the shutdown timeout:\n{}", daemon.log()))
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    assert!(signalled.elapsed() < Duration::from_secs(6));

    // Nothing accepts connections any more.
    let url = format!("ws://{}/ws?token={}", daemon.ws_addr, token("3", &[]));
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("shutdown_timeout reached"), "{log}");
    daemon.cleanup().await;
}

#[tokio::test]
async fn an_invalid_environment_value_exits_2_naming_key_and_variable() {
    let (code, stderr) = run_with_env("NOTIFY_BRIDGE_WEBSOCKET__SEND_QUEUE", "abc").await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("websocket.send_queue"), "{stderr}");
    assert!(
        stderr.contains("NOTIFY_BRIDGE_WEBSOCKET__SEND_QUEUE"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn the_runtime_has_a_worker_per_core_unless_told() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expected = format!("worker_threads={cores}");
    let default = Daemon::start(&[]).await;
    assert!(
        default.log().contains(&expected),
        "{expected}:\n{}",
        default.log()
    );
    let told = Daemon::start(&[("TOKIO_WORKER_THREADS", "3")]).await;
    assert!(told.log().contains("worker_threads=3"), "{}", told.log());
    default.cleanup().await;
    told.cleanup().await;
}

#[tokio::test]
async fn a_worker_count_that_is_not_a_number_exits_2_naming_the_variable() {
    let (code, stderr) = run_with_env("TOKIO_WORKER_THREADS", "zero").await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TOKIO_WORKER_THREADS=\"zero\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn a_bad_config_file_exits_2_naming_the_dotted_key_and_the_file() {
    let dir = TempDir::new();
    let secret = format!("[auth]\njwt_secret = \"{SECRET}\"\n");
    let cases = [
        (
            "bad-value.toml",
            "[websocket]\nsend_queue = \"lots\"\n",
            "websocket.send_queue",
        ),
        (
            "bad-duration.toml",
            "[websocket]\nping_interval = \"soon\"\n",
            "websocket.ping_interval",
        ),
        (
            "zero.toml",
            "[websocket]\nsend_queue = 0\n",
            "websocket.send_queue",
        ),
        (
            "unknown-key.toml",
            "[websocket]\nsend_queeu = 5\n",
            "websocket.send_queeu",
        ),
        ("not-toml.toml", "this is [[ not toml\n", "line 3"),
        (
            "cookie-without-origins.toml",
            "cookie_name = \"nb_token\"\n",
            "auth.cookie_name",
        ),
    ];
    for (name, body, key) in cases {
        let path = dir.write(name, &format!("{secret}{body}"));
        let mut command = bridge_command(dir.path());
        command.arg("--config").arg(&path);
        let output = run(command).await;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(key), "{name} should name {key}: {stderr}");
        assert!(stderr.contains(name), "{name} should be named: {stderr}");
    }
}

#[tokio::test]
async fn a_missing_config_file_exits_2() {
    let dir = TempDir::new();
    let missing = dir.path().join("nowhere.toml");
    for args in [
        vec!["--config", missing.to_str().unwrap()],
        vec!["check-config", "--config", missing.to_str().unwrap()],
    ] {
        let mut command = bridge_command(dir.path());
        command
            .env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET)
            .args(&args);
        let output = run(command).await;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("nowhere.toml"), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_masked() {
    let dir = TempDir::new();
    let path = dir.write(
        "bridge.toml",
        "[amqp]\nurl = \"amqp://svc:hunter2-amqp@broker.example:5672/%2f\"\n\
         [websocket]\npath = \"/custom\"\n\
         [http]\napi_keys = [\"apikey-secret-1\", \"apikey-secret-2\"]\n",
    );
    let secrets = [
        "hunter2-amqp",
        "apikey-secret-1",
        "apikey-secret-2",
        "adminkey-secret-3",
        "jwt-secret-from-env-0123",
    ];
    let mut outputs = Vec::new();
    for before in [true, false] {
        let mut command = bridge_command(dir.path());
        command
            .env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", "jwt-secret-from-env-0123")
            .env(
                "NOTIFY_BRIDGE_HTTP__ADMIN_KEYS",
                "adminkey-secret-3,other-admin",
            )
            .env("NOTIFY_BRIDGE_WEBSOCKET__SEND_QUEUE", "77");
        if before {
            command.arg("--config").arg(&path).arg("check-config");
        } else {
            command.arg("check-config").arg("--config").arg(&path);
        }
        let output = run(command).await;
        let stdout = text(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        for secret in secrets {
            assert!(!stdout.contains(secret), "{secret} shown:\n{stdout}");
        }
        let shown: toml::Value = toml::from_str(&stdout).expect("check-config prints TOML");
        // From the file, from the environment, and masked.
        assert_eq!(shown["websocket"]["path"].as_str(), Some("/custom"));
        assert_eq!(shown["websocket"]["send_queue"].as_integer(), Some(77));
        assert_eq!(
            shown["amqp"]["url"].as_str(),
            Some("amqp://svc:********@broker.example:5672/%2f")
        );
        assert_eq!(shown["auth"]["jwt_secret"].as_str(), Some("********"));
        let masked = |list: &toml::Value| -> Vec<String> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(masked(&shown["http"]["api_keys"]), vec!["********"; 2]);
        assert_eq!(masked(&shown["http"]["admin_keys"]), vec!["********"; 2]);
        outputs.push(stdout);
    }
    assert_eq!(
        outputs[0], outputs[1],
        "--config before and after the subcommand"
    );
}

#[tokio::test]
async fn token_prints_one_jwt_that_the_bridge_accepts() {
    let dir = TempDir::new();
    let mut command = bridge_command(dir.path());
    command.env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET).args([
        "token",
        "--user",
        "5",
        "--channel",
        "a",
        "--ttl",
        "1h",
    ]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.ends_with('\n'), "{stdout:?}");
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let token = stdout.trim_end_matches('\n');
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert!(parts.iter().all(|p| !p.is_empty()), "{token}");

    let auth = Authenticator::from_config(&AuthConfig {
        jwt_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let identity = auth.verify(token).expect("the token verifies");
    assert_eq!(identity.user.as_str(), "5");
    assert!(identity.channels.allows("a"));
    assert!(!identity.channels.allows("b"));
    let ttl = identity
        .expires_at
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .saturating_sub(unix_now());
    assert!((3540..=3600).contains(&ttl), "ttl {ttl}");

    // A running bridge with the same secret lets it in, with its channel.
    let bridge = Bridge::start().await;
    let url = bridge.ws_url(&format!("/ws?token={token}&channel=a"));
    let (_, _, welcome) = accepted(request(&url, &[])).await;
    assert_eq!(welcome["user_id"], "5");
    assert_eq!(welcome["channels"], json!(["a"]));
    bridge.stop().await;
}

#[tokio::test]
async fn token_without_a_secret_exits_2() {
    let dir = TempDir::new();
    for mode in ["jwt", "none"] {
        let mut command = bridge_command(dir.path());
        command
            .env("NOTIFY_BRIDGE_AUTH__MODE", mode)
            .args(["token", "--user", "5"]);
        let output = run(command).await;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{mode}: {stderr}");
        assert!(output.stdout.is_empty(), "{mode}: no token may be printed");
        assert!(stderr.contains("jwt_secret"), "{mode}: {stderr}");
    }
}
