//! The real `notify-bridge` binary as a child process, for the tests that
//! need what only a process has: signals, SIGKILL, exit codes, its log on
//! stderr, its resident memory and open files.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use testkit::proc::Pid;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
    time::Instant,
};

use super::{
    accepted, amqp_url, delete_topology, http_get, request, token, unique, Client, SECRET,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_notify-bridge");
/// How long a command that should fail (or listen) at once may take.
pub const COMMAND_WAIT: Duration = Duration::from_secs(20);

/// A fresh working directory (so no config file is found), removed on
/// drop, also when the test panics.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("notify-bridge-process-test")
            .tempdir()
            .unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The binary in `dir`, with none of the caller's `NOTIFY_BRIDGE_*` or
/// `RUST_LOG` variables leaking in.
pub fn bridge_command(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NOTIFY_BRIDGE_") {
            command.env_remove(key);
        }
    }
    command
}

pub use testkit::strip_ansi;

/// The value after `key=` in a log line.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"').to_string())
}

/// Where a daemon lives: its working directory, queue and exchange. A
/// restarted daemon gets the same placement, so it finds its queue (and its
/// inbox file) again.
#[derive(Clone)]
pub struct Placement {
    pub dir: Arc<TempDir>,
    pub queue: String,
    pub exchange: String,
}

impl Placement {
    pub fn new() -> Self {
        let name = unique("process");
        Self {
            dir: Arc::new(TempDir::new()),
            queue: format!("notify-bridge.{name}"),
            exchange: format!("{name}.exchange"),
        }
    }
}

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub ws_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Every line the daemon wrote, stdout and stderr, ANSI stripped.
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub place: Placement,
}

impl Daemon {
    /// Starts the binary configured only by environment variables, in a
    /// fresh placement, and waits until it consumes from the broker.
    pub async fn start(extra_env: &[(&str, &str)]) -> Self {
        Self::start_at(Placement::new(), extra_env).await
    }

    /// Starts the binary at `place` and waits until it consumes.
    pub async fn start_at(place: Placement, extra_env: &[(&str, &str)]) -> Self {
        let daemon = Self::start_unready_at(place, extra_env).await;
        daemon.wait_ready().await;
        daemon
    }

    /// Starts the binary at `place` and waits only until it listens.
    pub async fn start_unready_at(place: Placement, extra_env: &[(&str, &str)]) -> Self {
        let mut command = bridge_command(place.dir.path());
        command
            .env("NOTIFY_BRIDGE_AMQP__URL", amqp_url())
            .env("NOTIFY_BRIDGE_AMQP__EXCHANGE", &place.exchange)
            .env("NOTIFY_BRIDGE_AMQP__QUEUE", &place.queue)
            .env("NOTIFY_BRIDGE_WEBSOCKET__LISTEN", "127.0.0.1:0")
            .env("NOTIFY_BRIDGE_HTTP__LISTEN", "127.0.0.1:0")
            .env("NOTIFY_BRIDGE_AUTH__JWT_SECRET", SECRET)
            .env("NOTIFY_BRIDGE_LOG__LEVEL", "info")
            .env("NOTIFY_BRIDGE_SHUTDOWN_TIMEOUT", "5s")
            .envs(extra_env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary starts");

        // Both pipes, line by line, into one log (the bridge logs to
        // stderr; anything on stdout would be a bug a test wants to see).
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (lines_tx, mut lines) = mpsc::unbounded_channel();
        let stdout: Box<dyn tokio::io::AsyncRead + Unpin + Send> =
            Box::new(child.stdout.take().unwrap());
        for pipe in [stdout, Box::new(child.stderr.take().unwrap())] {
            let (collected, lines_tx) = (stderr.clone(), lines_tx.clone());
            tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let line = strip_ansi(&line);
                    collected.lock().unwrap().push(line.clone());
                    let _ = lines_tx.send(line);
                }
            });
        }
        drop(lines_tx);

        let listening = tokio::time::timeout(COMMAND_WAIT, async {
            while let Some(line) = lines.recv().await {
                if let (Some(ws), Some(http)) = (field(&line, "ws_addr"), field(&line, "http_addr"))
                {
                    return Some((ws, http));
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some((ws, http)) = listening else {
            panic!(
                "no ws_addr=… http_addr=… line on stderr:\n{}",
                stderr.lock().unwrap().join("\n")
            );
        };
        Self {
            child,
            ws_addr: ws.parse().expect("ws_addr is IP:PORT"),
            http_addr: http.parse().expect("http_addr is IP:PORT"),
            stderr,
            place,
        }
    }

    /// Waits until `/readyz` says 200 (it consumes from the broker).
    pub async fn wait_ready(&self) {
        let daemon = self;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(daemon.http_addr, "/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the daemon is not ready:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The pid, or None once the process has exited.
    pub fn pid_or_none(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the daemon is still running")
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        testkit::proc::rss_bytes(Pid::Of(self.pid())).expect("the daemon's RSS") / 1024
    }

    /// Open file descriptors.
    pub fn open_fds(&self) -> usize {
        testkit::proc::open_fds(Pid::Of(self.pid())).expect("the daemon's fds") as usize
    }

    /// User plus system CPU time in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        testkit::proc::cpu_ticks(Pid::Of(self.pid())).expect("the daemon's CPU time")
    }

    /// The CPU ticks the daemon spends over the next `period`.
    pub async fn cpu_ticks_during(&self, period: Duration) -> u64 {
        let before = self.cpu_ticks();
        tokio::time::sleep(period).await;
        self.cpu_ticks() - before
    }

    /// Lowers the daemon's open-file limit (`prlimit`, util-linux) to what
    /// it has open now plus `spare`, for out-of-descriptors tests.
    pub fn limit_open_files(&self, spare: usize) {
        let limit = self.open_fds() + spare;
        let status = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &self.pid().to_string(),
                &format!("--nofile={limit}:"),
            ])
            .status()
            .expect("prlimit (util-linux) is installed");
        assert!(status.success());
    }

    /// Out of descriptors with `waiting` clients (20) queued behind them:
    /// the accept loop whose warning contains `warning` backs off instead
    /// of spinning (a few CPU ticks in 2 s, not ~200: a whole core), logs
    /// rate-limited, and keeps at least 15 of them waiting.
    pub async fn assert_accept_backs_off<T>(
        &self,
        warning: &str,
        waiting: &[tokio::task::JoinHandle<T>],
    ) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let spent = self.cpu_ticks_during(Duration::from_secs(2)).await;
        let log = self.log();
        let warnings = log.matches(warning).count();
        let still_waiting = waiting.iter().filter(|t| !t.is_finished()).count();
        eprintln!(
            "{warning:?} out of descriptors: {spent} CPU ticks in 2 s, {warnings} warning(s), \
             {still_waiting} of {} clients waiting",
            waiting.len()
        );
        assert!(
            spent < 30,
            "{spent} ticks of CPU in 2 s while out of descriptors"
        );
        assert!(warnings >= 1, "no warning logged:\n{log}");
        assert!(warnings <= 2, "the warning is not rate-limited:\n{log}");
        assert!(
            still_waiting >= 15,
            "only {still_waiting} of {} were kept waiting",
            waiting.len()
        );
    }

    /// SIGTERM, a clean exit, then the whole log once the pipes are drained;
    /// removes the daemon's queue and exchange.
    pub async fn terminate(mut self) -> String {
        let pid = self.pid().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
        // The readers drain the pipes after the exit.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = self.log();
        self.cleanup().await;
        log
    }

    /// SIGKILL, as a crash or the OOM killer would; waits for the exit.
    pub async fn kill_9(&mut self) {
        self.child.kill().await.expect("SIGKILL the daemon");
    }

    pub async fn connect(&self, user: &str) -> Client {
        let url = format!("ws://{}/ws?token={}", self.ws_addr, token(user, &[]));
        let (client, _, welcome) = accepted(request(&url, &[])).await;
        assert_eq!(welcome["user_id"], user);
        client
    }

    /// Deletes the daemon's queue and exchange from the shared broker.
    pub async fn cleanup(self) {
        delete_topology(&self.place.queue, &self.place.exchange).await;
    }
}
