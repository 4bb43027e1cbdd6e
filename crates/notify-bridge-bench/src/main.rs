//! notify-bridge-bench: drives a notify-bridge over loopback the way users
//! do (real WebSocket clients with JWTs, real AMQP publishes with confirms)
//! and reports throughput, end-to-end latency, loss, duplicates, memory and
//! open files, each throughput also as a ratio to a bare lapin consumer.
//!
//!     cargo build --release --workspace   # the daemon and the bench
//!     target/release/notify-bridge-bench SCENARIO [OPTIONS]
//!
//! Scenarios: unicast, broadcast, idle, slow-client, baseline, soak,
//! replay-storm, cluster.
//! It starts target/release/notify-bridge itself (its own exchange and
//! queue, ports on 127.0.0.1:0), stops it and deletes the topology at the
//! end, also on errors and Ctrl-C. See docs/performance.md.
//!
//! Modules: `scenarios` (what each scenario does, a file each under
//! `scenarios/`), `clients` (WebSocket clients, publisher), `baseline` (the
//! bare consumer) and `floor` (its `--floor` work), `stats` (histogram,
//! loss and duplicates, progress), `report` (table, JSON line, SVG),
//! `bridge` (the child process, /proc, /metrics, topology clean-up).

mod baseline;
mod bridge;
mod clients;
mod floor;
mod receipts;
mod report;
mod scenarios;
mod stats;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, ValueEnum};
use tokio::sync::Mutex;

use crate::scenarios::{Ctx, Options};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// N users with one socket each, M messages to random users at rate R.
    Unicast,
    /// N sockets, M broadcast messages: frames/s, latency to the last socket.
    Broadcast,
    /// N idle sockets: bridge RSS and fds per connection.
    Idle,
    /// Unicast while some clients never read: others' p99, 1013 closes.
    SlowClient,
    /// A bare lapin consumer (decode JSON + ack) on the same stream.
    Baseline,
    /// Steady traffic with connection churn: RSS and fds must stay flat.
    Soak,
    /// Inbox on, paced unicast while one user with a full inbox reconnects
    /// with since=0 in a loop: others' commit latency with and without.
    ReplayStorm,
    /// Three instances in one cluster (PostgreSQL inbox, users on two of
    /// them), then one instance with SQLite and one without the inbox, the
    /// same paced unicast stream: latency, CPU per instance.
    Cluster,
}

#[derive(Parser, Debug)]
#[command(
    name = "notify-bridge-bench",
    about = "Benchmarks notify-bridge over loopback: throughput, latency, memory per socket",
    after_help = "Defaults depend on the scenario (see docs/performance.md). \
                  Prints a table, then one line `RESULT {json}`; plots go to OUT_DIR/<scenario>.svg."
)]
struct Cli {
    scenario: Scenario,
    /// Users (one socket each); sockets for broadcast and idle.
    #[arg(long, short = 'n')]
    users: Option<u64>,
    /// Messages to publish (unicast, baseline, broadcast).
    #[arg(long, short = 'm')]
    messages: Option<u64>,
    /// Publish rate in msg/s; 0 = as fast as confirms allow.
    #[arg(long, short = 'r')]
    rate: Option<f64>,
    /// Seconds: per phase for slow-client, total for soak.
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up messages before measuring (unicast, baseline).
    #[arg(long, default_value_t = 1000)]
    warmup: u64,
    /// Publisher confirms in flight.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Concurrent publishing loops on the publisher's channel.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// amqp.prefetch for the bridge and the baseline consumer.
    #[arg(long, default_value_t = 200)]
    prefetch: u16,
    /// Padding added to each payload, in bytes.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Run the bridge with the inbox enabled (store in a scratch folder).
    #[arg(long)]
    inbox: bool,
    /// unicast: the bridge with receipts.enabled, and a durable queue bound
    /// to notifications.result that the bench drains (docs/performance.md).
    #[arg(long)]
    receipts: bool,
    /// Skip the baseline run that unicast and broadcast do first.
    #[arg(long)]
    no_baseline: bool,
    /// unicast: also run the floor, the bare consumer with the bridge's
    /// decoder and one WebSocket frame written per message (and with
    /// --inbox each burst committed to SQLite first): what any bridge pays
    /// (docs/performance.md).
    #[arg(long)]
    floor: bool,
    /// baseline and unicast: the baseline (and floor) consume a quorum
    /// queue with single active consumer, as cluster mode's ingest queue:
    /// the latency of that leg alone.
    #[arg(long)]
    quorum: bool,
    /// Client sockets per source address (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value_t = 1000)]
    per_source: usize,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Seconds the idle sockets are held before measuring the end RSS.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// slow-client: clients that never read.
    #[arg(long, default_value_t = 10)]
    slow: u64,
    /// slow-client: msg/s addressed to the slow users (both phases).
    #[arg(long, default_value_t = 2000.0)]
    slow_rate: f64,
    /// slow-client: payload padding of the slow users' messages.
    #[arg(long, default_value_t = 16384)]
    slow_payload: usize,
    /// soak: connects (and as many disconnects) per second.
    #[arg(long, default_value_t = 20.0)]
    churn: f64,
    /// replay-storm: entries in the reconnecting user's inbox.
    #[arg(long, default_value_t = 1000)]
    storm_entries: u64,
    /// replay-storm: payload padding of those entries, in bytes.
    #[arg(long, default_value_t = 4096)]
    storm_payload: usize,
    /// Seconds without progress after which a run stops waiting for frames.
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// Seed of the user choice, so runs are repeatable.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Hard bound on the whole scenario, in seconds.
    #[arg(long, default_value_t = 900.0)]
    max_seconds: f64,
    /// Exit with code 3 when messages were lost or duplicated, sockets died
    /// or fds leaked (the smoke test uses it).
    #[arg(long)]
    strict: bool,
    /// The broker, loopback only (default: $NOTIFY_BRIDGE_BENCH_AMQP_URL,
    /// else amqp://guest:guest@127.0.0.1:5672/%2f).
    #[arg(long)]
    amqp_url: Option<String>,
    /// The PostgreSQL server for the cluster scenario, loopback only
    /// (default: $NOTIFY_BRIDGE_BENCH_POSTGRES_URL; `bash scripts/postgres url`).
    #[arg(long)]
    postgres_url: Option<String>,
    /// The bridge binary (default: notify-bridge next to this binary).
    #[arg(long)]
    bridge_bin: Option<PathBuf>,
    /// Extra bridge environment, e.g. NOTIFY_BRIDGE_WEBSOCKET__SEND_QUEUE=256 or
    /// TOKIO_WORKER_THREADS=1; repeatable.
    #[arg(long = "bridge-env", value_name = "KEY=VALUE")]
    bridge_env: Vec<String>,
    /// A program run as `HOOK start PID` and `HOOK stop PID` (awaited)
    /// around the bridge's measured unicast window; scripts/callgrind uses
    /// it to count only that window's instructions.
    #[arg(long, value_name = "HOOK")]
    window_hook: Option<PathBuf>,
    /// Where plots and scratch files go.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

impl Cli {
    fn options(&self) -> anyhow::Result<Options> {
        use Scenario::*;
        let (users, messages, rate, duration) = match self.scenario {
            Unicast | Baseline => (1000, 100_000, 0.0, 0.0),
            Broadcast => (10_000, 100, 0.0, 0.0),
            Idle => (15_000, 0, 0.0, 0.0),
            SlowClient => (1000, 0, 2000.0, 15.0),
            Soak => (1000, 0, 500.0, 60.0),
            ReplayStorm => (1000, 0, 1000.0, 10.0),
            Cluster => (1000, 20_000, 2000.0, 0.0),
        };
        let amqp_url = self.amqp_url.clone().unwrap_or_else(|| {
            std::env::var("NOTIFY_BRIDGE_BENCH_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
        });
        if !is_loopback(&amqp_url) {
            anyhow::bail!("--amqp-url must point at a loopback broker (127.0.0.0/8 or localhost)");
        }
        let postgres_url = self
            .postgres_url
            .clone()
            .or_else(|| std::env::var("NOTIFY_BRIDGE_BENCH_POSTGRES_URL").ok())
            .filter(|u| !u.is_empty());
        if postgres_url.as_deref().is_some_and(|u| !is_loopback(u)) {
            anyhow::bail!(
                "--postgres-url must point at a loopback server (127.0.0.0/8 or localhost)"
            );
        }
        let bridge_env = self.bridge_env()?;
        Ok(Options {
            users: self.users.unwrap_or(users).max(1),
            messages: self.messages.unwrap_or(messages).max(1),
            rate: self.rate.unwrap_or(rate).max(0.0),
            duration: Duration::from_secs_f64(self.duration.unwrap_or(duration).max(0.1)),
            warmup: if matches!(self.scenario, Unicast | Baseline | Cluster) {
                self.warmup
            } else {
                0
            },
            window: self.window.max(1),
            publishers: self.publishers.max(1),
            prefetch: self.prefetch,
            payload_bytes: self.payload_bytes,
            inbox: self.inbox || self.scenario == ReplayStorm,
            receipts: self.receipts,
            baseline: !self.no_baseline,
            floor: self.floor,
            quorum: self.quorum,
            per_source: self.per_source.max(1),
            connect_concurrency: self.connect_concurrency.max(1),
            hold: Duration::from_secs_f64(self.hold.max(0.0)),
            slow: self.slow.max(1),
            slow_rate: self.slow_rate.max(1.0),
            slow_payload: self.slow_payload,
            churn: self.churn.max(0.0),
            storm_entries: self.storm_entries.max(1),
            storm_payload: self.storm_payload,
            drain_timeout: Duration::from_secs_f64(self.drain_timeout.max(0.5)),
            seed: self.seed,
            amqp_url,
            postgres_url,
            bridge_bin: self.bridge_bin.clone(),
            bridge_env,
            window_hook: self.window_hook.clone(),
            out_dir: self.out_dir.clone(),
        })
    }

    /// The `--bridge-env KEY=VALUE` pairs for the child's environment,
    /// checked here so that a wrong one fails before any bridge starts;
    /// `--receipts` adds the switch it needs.
    fn bridge_env(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut bridge_env = Vec::new();
        for kv in &self.bridge_env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--bridge-env {kv:?}: expected KEY=VALUE"))?;
            if !(k.starts_with("NOTIFY_BRIDGE_") || k == "TOKIO_WORKER_THREADS" || k == "RUST_LOG")
            {
                anyhow::bail!(
                    "--bridge-env {k}: only NOTIFY_BRIDGE_*, TOKIO_WORKER_THREADS and RUST_LOG"
                );
            }
            bridge_env.push((k.to_string(), v.to_string()));
        }
        if self.receipts {
            bridge_env.push(("NOTIFY_BRIDGE_RECEIPTS__ENABLED".into(), "true".into()));
        }
        Ok(bridge_env)
    }
}

fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or("");
    let host = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let host = host.split(':').next().unwrap_or("");
    host == "localhost" || host.starts_with("127.")
}

/// Parse the command line, run the scenario within its bounds, clean up
/// whatever it left, report: each a step of its own below.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = match cli.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("notify-bridge-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let ctx = Ctx {
        names: bridge::Names::new(),
        clock: stats::Clock::new(),
        progress: Arc::new(stats::Progress::default()),
        bridge: Arc::new(Mutex::new(None)),
        opts,
    };
    let printer = ctx.progress.spawn_printer();
    let outcome = run_bounded(&cli, &ctx).await;
    drop(printer);
    let bridge_left = clean_up(cli.scenario, &ctx).await;
    finish(&cli, outcome, bridge_left)
}

/// The scenario's own function.
async fn run(scenario: Scenario, ctx: &Ctx) -> anyhow::Result<report::Report> {
    match scenario {
        Scenario::Unicast => scenarios::unicast(ctx).await,
        Scenario::Broadcast => scenarios::broadcast(ctx).await,
        Scenario::Idle => scenarios::idle(ctx).await,
        Scenario::SlowClient => scenarios::slow_client(ctx).await,
        Scenario::Baseline => scenarios::baseline(ctx).await,
        Scenario::Soak => scenarios::soak(ctx).await,
        Scenario::ReplayStorm => scenarios::replay_storm(ctx).await,
        Scenario::Cluster => scenarios::cluster(ctx).await,
    }
}

/// The scenario, stopped by `--max-seconds` or by Ctrl-C / SIGTERM (the
/// clean-up after it must run in every case).
async fn run_bounded(cli: &Cli, ctx: &Ctx) -> anyhow::Result<report::Report> {
    let bound = Duration::from_secs_f64(cli.max_seconds.max(1.0));
    tokio::select! {
        r = tokio::time::timeout(bound, run(cli.scenario, ctx)) => match r {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("the scenario did not finish within --max-seconds {}", cli.max_seconds)),
        },
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    }
}

/// What the stopped bridge left for the report: its WARN/ERROR line count
/// and its last log lines.
#[derive(Default)]
struct BridgeLeft {
    warnings: u64,
    log_tail: String,
}

/// Cleans up whatever happened: the bridge, the broker topology, scratch
/// files (and the cluster's schema).
async fn clean_up(scenario: Scenario, ctx: &Ctx) -> BridgeLeft {
    let mut left = BridgeLeft::default();
    if let Some(mut bridge) = ctx.bridge.lock().await.take() {
        left.warnings = bridge.warnings();
        left.log_tail = bridge.log_tail();
        match bridge.stop().await {
            Ok(Some(0)) | Ok(None) => {}
            Ok(Some(code)) => eprintln!("notify-bridge-bench: the bridge exited with code {code}"),
            Err(e) => eprintln!("notify-bridge-bench: {e:#}"),
        }
    }
    if let Err(e) = bridge::delete_topology(&ctx.opts.amqp_url, &ctx.names).await {
        eprintln!("notify-bridge-bench: clean-up: {e:#}");
    }
    if scenario == Scenario::Cluster {
        let postgres_url = ctx.opts.postgres_url.as_deref();
        let cleaned = scenarios::cluster_cleanup(&ctx.opts.amqp_url, postgres_url, &ctx.names);
        if let Err(e) = cleaned.await {
            eprintln!("notify-bridge-bench: cluster clean-up: {e:#}");
        }
    }
    let _ = std::fs::remove_dir_all(bridge::work_dir(&ctx.opts.out_dir, &ctx.names));
    left
}

/// Prints the report (or the error and the bridge's log) and chooses the
/// exit code: 3 for `--strict` with problems, 1 for a failed run.
fn finish(cli: &Cli, outcome: anyhow::Result<report::Report>, left: BridgeLeft) -> ExitCode {
    match outcome {
        Ok(mut report) => {
            report.param("bridge_warnings", left.warnings);
            report.print();
            if cli.strict && !report.problems.is_empty() {
                for p in &report.problems {
                    eprintln!("notify-bridge-bench: problem: {p}");
                }
                return ExitCode::from(3);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "notify-bridge-bench: {} failed: {e:#}",
                format!("{:?}", cli.scenario).to_lowercase()
            );
            if !left.log_tail.is_empty() {
                eprintln!("--- the bridge's last log lines ---\n{}", left.log_tail);
            }
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_brokers() {
        assert!(is_loopback("amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert!(is_loopback("amqp://localhost"));
        assert!(!is_loopback("amqp://guest:guest@10.0.0.1:5672/%2f"));
        assert!(!is_loopback("amqp://rabbit.example.com"));
        assert!(is_loopback(
            "postgres://notify_bridge@127.0.0.1:55432/notify_bridge"
        ));
        assert!(!is_loopback("postgres://db.example.com/notify_bridge"));
    }
}
