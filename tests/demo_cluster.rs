//! `scripts/demo --cluster` as a user runs it: three instances on the real
//! broker and the PostgreSQL of scripts/postgres, each answering on the
//! ports it prints, each demo page pointing at its own WebSocket port, a
//! notification sent through instance a's REST API reaching sockets on b
//! and c with the same seq, a read on b reaching c's counts, and Ctrl-C
//! stopping all three. The test's binary stands in for the release build
//! (DEMO_BIN), and the cluster gets its own name, exchange and schema.

mod common;
mod pg;

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use common::{
    amqp_url, broker_addr, daemon::TempDir, delete_topology, http_get, http_request,
    lines::SeenLines, next_json_within, send_text, unique, Client,
};
use serde_json::Value;
use tokio::process::{Child, ChildStdout, Command};

/// Everything the script does before printing: the broker and database
/// checks, three starts and readiness (a debug build starts in a second).
const STARTUP: Duration = Duration::from_secs(120);
/// A frame between instances; generous for a loaded 2-core machine.
const HOP: Duration = Duration::from_secs(20);

/// The running script, in its own process group: on drop every process of
/// the group (the script and the bridges it started) is killed, so a
/// failing test leaves nothing behind.
struct Demo {
    child: Child,
    stdout: SeenLines<ChildStdout>,
    dir: TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// One instance as the script printed it.
#[derive(Debug)]
struct Instance {
    name: String,
    ws: SocketAddr,
    http: SocketAddr,
}

impl Demo {
    fn start(db: &str, cluster: &str, user: &str, base_port: u16) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = TempDir::new();
        let mut command = Command::new("bash");
        command
            .args(["scripts/demo", "--cluster"])
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .process_group(0)
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("NOTIFY_BRIDGE_") {
                command.env_remove(key);
            }
        }
        let pg_port = db.parse::<tokio_postgres::Config>().unwrap().get_ports()[0];
        command
            .env("DEMO_BIN", env!("CARGO_BIN_EXE_notify-bridge"))
            .env("DEMO_CLUSTER_NAME", cluster)
            .env("DEMO_CLUSTER_PORT", base_port.to_string())
            .env("DEMO_LOG_DIR", dir.path())
            .env("DEMO_USER", user)
            .env("AMQP_PORT", broker_addr().port().to_string())
            .env("PG_PORT", pg_port.to_string())
            .env("NOTIFY_BRIDGE_AMQP__URL", amqp_url())
            .env(
                "NOTIFY_BRIDGE_AMQP__EXCHANGE",
                format!("{cluster}.exchange"),
            )
            .env("NOTIFY_BRIDGE_INBOX__POSTGRES_URL", db);
        let mut child = command.spawn().expect("bash runs scripts/demo");
        let stdout = SeenLines::new(child.stdout.take().unwrap());
        Self { child, stdout, dir }
    }

    /// What the script said so far, and its stderr and the bridges' logs.
    fn output(&self) -> String {
        let mut text = format!("stdout:\n{}\n", self.stdout.text());
        for name in ["stderr", "bridge-a.log", "bridge-b.log", "bridge-c.log"] {
            let log = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            text.push_str(&format!("--- {name}:\n{}\n", tail.join("\n")));
        }
        text
    }

    /// Reads stdout up to the line containing `needle`.
    async fn read_until(&mut self, needle: &str, within: Duration) {
        if let Err(e) = self.stdout.until(needle, within).await {
            panic!("scripts/demo: {e}\n{}", self.output());
        }
    }

    /// The `instance X: ws ws://H:P/ws http http://H:P/ (...)` lines.
    fn instances(&self) -> Vec<Instance> {
        let addr = |word: &str, scheme: &str| -> SocketAddr {
            let rest = word
                .strip_prefix(scheme)
                .unwrap_or_else(|| panic!("{word}"));
            rest.split('/').next().unwrap().parse().unwrap()
        };
        self.stdout
            .seen
            .iter()
            .filter_map(|line| line.trim().strip_prefix("instance "))
            .map(|rest| {
                let words: Vec<&str> = rest.split_whitespace().collect();
                Instance {
                    name: words[0].trim_end_matches(':').to_string(),
                    ws: addr(words[2], "ws://"),
                    http: addr(words[4], "http://"),
                }
            })
            .collect()
    }

    /// The text after `marker` on the first printed line holding it, up to
    /// the next space or quote.
    fn printed(&self, marker: &str) -> String {
        let line = self
            .stdout
            .seen
            .iter()
            .find(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("no {marker:?} printed\n{}", self.output()));
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        rest.split([' ', '\'']).next().unwrap().to_string()
    }
}

/// Six consecutive loopback ports nothing listens on (checked by binding
/// them all), so a demo already running here is not in the way.
fn free_port_run() -> u16 {
    for _ in 0..50 {
        let base = 20_000 + (uuid::Uuid::new_v4().as_u128() % 20_000) as u16;
        let all: Vec<_> = (base..base + 6)
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if all.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no six free consecutive ports found")
}

/// The page settings embedded in an instance's demo page.
async fn page_settings(http: SocketAddr) -> Value {
    let (status, html) = http_get(http, "/").await;
    assert_eq!(status, 200, "{html}");
    let start = html
        .find(r#"<script id="settings" type="application/json">"#)
        .expect("the settings slot");
    let json = html[start..].split_once('>').unwrap().1;
    serde_json::from_str(json.split_once("</script>").unwrap().0).unwrap()
}

/// Connects to `ws` as the printed token's user; reads welcome and counts.
async fn connect(ws: SocketAddr, token: &str) -> (Client, Value) {
    let url = format!("ws://{ws}/ws?token={token}&since=0");
    let (mut client, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let welcome = next_json_within(&mut client, HOP).await.expect("welcome");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let counts = next_json_within(&mut client, HOP).await.expect("counts");
    assert_eq!(counts["type"], "inbox", "{counts}");
    (client, welcome)
}

/// The next frame of `kind` (others skipped) within [`HOP`].
async fn next_of(client: &mut Client, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + HOP;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = next_json_within(client, left)
            .await
            .unwrap_or_else(|| panic!("no {kind} frame within {HOP:?}"));
        if frame["type"] == kind {
            return frame;
        }
    }
}

/// Whether this process ignores SIGINT (a shell started it with `&`): the
/// script would inherit that and could not trap Ctrl-C.
fn sigint_ignored() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (2 - 1)) != 0)
}

#[tokio::test]
async fn demo_cluster_runs_three_instances_that_share_notifications_and_stop_on_ctrl_c() {
    let Some(db) = pg::fresh_schema().await else {
        return;
    };
    let cluster = unique("demo");
    let user = unique("demo-user");
    let base = free_port_run();
    let mut demo = Demo::start(&db, &cluster, &user, base);
    demo.read_until("Press Ctrl-C", STARTUP).await;

    let instances = demo.instances();
    let names: Vec<&str> = instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "{}", demo.output());
    for (n, instance) in instances.iter().enumerate() {
        let ws_port = base + 2 * n as u16;
        assert_eq!(
            (instance.ws.port(), instance.http.port()),
            (ws_port, ws_port + 1)
        );
        let (status, body) = http_get(instance.http, "/readyz").await;
        assert_eq!(status, 200, "instance {}: {body}", instance.name);
        let settings = page_settings(instance.http).await;
        assert_eq!(settings["ws_port"], ws_port, "{settings}");
        assert_eq!(settings["inbox"], true, "{settings}");
    }

    let token = demo.printed("?token=");
    let api_key = demo.printed("Authorization: Bearer ");
    let (a, b, c) = (&instances[0], &instances[1], &instances[2]);
    let (mut tab_b, _) = connect(b.ws, &token).await;
    let (mut tab_c, welcome_c) = connect(c.ws, &token).await;
    let connection = welcome_c["connection_id"].as_str().unwrap();
    assert!(connection.starts_with("c-c-"), "{welcome_c}");

    let body = format!(r#"{{"user_id":"{user}","id":"demo-1","payload":{{"text":"hi"}}}}"#);
    let auth = format!("Bearer {api_key}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let sent = http_request(a.http, "POST", "/api/notifications/send", &headers, &body).await;
    assert_eq!(sent.status, 202, "{}", sent.body);
    for tab in [&mut tab_c, &mut tab_b] {
        let frame = next_of(tab, "notification").await;
        assert_eq!((&frame["id"], &frame["seq"]), (&"demo-1".into(), &1.into()));
    }

    send_text(&mut tab_b, r#"{"type":"read","ids":["demo-1"]}"#).await;
    let counts = next_of(&mut tab_c, "inbox").await;
    assert_eq!(
        (&counts["total"], &counts["unread"]),
        (&1.into(), &0.into())
    );

    stop_and_check(&mut demo, &instances).await;
    // The instances' live queues go by themselves (x-expires); the rest here.
    delete_topology(&format!("{cluster}.ingest"), &format!("{cluster}.live")).await;
    delete_topology(&format!("{cluster}.live.a"), &format!("{cluster}.exchange")).await;
}

/// Ctrl-C (SIGINT to the script alone, as a terminal sends it; SIGTERM
/// when this process was started with SIGINT ignored): the script exits
/// within the bridges' shutdown time and none of the six ports answers.
async fn stop_and_check(demo: &mut Demo, instances: &[Instance]) {
    let (signal, code) = if sigint_ignored() {
        eprintln!("SIGINT is ignored in this process: stopping the demo with SIGTERM instead");
        ("-TERM", 143)
    } else {
        ("-INT", 130)
    };
    let pid = demo.child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    demo.read_until("bridges stopped", Duration::from_secs(30))
        .await;
    let status = tokio::time::timeout(Duration::from_secs(10), demo.child.wait())
        .await
        .expect("the script exits after stopping the bridges")
        .unwrap();
    assert_eq!(status.code(), Some(code), "{}", demo.output());
    for instance in instances {
        for addr in [instance.ws, instance.http] {
            assert!(
                tokio::net::TcpStream::connect(addr).await.is_err(),
                "{addr} still answers after Ctrl-C"
            );
        }
    }
}
