//! TLS (CONTRACT.md, "TLS"): wss on the WebSocket listener, https on the
//! side port, certificate rotation on SIGHUP without dropping open
//! connections, exit 2 for unusable files, and consuming from a broker over
//! amqps:// with `amqp.tls_ca_file`. Certificates come from throwaway CAs
//! made in the test (rcgen); the broker's TLS listener is the one
//! `scripts/rabbitmq` sets up (its own throwaway CA, made with openssl).

mod common;

use std::{path::PathBuf, time::Duration};

use common::{daemon::*, tls::*, *};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

/// A bridge whose both listeners speak TLS with a certificate of `ca`.
async fn tls_bridge(
    ca: &TestCa,
    dir: &TempDir,
    tweak: impl FnOnce(&mut notify_bridge::config::Config),
) -> Bridge {
    let (cert, key) = ca.leaf().write(dir, "cert.pem", "key.pem");
    Bridge::start_with(|config| {
        config.websocket.tls_cert_file = Some(cert.clone());
        config.websocket.tls_key_file = Some(key.clone());
        config.http.tls_cert_file = Some(cert);
        config.http.tls_key_file = Some(key);
        tweak(config);
    })
    .await
}

fn token_query(user: &str) -> String {
    format!("/ws?token={}", token(user, &[]))
}

fn notification(user: &str, id: &str) -> String {
    serde_json::json!({"user_ids": [user], "id": id, "payload": {"n": id}}).to_string()
}

/// The next frame of type `notification`, within [`WAIT`].
async fn next_notification(client: &mut Client) -> Value {
    loop {
        let frame = next_json(client).await;
        if frame["type"] == "notification" {
            return frame;
        }
    }
}

#[tokio::test]
async fn wss_delivers_to_a_client_that_trusts_the_ca_and_refuses_the_others() {
    let (ca, dir) = (TestCa::new("wss test CA"), TempDir::new());
    let bridge = tls_bridge(&ca, &dir, |_| {}).await;
    let addr = bridge.running().ws_addr;

    let (mut client, _) = wss_connect(addr, &token_query("alice"), ca.client())
        .await
        .expect("a client that trusts the CA connects over wss");
    assert_eq!(next_json(&mut client).await["type"], "welcome");
    let publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, &notification("alice", "over-tls"))
        .await;
    let frame = next_notification(&mut client).await;
    assert_eq!(frame["id"], "over-tls", "{frame}");
    assert_eq!(frame["payload"], serde_json::json!({"n": "over-tls"}));

    let stranger = TestCa::new("another CA");
    let refused = wss_connect(addr, &token_query("alice"), stranger.client()).await;
    let error = refused.expect_err("a client that does not trust the CA fails the handshake");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    // A plain ws:// client gets no WebSocket from the wss listener.
    let plain = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{addr}{}", token_query("alice"))),
    )
    .await
    .expect("the plain attempt ends in time");
    assert!(
        plain.is_err(),
        "a plain handshake on the wss port must fail"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn the_side_port_speaks_https() {
    let (ca, dir) = (TestCa::new("https test CA"), TempDir::new());
    let bridge = tls_bridge(&ca, &dir, |_| {}).await;
    let addr = bridge.running().http_addr;

    let (status, answer) = https_get(addr, "/healthz", ca.client())
        .await
        .expect("https to the side port");
    assert_eq!(status, 200, "{answer}");
    let stranger = TestCa::new("another CA");
    let refused = https_get(addr, "/healthz", stranger.client()).await;
    assert!(
        refused.is_err(),
        "an untrusting client must fail: {refused:?}"
    );
    // Plain HTTP on the https port is not answered as HTTP.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_neither_holds_the_accept_loop_nor_lives_past_the_timeout() {
    let (ca, dir) = (TestCa::new("stall test CA"), TempDir::new());
    let bridge = tls_bridge(&ca, &dir, |config| {
        config.websocket.handshake_timeout = Duration::from_secs(1);
        config.http.request_timeout = Duration::from_secs(1);
    })
    .await;
    let (ws_addr, http_addr) = (bridge.running().ws_addr, bridge.running().http_addr);
    // Sockets that never send a ClientHello.
    let mut stalled_ws = TcpStream::connect(ws_addr).await.unwrap();
    let mut stalled_http = TcpStream::connect(http_addr).await.unwrap();
    let started = Instant::now();

    let (mut client, _) = wss_connect(ws_addr, &token_query("bob"), ca.client())
        .await
        .expect("a second client is served while the first stalls");
    assert_eq!(next_json(&mut client).await["type"], "welcome");
    let (status, _) = https_get(http_addr, "/healthz", ca.client()).await.unwrap();
    assert_eq!(status, 200);

    // Both stalled sockets are closed by the server after the timeout
    // (EOF or a reset), generously bounded.
    for stalled in [&mut stalled_ws, &mut stalled_http] {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(8), stalled.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a stalled TLS handshake must be closed: {read:?}"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The side port counts it as the late head it is.
    let refused = metric(
        &bridge.running().metrics.render(),
        "notify_bridge_limit_refusals_total{limit=\"http.request_timeout\"}",
    );
    assert_eq!(refused, 1.0);
    bridge.stop().await;
}

/// Sends SIGHUP to the daemon and waits for `lines` more reload lines.
async fn sighup(daemon: &Daemon, done_before: usize, wanted: usize) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    loop {
        let done = reload_lines(daemon);
        if done >= done_before + wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no reload logged:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reload_lines(daemon: &Daemon) -> usize {
    let log = daemon.stderr.lock().unwrap();
    log.iter().filter(|l| l.contains("SIGHUP: ")).count()
}

async fn wait_https_ready(daemon: &Daemon, ca: &TestCa) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while https_get(daemon.http_addr, "/readyz", ca.client())
        .await
        .map(|(status, _)| status)
        .unwrap_or(0)
        != 200
    {
        assert!(Instant::now() < deadline, "not ready:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sighup_swaps_the_certificate_for_new_handshakes_and_keeps_open_connections() {
    let ca = TestCa::new("rotation test CA");
    let place = Placement::new();
    let (first, second) = (ca.leaf(), ca.leaf());
    let (cert, key) = first.write(&place.dir, "cert.pem", "key.pem");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let daemon = Daemon::start_unready_at(
        place.clone(),
        &[
            ("NOTIFY_BRIDGE_WEBSOCKET__TLS_CERT_FILE", cert),
            ("NOTIFY_BRIDGE_WEBSOCKET__TLS_KEY_FILE", key),
            ("NOTIFY_BRIDGE_HTTP__TLS_CERT_FILE", cert),
            ("NOTIFY_BRIDGE_HTTP__TLS_KEY_FILE", key),
        ],
    )
    .await;
    wait_https_ready(&daemon, &ca).await;
    let (mut old, presented) = wss_connect(daemon.ws_addr, &token_query("carol"), ca.client())
        .await
        .expect("wss before the rotation");
    assert_eq!(presented, first.der, "the first certificate is presented");
    assert_eq!(next_json(&mut old).await["type"], "welcome");

    // Rotate: new files in place, then SIGHUP (both pairs reload).
    second.write(&place.dir, "cert.pem", "key.pem");
    sighup(&daemon, reload_lines(&daemon), 2).await;
    let (mut new, presented) = wss_connect(daemon.ws_addr, &token_query("carol"), ca.client())
        .await
        .expect("wss after the rotation");
    assert_eq!(
        presented, second.der,
        "the next handshake presents the new certificate"
    );
    assert_eq!(next_json(&mut new).await["type"], "welcome");
    assert_eq!(
        https_get(daemon.http_addr, "/healthz", ca.client())
            .await
            .unwrap()
            .0,
        200
    );

    // The connection opened before the rotation still receives.
    let publisher = Publisher::connect().await;
    publisher
        .publish(
            &place.exchange,
            &notification("carol", "after-rotation"),
            Default::default(),
        )
        .await;
    assert_eq!(next_notification(&mut old).await["id"], "after-rotation");
    assert_eq!(next_notification(&mut new).await["id"], "after-rotation");

    // A broken file on SIGHUP: an ERROR, the bridge keeps the certificate
    // it had and keeps running.
    place.dir.write("key.pem", "not a key");
    sighup(&daemon, reload_lines(&daemon), 2).await;
    assert!(
        daemon.log().lines().any(|l| l.contains("ERROR")
            && l.contains("websocket.tls_key_file")
            && l.contains("previous one stays in use")),
        "{}",
        daemon.log()
    );
    let (_, presented) = wss_connect(daemon.ws_addr, &token_query("carol"), ca.client())
        .await
        .expect("wss after a failed reload");
    assert_eq!(
        presented, second.der,
        "a failed reload keeps the certificate in use"
    );
    daemon.terminate().await;
}

#[tokio::test]
async fn sighup_without_tls_does_not_stop_the_bridge() {
    let daemon = Daemon::start(&[]).await;
    sighup(&daemon, 0, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(daemon.pid_or_none().is_some());
    assert_eq!(http_get(daemon.http_addr, "/healthz").await.0, 200);
    daemon.terminate().await;
}

#[tokio::test]
async fn unusable_tls_files_stop_startup_with_exit_2_naming_the_key() {
    let ca = TestCa::new("startup test CA");
    let dir = TempDir::new();
    let (cert, key) = ca.leaf().write(&dir, "cert.pem", "key.pem");
    let (_, other_key) = ca.leaf().write(&dir, "other-cert.pem", "other-key.pem");
    let garbage = dir.write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n");
    let empty = dir.write("empty.pem", "");
    let missing = dir.path().join("missing.pem");
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "websocket.tls_cert_file",
            vec![
                ("NOTIFY_BRIDGE_WEBSOCKET__TLS_CERT_FILE", path(&missing)),
                ("NOTIFY_BRIDGE_WEBSOCKET__TLS_KEY_FILE", path(&key)),
            ],
        ),
        (
            "websocket.tls_cert_file",
            vec![
                ("NOTIFY_BRIDGE_WEBSOCKET__TLS_CERT_FILE", path(&garbage)),
                ("NOTIFY_BRIDGE_WEBSOCKET__TLS_KEY_FILE", path(&key)),
            ],
        ),
        (
            "websocket.tls_key_file",
            vec![
                ("NOTIFY_BRIDGE_WEBSOCKET__TLS_CERT_FILE", path(&cert)),
                ("NOTIFY_BRIDGE_WEBSOCKET__TLS_KEY_FILE", path(&empty)),
            ],
        ),
        (
            "http.tls_key_file",
            vec![
                ("NOTIFY_BRIDGE_HTTP__TLS_CERT_FILE", path(&cert)),
                ("NOTIFY_BRIDGE_HTTP__TLS_KEY_FILE", path(&other_key)),
            ],
        ),
        (
            "http.tls_key_file",
            vec![("NOTIFY_BRIDGE_HTTP__TLS_CERT_FILE", path(&cert))],
        ),
        (
            "amqp.tls_ca_file",
            vec![
                (
                    "NOTIFY_BRIDGE_AMQP__URL",
                    "amqps://guest:guest@127.0.0.1:5671/%2f".into(),
                ),
                ("NOTIFY_BRIDGE_AMQP__TLS_CA_FILE", path(&missing)),
            ],
        ),
    ];
    for (key_named, env) in cases {
        let mut command = bridge_command(dir.path());
        command
            .env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET)
            .env("NOTIFY_BRIDGE_WEBSOCKET__LISTEN", "127.0.0.1:0")
            .env("NOTIFY_BRIDGE_HTTP__LISTEN", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let output = tokio::time::timeout(COMMAND_WAIT, command.output())
            .await
            .expect("startup fails at once")
            .unwrap();
        let stderr = strip_ansi(&String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(key_named),
            "{env:?} must name {key_named}: {stderr}"
        );
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}

/// The broker's amqps URL and CA file, or `None` (the test skips) when no
/// broker answers TLS here; under CI=true a missing TLS listener fails.
fn broker_tls() -> Option<(String, PathBuf)> {
    let url = std::env::var("NOTIFY_BRIDGE_TEST_AMQPS_URL")
        .unwrap_or_else(|_| "amqps://guest:guest@127.0.0.1:5671/%2f".into());
    let ca = std::env::var_os("NOTIFY_BRIDGE_TEST_AMQP_CA_FILE")
        .map(PathBuf::from)
        .or_else(|| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq");
            let out = std::process::Command::new("bash")
                .args([script, "tls-ca"])
                .output()
                .ok()?;
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
        });
    let port_answers = url::Url::parse(&url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port().unwrap_or(5671))))
        .is_some_and(|addr| std::net::TcpStream::connect(addr).is_ok());
    match ca {
        Some(ca) if port_answers => Some((url, ca)),
        _ => {
            let why = format!(
                "no broker TLS listener at {url} with a CA file (NOTIFY_BRIDGE_TEST_AMQP_CA_FILE, \
                 or `scripts/rabbitmq tls-ca`); restart the broker with scripts/rabbitmq \
                 (stop, then start) to add one"
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

#[tokio::test]
async fn the_bridge_consumes_and_publishes_over_amqps_with_tls_ca_file() {
    let Some((url, ca_file)) = broker_tls() else {
        return;
    };
    let bridge = Bridge::start_with(|config| {
        config.amqp.url = url.clone();
        config.amqp.tls_ca_file = Some(ca_file.clone());
        config.http.api_keys = vec!["tls-key".into()];
    })
    .await;
    let mut client = bridge.connect("dave").await;
    let publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, &notification("dave", "via-amqps"))
        .await;
    assert_eq!(next_notification(&mut client).await["id"], "via-amqps");
    // The side port's publisher opens its connection the same way.
    let sent = http_request(
        bridge.running().http_addr,
        "POST",
        "/api/notifications/send",
        &[
            ("authorization", "Bearer tls-key"),
            ("content-type", "application/json"),
        ],
        &notification("dave", "sent-over-amqps"),
    )
    .await;
    assert_eq!(sent.status, 202, "{}", sent.body);
    assert_eq!(
        next_notification(&mut client).await["id"],
        "sent-over-amqps"
    );
    bridge.stop().await;

    // With a CA that did not sign the broker's certificate, the bridge
    // does not connect, and says why.
    let (stranger, dir) = (TestCa::new("not the broker's CA"), TempDir::new());
    let wrong_ca = dir.write("ca.pem", stranger.pem());
    let mut config = test_config();
    config.amqp.url = url;
    config.amqp.tls_ca_file = Some(wrong_ca);
    let bridge = Bridge::start_unready(config).await;
    let deadline = Instant::now() + WAIT;
    let reason = loop {
        match bridge.running().readiness.get() {
            Err(reason) if reason.contains("cannot connect") => break reason,
            Ok(()) => panic!("connected to a broker its CA did not sign"),
            _ if Instant::now() > deadline => panic!("no connect failure reported"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(reason.to_lowercase().contains("certificate"), "{reason}");
    bridge.stop().await;
}
