//! The bridge under test as a child process: started from the release
//! binary next to the bench with its own exchange, queue and ports, watched
//! through /proc (RSS, open fds) and its /metrics, stopped with SIGTERM, and
//! its broker topology deleted afterwards.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};
use testkit::strip_ansi;

use anyhow::{anyhow, bail, Context};
use lapin::{
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
    Connection, ConnectionProperties,
};
use testkit::proc::{self, Pid};

/// The HS256 secret the bench configures and signs client tokens with.
pub const SECRET: &str = "notify-bridge-bench-secret-0123456789";

/// Names unique to one bench invocation, so runs never see each other.
#[derive(Clone, Debug)]
pub struct Names {
    pub run_id: String,
    pub exchange: String,
    pub queue: String,
    pub baseline_exchange: String,
    pub baseline_queue: String,
}

impl Names {
    /// Fresh names from a UUIDv7: unique per invocation, so two benches on one
    /// broker never share a queue.
    pub fn new() -> Self {
        let run_id = uuid::Uuid::now_v7().simple().to_string();
        let short = &run_id[run_id.len() - 12..];
        Self {
            exchange: format!("bench.{short}.exchange"),
            queue: format!("notify-bridge.bench.{short}"),
            baseline_exchange: format!("bench.{short}.baseline"),
            baseline_queue: format!("bench.{short}.baseline"),
            run_id: short.to_string(),
        }
    }
}

/// How to start the bridge.
pub struct BridgeOptions {
    pub binary: PathBuf,
    pub amqp_url: String,
    pub prefetch: u16,
    pub inbox: bool,
    /// A scratch folder for this run (working directory, inbox store).
    pub work_dir: PathBuf,
    /// Extra NOTIFY_BRIDGE_* variables (`--bridge-env KEY=VALUE`).
    pub extra_env: Vec<(String, String)>,
}

/// The default binary: `notify-bridge` next to this executable
/// (`target/release/` after `cargo build --release --workspace`).
pub fn default_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the bench's own path")?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("the bench's path has no folder"))?;
    let bin = dir.join("notify-bridge");
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --workspace` (cargo run \
             --release -p notify-bridge-bench builds only the bench), or pass --bridge-bin PATH",
            bin.display()
        );
    }
    Ok(bin)
}

/// What the scenarios need of a running bridge: where it listens and its
/// pid (for /proc). Cheap to copy.
#[derive(Clone, Copy, Debug)]
pub struct Handle {
    pub pid: u32,
    pub ws_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

impl Handle {
    /// Resident memory in bytes (VmRSS).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        proc::rss_bytes(Pid::Of(self.pid))
            .with_context(|| format!("cannot read pid {}'s RSS", self.pid))
    }

    /// Open file descriptors.
    pub fn open_fds(&self) -> anyhow::Result<u64> {
        proc::open_fds(Pid::Of(self.pid))
            .with_context(|| format!("cannot list pid {}'s fds", self.pid))
    }

    /// One value from its /metrics (the sum of all series of that name
    /// whose labels contain `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> anyhow::Result<f64> {
        let (status, body) = http_get(self.http_addr, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        Ok(parse_metric(&body, name, labels))
    }
}

/// A running bridge child.
pub struct Bridge {
    child: Option<Child>,
    pub pid: u32,
    pub ws_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The last lines of its log, for error reports.
    log_tail: Arc<Mutex<VecDeque<String>>>,
    /// WARN and ERROR lines seen.
    pub warnings: Arc<Mutex<u64>>,
}

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

impl Bridge {
    /// Starts the bridge and waits until it listens and consumes: a
    /// scenario measures a bridge that is ready, never its start-up.
    pub async fn start(options: &BridgeOptions, names: &Names) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.work_dir)
            .with_context(|| format!("cannot create {}", options.work_dir.display()))?;
        let mut child = command(options, names)
            .spawn()
            .with_context(|| format!("cannot start {}", options.binary.display()))?;
        let pid = child.id();
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("the bridge's stderr was not captured"))?;
        let log_tail = Arc::new(Mutex::new(VecDeque::new()));
        let warnings = Arc::new(Mutex::new(0u64));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
        watch_log(stderr, log_tail.clone(), warnings.clone(), addr_tx);
        let mut bridge = Self {
            child: Some(child),
            pid,
            ws_addr: ([127, 0, 0, 1], 0).into(),
            http_addr: ([127, 0, 0, 1], 0).into(),
            log_tail,
            warnings,
        };
        bridge.wait_listening(addr_rx).await?;
        bridge.wait_ready().await?;
        Ok(bridge)
    }

    /// Takes the addresses from its "listening" log line (it binds port 0);
    /// kills it when the line does not come.
    async fn wait_listening(
        &mut self,
        addr_rx: std::sync::mpsc::Receiver<(SocketAddr, SocketAddr)>,
    ) -> anyhow::Result<()> {
        let addrs =
            tokio::task::spawn_blocking(move || addr_rx.recv_timeout(STARTUP_TIMEOUT)).await?;
        match addrs {
            Ok((ws, http)) => {
                self.ws_addr = ws;
                self.http_addr = http;
                Ok(())
            }
            Err(_) => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                self.kill();
                bail!(
                    "the bridge did not log \"notify-bridge listening\" within {STARTUP_TIMEOUT:?} \
                     (exit status: {status:?}); its log:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Ready means consuming from the broker (GET /readyz answers 200).
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(self.http_addr, "/readyz").await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let log = self.log_tail();
                self.kill();
                bail!(
                    "the bridge is not ready (GET /readyz) after {STARTUP_TIMEOUT:?}; its log:\n{log}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines the bridge logged, for an error report that says why it
    /// failed.
    pub fn log_tail(&self) -> String {
        self.log_tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// WARN/ERROR lines so far: the report counts them, a healthy run has about
    /// one.
    pub fn warnings(&self) -> u64 {
        self.warnings.lock().map(|w| *w).unwrap_or(0)
    }

    /// A copyable view for the scenarios, so the `Bridge` itself can stay with
    /// the caller that stops it.
    pub fn handle(&self) -> Handle {
        Handle {
            pid: self.pid,
            ws_addr: self.ws_addr,
            http_addr: self.http_addr,
        }
    }

    /// SIGTERM, then up to 10 s for a clean exit, then SIGKILL.
    pub async fn stop(&mut self) -> anyhow::Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => return Ok(status.code()),
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(anyhow!("the bridge ignored SIGTERM for 10 s; killed"));
                    }
                    Err(e) => return Err(anyhow!("cannot wait for the bridge: {e}")),
                }
            }
        })
        .await?;
        waited
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Bridge {
    /// Never leave a bridge behind (errors, panics).
    fn drop(&mut self) {
        self.kill();
    }
}

/// The bridge's command line: its own exchange, queue and ports, the
/// bench's JWT secret, a plain-text log the bench can read; then the inbox
/// switch and `--bridge-env`, which win.
fn command(options: &BridgeOptions, names: &Names) -> Command {
    let mut command = Command::new(&options.binary);
    command
        .current_dir(&options.work_dir)
        .env("NO_COLOR", "1")
        .env("NOTIFY_BRIDGE_AMQP__URL", &options.amqp_url)
        .env("NOTIFY_BRIDGE_AMQP__EXCHANGE", &names.exchange)
        .env("NOTIFY_BRIDGE_AMQP__QUEUE", &names.queue)
        .env("NOTIFY_BRIDGE_AMQP__PREFETCH", options.prefetch.to_string())
        .env("NOTIFY_BRIDGE_WEBSOCKET__LISTEN", "127.0.0.1:0")
        .env("NOTIFY_BRIDGE_WEBSOCKET__MAX_CONNECTIONS", "1000000")
        .env("NOTIFY_BRIDGE_HTTP__LISTEN", "127.0.0.1:0")
        .env("NOTIFY_BRIDGE_AUTH__MODE", "jwt")
        .env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET)
        .env("NOTIFY_BRIDGE_LOG__FORMAT", "text")
        .env("NOTIFY_BRIDGE_LOG__LEVEL", "info")
        .env("NOTIFY_BRIDGE_SHUTDOWN_TIMEOUT", "5s")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if options.inbox {
        command.env("NOTIFY_BRIDGE_INBOX__ENABLED", "true").env(
            "NOTIFY_BRIDGE_INBOX__PATH",
            options.work_dir.join("inbox.db"),
        );
    } else {
        command.env("NOTIFY_BRIDGE_INBOX__ENABLED", "false");
    }
    for (k, v) in &options.extra_env {
        command.env(k, v);
    }
    command
}

/// Reads the bridge's stderr on a thread of its own until it closes:
/// counts WARN/ERROR lines, keeps the last 40 lines for error reports, and
/// sends the addresses of the "listening" line once.
fn watch_log(
    stderr: std::process::ChildStderr,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    warnings: Arc<Mutex<u64>>,
    addr_tx: std::sync::mpsc::Sender<(SocketAddr, SocketAddr)>,
) {
    std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                if let Ok(mut w) = warnings.lock() {
                    *w += 1;
                }
            }
            if line.contains("notify-bridge listening") {
                if let (Some(ws), Some(http)) =
                    (field(&line, "ws_addr="), field(&line, "http_addr="))
                {
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send((ws, http));
                    }
                }
            }
            if let Ok(mut tail) = log_tail.lock() {
                if tail.len() == 40 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
}

/// The RabbitMQ node's pid (the Erlang VM, `beam.smp`), for its CPU use.
fn broker_pid() -> Option<u32> {
    proc::pids_named("beam.smp").first().copied()
}

/// Whose CPU a window measures as the thing under test.
#[derive(Clone, Debug)]
pub enum Subject {
    /// The bridge's process.
    Process(u32),
    /// Some of the bench's own threads: the baseline consumer's.
    Threads(Vec<u32>),
}

impl Subject {
    fn ticks(&self) -> Option<u64> {
        match self {
            Subject::Process(pid) => proc::cpu_ticks(Pid::Of(*pid)).ok(),
            Subject::Threads(tids) => proc::my_threads_cpu_ticks(tids).ok(),
        }
    }
}

/// CPU use of the subject (the bridge, or the baseline consumer), the
/// broker and the bench over a window.
pub struct CpuWindow {
    subject: Option<(Subject, u64)>,
    broker: Option<(Pid, u64)>,
    bench: Option<u64>,
    host: Option<proc::HostCpu>,
    started: std::time::Instant,
}

/// Percent of one core each used during the window (None: unknown).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// The subject's: the bridge, or the baseline consumer.
    pub bridge: Option<f64>,
    /// The subject's CPU time in the window, in seconds (for CPU per
    /// notification).
    pub bridge_seconds: Option<f64>,
    pub broker: Option<f64>,
    /// The bench's, without a subject's threads of its own.
    pub bench: Option<f64>,
    /// The share of the machine's CPU time the hypervisor gave elsewhere
    /// (steal), in percent: above a few percent the run is not one of a
    /// quiet machine.
    pub steal: Option<f64>,
}

impl CpuWindow {
    /// Notes the CPU ticks now, so `stop` can tell what the window cost.
    pub fn start(subject: Option<Subject>) -> Self {
        let at_start = |pid: Pid| Some((pid, proc::cpu_ticks(pid).ok()?));
        Self {
            subject: subject.and_then(|s| Some((s.clone(), s.ticks()?))),
            broker: broker_pid().and_then(|p| at_start(Pid::Of(p))),
            bench: proc::cpu_ticks(Pid::Myself).ok(),
            host: proc::HostCpu::now(),
            started: std::time::Instant::now(),
        }
    }

    /// Each one's CPU (% of a core) since `start`; the subject's also in
    /// seconds, for CPU per notification.
    pub fn stop(&self) -> CpuUse {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let subject = self
            .subject
            .as_ref()
            .and_then(|(s, t0)| Some(s.ticks()?.saturating_sub(*t0)));
        let broker = self
            .broker
            .and_then(|(pid, t0)| Some(proc::cpu_ticks(pid).ok()?.saturating_sub(t0)));
        let own_threads = match &self.subject {
            Some((Subject::Threads(_), _)) => subject.unwrap_or(0),
            _ => 0,
        };
        let bench = self.bench.and_then(|t0| {
            let spent = proc::cpu_ticks(Pid::Myself).ok()?.saturating_sub(t0);
            Some(spent.saturating_sub(own_threads))
        });
        // Ticks are 1/100 s: ticks per second are % of a core.
        let pct = |ticks: Option<u64>| ticks.map(|t| t as f64 / secs);
        CpuUse {
            bridge: pct(subject),
            bridge_seconds: subject.map(|t| t as f64 / 100.0),
            broker: pct(broker),
            bench: pct(bench),
            steal: self
                .host
                .zip(proc::HostCpu::now())
                .and_then(|(t0, t1)| t1.steal_percent_since(&t0)),
        }
    }
}

/// Runs `hook start PID` / `hook stop PID` around a measured window and
/// waits for it, so an outside tool (scripts/callgrind: `callgrind_control`)
/// can count exactly the window's work of the bridge.
pub async fn window_hook(hook: Option<&Path>, phase: &str, pid: Option<u32>) -> anyhow::Result<()> {
    let (Some(hook), Some(pid)) = (hook, pid) else {
        return Ok(());
    };
    let status = tokio::process::Command::new(hook)
        .arg(phase)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status()
        .await
        .with_context(|| format!("cannot run --window-hook {}", hook.display()))?;
    if !status.success() {
        bail!("--window-hook {} {phase} {pid}: {status}", hook.display());
    }
    Ok(())
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

fn parse_metric(body: &str, name: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A GET of the bridge's side port (testkit's hyper client): status and
/// body, within 5 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(5), testkit::http::get(addr, path))
        .await
        .map_err(|_| anyhow!("GET {path}: no answer within 5 s"))?
        .map_err(|e| anyhow!("GET {path}: {e}"))
}

/// Deletes this run's queues and exchanges (the bridge's and the
/// baseline's); errors are reported, not fatal.
pub async fn delete_topology(amqp_url: &str, names: &Names) -> anyhow::Result<()> {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(amqp_url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("cannot reach the broker to clean up: timed out"))?
    .context("cannot reach the broker to clean up")?;
    let ch = conn.create_channel().await?;
    for queue in [&names.queue, &names.baseline_queue] {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("cannot delete queue {queue}"))?;
    }
    for exchange in [&names.exchange, &names.baseline_exchange] {
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .with_context(|| format!("cannot delete exchange {exchange}"))?;
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

/// A scratch folder under the output folder, removed at the end.
pub fn work_dir(out_dir: &Path, names: &Names) -> PathBuf {
    out_dir.join(format!("run-{}", names.run_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line_and_metrics() {
        let line = strip_ansi(
            "2026-01-01T00:00:00Z  INFO notify_bridge: notify-bridge listening \x1b[3mws_addr\x1b[0m\x1b[2m=\x1b[0m127.0.0.1:4000 path=/ws http_addr=127.0.0.1:4001",
        );
        assert_eq!(
            field(&line, "ws_addr="),
            Some("127.0.0.1:4000".parse().unwrap())
        );
        assert_eq!(
            field(&line, "http_addr="),
            Some("127.0.0.1:4001".parse().unwrap())
        );
        let body = "# HELP x\nnotify_bridge_messages_total{outcome=\"delivered\"} 5\nnotify_bridge_messages_total{outcome=\"invalid\"} 1\nnotify_bridge_connections 3\n";
        assert_eq!(
            parse_metric(body, "notify_bridge_messages_total", "delivered"),
            5.0
        );
        assert_eq!(parse_metric(body, "notify_bridge_messages_total", ""), 6.0);
        assert_eq!(parse_metric(body, "notify_bridge_connections", ""), 3.0);
    }
}
