//! Every example in examples/ against a real bridge (tests/common), run the
//! way the docs say, with explicit flags pointing at the test bridge.
//!
//! The Python examples run from a virtualenv in target/examples-venv, made
//! once (`python3 -m venv`, then `pip install -r examples/requirements.txt`;
//! it is made again when requirements.txt changes). client.js runs under
//! Node when Node is installed (it is also loaded in Chromium by
//! tests/browser.rs). The Rust example is run with `cargo run --example`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use common::{inbox::ScratchStore, lines::SeenLines, *};
use serde_json::Value;
use tokio::{
    process::{Child, ChildStderr, ChildStdout, Command},
    sync::OnceCell,
};

const API_KEY: &str = "examples-api-key";
const ADMIN_KEY: &str = "examples-admin-key";
/// How long an example may take for one step.
const STEP: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

// ---------------------------------------------------------------------------
// The virtualenv
// ---------------------------------------------------------------------------

static VENV: OnceCell<Result<PathBuf, String>> = OnceCell::const_new();

/// The venv's python, made on first use; panics with the reason when the
/// venv cannot be made (no python3, no venv module, PyPI unreachable).
async fn python() -> PathBuf {
    match VENV.get_or_init(make_venv).await {
        Ok(python) => python.clone(),
        Err(e) => panic!("{e}"),
    }
}

async fn make_venv() -> Result<PathBuf, String> {
    let requirements = std::fs::read_to_string(repo().join("examples/requirements.txt"))
        .map_err(|e| format!("cannot read examples/requirements.txt: {e}"))?;
    let venv = target_dir().join("examples-venv");
    let marker = |dir: &Path| dir.join(".requirements.txt");
    let ready = |dir: &Path| {
        std::fs::read_to_string(marker(dir)).is_ok_and(|done| done == requirements)
            && dir.join("bin/python").exists()
    };
    if ready(&venv) {
        return Ok(venv.join("bin/python"));
    }

    // Build it beside the final place and rename it there, so that a
    // half-made venv (an interrupted run, another test process) is never used.
    let building = target_dir().join(format!("examples-venv.{}", unique("tmp")));
    let run = |program: PathBuf, args: Vec<String>, what: &'static str, limit: Duration| async move {
        let mut command = Command::new(&program);
        command
            .args(&args)
            .current_dir(repo())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(limit, command.output())
            .await
            .map_err(|_| format!("{what} took longer than {limit:?}"))?
            .map_err(|e| format!("{what}: cannot run {}: {e}", program.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    };
    let result = async {
        run(
            PathBuf::from("python3"),
            vec!["-m".into(), "venv".into(), building.display().to_string()],
            "python3 -m venv (Debian: apt-get install -y python3-venv; scripts/test does)",
            Duration::from_secs(120),
        )
        .await?;
        run(
            building.join("bin/python"),
            [
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
                "--timeout",
                "30",
                "--retries",
                "2",
                "-r",
                "examples/requirements.txt",
            ]
            .map(String::from)
            .to_vec(),
            "pip install -r examples/requirements.txt (can this machine reach PyPI?)",
            Duration::from_secs(600),
        )
        .await?;
        std::fs::write(marker(&building), &requirements).map_err(|e| e.to_string())?;
        if !ready(&venv) {
            let _ = std::fs::remove_dir_all(&venv);
            // Losing a race to another process is fine: its venv is as good.
            if std::fs::rename(&building, &venv).is_err() && !ready(&venv) {
                return Err(format!("cannot move the venv to {}", venv.display()));
            }
        }
        Ok(venv.join("bin/python"))
    }
    .await;
    let _ = std::fs::remove_dir_all(&building);
    result.map_err(|e| format!("cannot make the examples' virtualenv: {e}"))
}

// ---------------------------------------------------------------------------
// Running examples
// ---------------------------------------------------------------------------

/// A running example, its output read line by line.
struct Running {
    child: Child,
    stdout: SeenLines<ChildStdout>,
    stderr: SeenLines<ChildStderr>,
}

fn spawn(program: &Path, args: &[&str]) -> Running {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(repo())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    Running {
        stdout: SeenLines::new(child.stdout.take().unwrap()),
        stderr: SeenLines::new(child.stderr.take().unwrap()),
        child,
    }
}

impl Running {
    /// Reads stderr until a line contains `needle`.
    async fn wait_stderr(&mut self, needle: &str) {
        if let Err(e) = self.stderr.until(needle, STEP).await {
            panic!("stderr: {e}:\n{}", self.stderr.text());
        }
    }

    /// The next line on stdout (kept for `finish` too).
    async fn next_stdout_line(&mut self) -> String {
        let line = self.stdout.next(STEP).await;
        line.unwrap_or_else(|e| panic!("stdout: {e}:\n{}", self.stderr.text()))
    }

    /// Waits for the exit; returns the status, all of stdout and of stderr.
    async fn finish(mut self) -> (ExitStatus, String, String) {
        let collect = async {
            self.stdout.rest().await.unwrap();
            self.stderr.rest().await.unwrap();
            self.child.wait().await.unwrap()
        };
        let Ok(status) = tokio::time::timeout(STEP, collect).await else {
            panic!(
                "the example did not exit within {STEP:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout.text(),
                self.stderr.text()
            );
        };
        (status, self.stdout.text(), self.stderr.text())
    }
}

/// Runs an example to its end: status, stdout, stderr.
async fn run(program: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    spawn(program, args).finish().await
}

fn example(name: &str) -> String {
    repo().join("examples").join(name).display().to_string()
}

async fn start_bridge() -> Bridge {
    Bridge::start_with(|c| {
        c.http.api_keys = vec![API_KEY.into()];
        c.http.admin_keys = vec![ADMIN_KEY.into()];
        c.http.dev_tokens = true;
    })
    .await
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// listen.py on `ws_url` as the holder of `token` with `more` flags,
/// once it has said `welcome`.
async fn listen_py(python: &Path, ws_url: &str, token: &str, more: &[&str]) -> Running {
    let script = example("listen.py");
    let mut args = vec![script.as_str(), "--url", ws_url, "--token", token];
    args.extend(more);
    let mut listener = spawn(python, &args);
    listener.wait_stderr("welcome").await;
    listener
}

/// publish_amqp.py to `exchange` on the test broker for user 1, with `more`
/// flags, run to its end.
async fn publish_amqp_py(
    python: &Path,
    exchange: &str,
    more: &[&str],
) -> (ExitStatus, String, String) {
    let (script, amqp) = (example("publish_amqp.py"), amqp_url());
    let mut args = vec![script.as_str(), "--amqp-url", &amqp, "--exchange", exchange];
    args.extend(["--user", "1"]);
    args.extend(more);
    run(python, &args).await
}

/// send_http.py to user 1 through the bridge at `http_url` with `api_key`
/// and `more` flags, run to its end.
async fn send_http_py(
    python: &Path,
    http_url: &str,
    api_key: &str,
    more: &[&str],
) -> (ExitStatus, String, String) {
    let script = example("send_http.py");
    let mut args = vec![script.as_str(), "--url", http_url, "--api-key", api_key];
    args.extend(["--user", "1"]);
    args.extend(more);
    run(python, &args).await
}

/// A bodiless request with the admin key: status and body.
async fn admin(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let key = format!("Bearer {ADMIN_KEY}");
    let reply = http_request(addr, method, path, &[("authorization", &key)], "").await;
    (reply.status, reply.body)
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn publish_amqp_py_single_and_feed_reach_listen_py() {
    let python = python().await;
    let bridge = start_bridge().await;
    let ws_url = bridge.ws_url("/ws");
    let token = token("1", &[]);
    let listener = listen_py(&python, &ws_url, &token, &["--json", "--count", "4"]).await;

    let exchange = bridge.config.amqp.exchange.clone();
    let (status, out, err) = publish_amqp_py(
        &python,
        &exchange,
        &["--text", "hello from pika", "--id", "py-1"],
    )
    .await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("published id=py-1"), "{out}");

    // The live feed: three positions, 0.2 s apart, then it stops by itself.
    let (status, out, err) =
        publish_amqp_py(&python, &exchange, &["--every", "0.2", "--count", "3"]).await;
    assert!(status.success(), "{out}{err}");
    assert_eq!(out.matches("published id=").count(), 3, "{out}");
    assert!(out.contains(r#""store": false"#), "{out}");

    let (status, out, err) = listener.finish().await;
    assert!(status.success(), "listen.py: {status}\n{out}\n{err}");
    let frames = json_lines(&out);
    assert_eq!(frames.len(), 4, "{out}");
    assert_eq!(frames[0]["id"], "py-1");
    assert_eq!(frames[0]["payload"]["text"], "hello from pika");
    for (i, frame) in frames[1..].iter().enumerate() {
        assert_eq!(frame["event"], "location", "{frame}");
        assert_eq!(frame["payload"]["n"], i as u64 + 1, "{frame}");
        assert!(frame["payload"]["lat"].is_f64(), "{frame}");
    }

    // No exchange of that name: a clear error, not a hang.
    let (status, _, err) = publish_amqp_py(&python, &unique("missing"), &[]).await;
    assert!(!status.success());
    assert!(err.contains("404") && err.contains("exchange"), "{err}");
    bridge.stop().await;
}

#[tokio::test]
async fn send_http_py_reaches_listen_py_with_a_dev_token() {
    let python = python().await;
    let bridge = start_bridge().await;
    let http_url = format!("http://{}", bridge.running().http_addr);
    let mut listener = spawn(
        &python,
        &[
            &example("listen.py"),
            "--url",
            &bridge.ws_url("/ws"),
            "--dev-token-user",
            "1",
            "--http-url",
            &http_url,
            "--count",
            "1",
        ],
    );
    listener.wait_stderr("welcome").await;

    let (status, out, err) = send_http_py(&python, &http_url, "wrong-key", &[]).await;
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(out.contains("HTTP 401"), "{out}");

    let more = [
        "--text",
        "hello over HTTP",
        "--id",
        "http-1",
        "--event",
        "greeting",
    ];
    let (status, out, err) = send_http_py(&python, &http_url, API_KEY, &more).await;
    assert!(status.success(), "{out}{err}");
    assert!(
        out.starts_with("HTTP 202") && out.contains(r#""queued""#),
        "{out}"
    );

    // listen.py's human format: time, event, id, payload JSON.
    let (status, out, err) = listener.finish().await;
    assert!(status.success(), "listen.py: {status}\n{out}\n{err}");
    let line = out.lines().next().unwrap_or_default();
    assert!(
        line.contains("greeting id=http-1") && line.contains(r#"{"text": "hello over HTTP"}"#),
        "{out}"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn listen_py_reconnects_after_a_bridge_restart_and_stops_on_1008() {
    let python = python().await;
    let bridge = start_bridge().await;
    let publisher = Publisher::connect().await;
    let ws_url = bridge.ws_url("/ws");
    let token = token("3", &[]);
    let more = ["--json", "--count", "2", "--max-backoff", "2"];
    let mut listener = listen_py(&python, &ws_url, &token, &more).await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id": 3, "id": "before", "payload": 1}"#,
        )
        .await;
    let line = listener.next_stdout_line().await;
    assert!(line.contains(r#""id":"before""#), "{line}");

    let ws_addr = bridge.running().ws_addr;
    bridge.stop().await;
    listener.wait_stderr("closed: 1001").await;
    listener.wait_stderr("reconnecting in").await;
    let bridge = Bridge::start_with(|c| {
        c.websocket.listen = ws_addr;
        c.http.admin_keys = vec![ADMIN_KEY.into()];
    })
    .await;
    listener.wait_stderr("welcome").await;
    bridge
        .publish(&publisher, r#"{"user_id": 3, "id": "after", "payload": 2}"#)
        .await;
    let (status, out, err) = listener.finish().await;
    assert!(status.success(), "listen.py: {status}\n{out}\n{err}");
    let ids: Vec<Value> = json_lines(&out).iter().map(|f| f["id"].clone()).collect();
    assert_eq!(ids, ["before", "after"], "{out}");

    // An admin closes it with 1008: listen.py says so and exits 1.
    let listener = listen_py(&python, &ws_url, &token, &[]).await;
    let (status, body) = admin(
        bridge.running().http_addr,
        "GET",
        "/api/connections?user_id=3",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let id = body["connections"][0]["id"].as_str().unwrap().to_string();
    let (status, body) = admin(
        bridge.running().http_addr,
        "DELETE",
        &format!("/api/connections/{id}"),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, _, err) = listener.finish().await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("closed: 1008") && err.contains("not reconnecting"),
        "{err}"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn rust_publish_example_reaches_a_socket() {
    let bridge = start_bridge().await;
    let mut client = bridge.connect("1").await;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let amqp = amqp_url();
    let exchange = bridge.config.amqp.exchange.clone();
    let args = |exchange: &str| {
        [
            "run",
            "--quiet",
            "--example",
            "publish",
            "--",
            "--amqp-url",
            &amqp,
            "--exchange",
            exchange,
            "--user",
            "1",
            "--text",
            "hello from lapin",
            "--id",
            "rs-1",
        ]
        .map(String::from)
    };
    // The first run may compile the example: give it time.
    let mut command = Command::new(&cargo);
    command
        .args(args(&exchange))
        .current_dir(repo())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(600), command.output())
        .await
        .expect("cargo run --example publish within 10 minutes")
        .expect("run cargo");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.contains("published id=rs-1"), "{out}");
    let frame = next_json(&mut client).await;
    assert_eq!(frame["id"], "rs-1", "{frame}");
    assert_eq!(frame["payload"]["text"], "hello from lapin", "{frame}");

    // No such exchange: it says so and fails.
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(&cargo)
            .args(args(&unique("missing")))
            .current_dir(repo())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("in time")
    .expect("run cargo");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(err.contains("exchange"), "{err}");
    bridge.stop().await;
}

/// The Node flags under which `WebSocket` is a global, if any.
async fn node_websocket_flags() -> Option<Vec<&'static str>> {
    for flags in [vec![], vec!["--experimental-websocket"]] {
        let mut args = flags.clone();
        args.extend([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ]);
        let ok = Command::new("node")
            .args(&args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .is_ok_and(|s| s.success());
        if ok {
            return Some(flags);
        }
    }
    None
}

#[tokio::test]
async fn client_js_passes_node_check_and_receives_under_node() {
    let node_found = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !node_found {
        eprintln!("SKIPPED: node is not installed (client.js is still run in Chromium by tests/browser.rs)");
        return;
    }
    let (status, out, err) = run(Path::new("node"), &["--check", &example("client.js")]).await;
    assert!(status.success(), "node --check: {out}{err}");

    let Some(flags) = node_websocket_flags().await else {
        eprintln!("SKIPPED running client.js: this Node has no WebSocket (Node >= 22 has)");
        return;
    };
    let bridge = start_bridge().await;
    let publisher = Publisher::connect().await;
    let ws_url = bridge.ws_url("/ws");
    let token = token("4", &[]);
    let script = example("client.js");
    let mut args: Vec<&str> = flags.clone();
    args.extend([
        script.as_str(),
        "--url",
        &ws_url,
        "--token",
        &token,
        "--count",
        "1",
    ]);
    let mut client = spawn(Path::new("node"), &args);
    client.wait_stderr("client.js: open").await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id": 4, "id": "node-1", "payload": {"text": "hello node"}}"#,
        )
        .await;
    let (status, out, err) = client.finish().await;
    assert!(status.success(), "client.js: {status}\n{out}\n{err}");
    let frames = json_lines(&out);
    assert_eq!(frames.len(), 1, "{out}");
    assert_eq!(frames[0]["id"], "node-1");
    assert_eq!(frames[0]["payload"]["text"], "hello node");
    bridge.stop().await;
}

/// examples/fallback_worker.py against a bridge with receipts and the
/// inbox on: two users offline, one reads in time, the other gets the
/// e-mail (and only that one).
#[tokio::test]
async fn fallback_worker_py_emails_only_the_offline_user_who_did_not_read() {
    let store = ScratchStore::new();
    let python = python().await;
    let bridge = Bridge::start_with(|c| {
        c.receipts.enabled = true;
        c.inbox.enabled = true;
        c.inbox.path = store.path();
    })
    .await;
    let queue = unique("fallback");
    let amqp = amqp_url();
    let exchange = bridge.config.amqp.exchange.clone();
    let mut worker = spawn(
        &python,
        &[
            &example("fallback_worker.py"),
            "--amqp-url",
            &amqp,
            "--exchange",
            &exchange,
            "--queue",
            &queue,
            "--after",
            "3",
            "--count",
            "1",
        ],
    );
    worker.wait_stderr("waiting for receipts").await;
    let publisher = Publisher::connect().await;
    publisher
        .publish_all(
            &exchange,
            [
                r#"{"id":"fb-read","user_id":"reader","payload":1}"#.to_string(),
                r#"{"id":"fb-unread","user_id":"away","payload":2}"#.to_string(),
            ],
        )
        .await;
    // Both were offline (their receipts say so) ...
    let offline = notify_bridge::receipts::Status::Offline;
    let deadline = tokio::time::Instant::now() + WAIT;
    while bridge.running().metrics.receipts_sent(offline) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no offline receipts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... then the reader comes back and reads it well before the 3 s are up.
    let (mut tab, counts) = common::inbox::connect_since(&bridge, "reader", None).await;
    assert_eq!(counts["unread"], 1, "{counts}");
    send_text(&mut tab, r#"{"type":"read","ids":["fb-read"]}"#).await;
    // (The live copy may come first: it was committed before we connected.)
    loop {
        let frame = next_json(&mut tab).await;
        if frame["type"] == "inbox" {
            assert_eq!(frame["unread"], 0, "{frame}");
            break;
        }
    }
    let (status, out, err) = worker.finish().await;
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(
        out.trim(),
        "e-mail to user away: notification fb-unread (seq 1) still unread after 3 s",
        "{err}"
    );
    if let Ok(connection) = lapin::Connection::connect(&amqp, Default::default()).await {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
    }
    bridge.stop().await;
}
