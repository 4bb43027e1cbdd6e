//! The scenarios of issue 5: what each one sets up, drives, waits for and
//! reports, one file each under `scenarios/`; here what they share (the
//! options, the context, driving a unicast stream, the rows every run
//! reports). Each is bounded in count and time and leaves nothing behind
//! (the caller stops the bridge and deletes the topology).

use std::{
    path::PathBuf,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use anyhow::bail;
use tokio::sync::Mutex;

mod replay_storm;
pub use replay_storm::replay_storm;

mod cluster;
pub use cluster::{cleanup as cluster_cleanup, cluster};

mod broadcast;
mod idle;
mod slow_client;
mod soak;
mod unicast;
pub use broadcast::broadcast;
pub use idle::idle;
pub use slow_client::slow_client;
pub use soak::soak;
pub use unicast::{baseline, unicast};

use crate::{
    baseline::{Baseline, Extra},
    bridge::{self, Bridge, BridgeOptions, Handle, Names},
    clients::{self, Publisher, Reader, Recorder, Recorders, Ws},
    report::{self, mib, Report},
    stats::{Clock, Progress, Rng},
};

/// Options after per-scenario defaults were applied.
#[derive(Clone, Debug)]
pub struct Options {
    pub users: u64,
    pub messages: u64,
    pub rate: f64,
    pub duration: Duration,
    pub warmup: u64,
    pub window: usize,
    pub publishers: usize,
    pub prefetch: u16,
    pub payload_bytes: usize,
    pub inbox: bool,
    /// unicast: receipts on, drained from a queue of the bench's.
    pub receipts: bool,
    pub baseline: bool,
    /// unicast: the floor run as well (`floor.rs`).
    pub floor: bool,
    /// baseline, unicast: the baseline consumes a quorum queue, as the
    /// cluster's ingest queue is.
    pub quorum: bool,
    pub per_source: usize,
    pub connect_concurrency: usize,
    pub hold: Duration,
    pub slow: u64,
    pub slow_rate: f64,
    pub slow_payload: usize,
    pub churn: f64,
    /// replay-storm: entries in the reconnecting user's inbox, and their
    /// payload padding.
    pub storm_entries: u64,
    pub storm_payload: usize,
    pub drain_timeout: Duration,
    pub seed: u64,
    pub amqp_url: String,
    /// The PostgreSQL server of the cluster scenario (it makes a schema of
    /// its own there).
    pub postgres_url: Option<String>,
    pub bridge_bin: Option<PathBuf>,
    pub bridge_env: Vec<(String, String)>,
    /// Run as `HOOK start PID` / `HOOK stop PID` around the bridge's
    /// measured unicast window (scripts/callgrind).
    pub window_hook: Option<PathBuf>,
    pub out_dir: PathBuf,
}

/// What every scenario shares; `bridge` is kept here so that the caller
/// can stop it whatever happens to the scenario.
pub struct Ctx {
    pub opts: Options,
    pub names: Names,
    pub clock: Clock,
    pub progress: Arc<Progress>,
    pub bridge: Arc<Mutex<Option<Bridge>>>,
}

impl Ctx {
    async fn start_bridge(&self) -> anyhow::Result<Handle> {
        self.progress.phase("starting bridge");
        let binary = match &self.opts.bridge_bin {
            Some(b) => b.clone(),
            None => bridge::default_binary()?,
        };
        let options = BridgeOptions {
            binary,
            amqp_url: self.opts.amqp_url.clone(),
            prefetch: self.opts.prefetch,
            inbox: self.opts.inbox,
            work_dir: bridge::work_dir(&self.opts.out_dir, &self.names),
            extra_env: self.opts.bridge_env.clone(),
        };
        let started = Bridge::start(&options, &self.names).await?;
        let handle = started.handle();
        eprintln!(
            "bench: bridge pid {} ws {} http {} (exchange {}, queue {}{})",
            handle.pid,
            handle.ws_addr,
            handle.http_addr,
            self.names.exchange,
            self.names.queue,
            if self.opts.inbox { ", inbox on" } else { "" }
        );
        *self.bridge.lock().await = Some(started);
        Ok(handle)
    }

    fn recorders(&self, runs: Vec<Recorder>) -> Arc<Recorders> {
        Arc::new(Recorders {
            clock: self.clock,
            runs: runs.into_iter().map(Arc::new).collect(),
            progress: self.progress.clone(),
        })
    }

    fn tokens(&self) -> impl Fn(u64) -> anyhow::Result<String> {
        let auth = notify_bridge::config::AuthConfig {
            jwt_secret: Some(bridge::SECRET.into()),
            ..Default::default()
        };
        move |user| {
            notify_bridge::auth::mint(&auth, &user.to_string(), &[], Duration::from_secs(4 * 3600))
        }
    }

    /// Connects users `first..first+count`, the i-th from source index
    /// `source_offset + i`.
    async fn connect(
        &self,
        handle: &Handle,
        first: u64,
        count: u64,
        source_offset: usize,
        recv_buffer: Option<u32>,
    ) -> anyhow::Result<Vec<(u64, Ws)>> {
        let users = (0..count)
            .map(|i| (first + i, source_offset + i as usize))
            .collect();
        let tokens = self.tokens();
        clients::connect_many(
            handle.ws_addr,
            users,
            self.opts.per_source,
            self.opts.connect_concurrency,
            &tokens,
            recv_buffer,
            &self.progress,
        )
        .await
    }

    fn plot_path(&self, name: &str) -> PathBuf {
        self.opts.out_dir.join(format!("{name}.svg"))
    }

    /// The bench and the bridge each stay below the per-process fd limit.
    fn check_fd_budget(&self, sockets: u64) -> anyhow::Result<()> {
        let limit = testkit::proc::open_files_limit().unwrap_or(1024);
        if sockets + 200 > limit {
            bail!(
                "{sockets} sockets need more than this process's limit of {limit} open files \
                 (minus 200 for the runtime and the broker): the bench and the bridge each \
                 hold one fd per socket. Use fewer (--users)."
            );
        }
        Ok(())
    }
}

fn base_report(ctx: &Ctx, name: &str) -> Report {
    let mut r = Report::new(name);
    r.param("inbox", ctx.opts.inbox);
    r.param("prefetch", ctx.opts.prefetch);
    r
}

/// Waits until `count()` reaches `expected`, or stops moving for
/// `idle`; returns the final count.
async fn wait_for(count: impl Fn() -> u64, expected: u64, idle: Duration) -> u64 {
    let mut last = count();
    let mut last_change = tokio::time::Instant::now();
    loop {
        let now = count();
        if now >= expected {
            return now;
        }
        if now != last {
            last = now;
            last_change = tokio::time::Instant::now();
        } else if last_change.elapsed() > idle {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn per_sec(count: u64, from_ns: u64, to_ns: u64) -> f64 {
    let secs = to_ns.saturating_sub(from_ns) as f64 / 1e9;
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// The users addressed by the unicast stream: the same for the baseline
/// and the bridge, from the seed.
fn unicast_targets(seed: u64, messages: u64, users: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..messages).map(|_| 1 + rng.below(users) as u32).collect()
}

struct Measured {
    rate: f64,
    received: u64,
    duplicates: u64,
    strays: u64,
    cdf: Vec<(f64, f64)>,
    summary: crate::stats::Summary,
    published: clients::Published,
    cpu: bridge::CpuUse,
}

impl Measured {
    /// What a unicast run's recorder holds once its stream was waited for;
    /// the rate is from the first publish to the last frame.
    fn of(rec: &Recorder, published: clients::Published, cpu: bridge::CpuUse) -> Self {
        let received = rec.seqs.unique();
        let cdf = rec.latency.cdf();
        Self {
            rate: per_sec(received, published.first_ns, rec.last_receive.get()),
            received,
            duplicates: rec.seqs.duplicates(),
            strays: rec.seqs.strays(),
            cdf,
            summary: rec.latency.summary(),
            published,
            cpu,
        }
    }

    /// How many latencies were above `nanos` (to the histogram's
    /// resolution).
    fn over(&self, nanos: u64) -> u64 {
        let within = self
            .cdf
            .iter()
            .take_while(|(v, _)| *v <= nanos as f64)
            .last()
            .map_or(0.0, |(_, f)| *f);
        ((1.0 - within) * self.summary.count as f64).round() as u64
    }

    /// The subject's CPU per message received, in µs (None: unknown or
    /// nothing received).
    fn cpu_us_per_message(&self) -> Option<f64> {
        let secs = self.cpu.bridge_seconds.filter(|_| self.received > 0)?;
        Some(secs * 1e6 / self.received as f64)
    }
}

/// A nacked publish is a message the run cannot count as lost or
/// delivered: the run fails instead.
fn ensure_confirmed(published: &clients::Published) -> anyhow::Result<()> {
    if published.nacked > 0 {
        bail!("the broker nacked {} publishes", published.nacked);
    }
    Ok(())
}

/// Publishes one message per entry of `targets` (to that user) as run
/// `run`, paced at `--rate`: the unicast stream every unicast-like
/// scenario measures.
pub(super) async fn publish_to_users(
    ctx: &Ctx,
    publisher: &Publisher,
    targets: &[u32],
    run: usize,
) -> anyhow::Result<clients::Published> {
    let o = &ctx.opts;
    publisher
        .run(
            targets.len() as u64,
            o.rate,
            o.window,
            ctx.clock,
            &ctx.progress,
            |s, t, out| {
                let user = targets[s as usize];
                clients::body(
                    out,
                    &format!(r#""user_id":{user}"#),
                    run,
                    s,
                    t,
                    o.payload_bytes,
                )
            },
        )
        .await
}

/// Unmeasured messages (run 0) to every user in turn, unpaced, until they
/// arrived or stopped arriving, so that first-use costs stay out of the
/// measured window. Nothing with `--warmup 0`.
async fn warm_up(ctx: &Ctx, publisher: &Publisher, phase: &str) -> anyhow::Result<()> {
    let o = &ctx.opts;
    if o.warmup == 0 {
        return Ok(());
    }
    ctx.progress.phase(phase);
    let before = ctx.progress.received.load(Relaxed);
    let users = o.users;
    publisher
        .run(
            o.warmup,
            0.0,
            o.window,
            ctx.clock,
            &ctx.progress,
            |s, t, out| {
                let user = 1 + s % users;
                clients::body(
                    out,
                    &format!(r#""user_id":{user}"#),
                    0,
                    s,
                    t,
                    o.payload_bytes,
                )
            },
        )
        .await?;
    let progress = ctx.progress.clone();
    wait_for(
        || progress.received.load(Relaxed) - before,
        o.warmup,
        o.drain_timeout,
    )
    .await;
    Ok(())
}

/// Writes the latency CDF plot `<name>.svg` of `runs` and lists it in the
/// report, as every scenario's last step.
pub(super) fn plot_latency(
    ctx: &Ctx,
    r: &mut Report,
    name: &str,
    title: &str,
    runs: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let path = ctx.plot_path(name);
    report::latency_plot(&path, title, runs)?;
    r.plots.push(path.display().to_string());
    Ok(())
}

/// The latency CDFs of some of `recorders`' runs, each with its legend.
pub(super) fn run_cdfs(
    recorders: &Recorders,
    runs: &[(&str, usize)],
) -> Vec<(String, Vec<(f64, f64)>)> {
    runs.iter()
        .map(|(label, run)| (label.to_string(), recorders.runs[*run].latency.cdf()))
        .collect()
}

/// Publishes the unicast stream (run 1) after `warmup` messages (run 0)
/// to `exchange`, and waits for the receivers behind `recorders`.
async fn drive_unicast(
    ctx: &Ctx,
    exchange: &str,
    recorders: &Arc<Recorders>,
    targets: &[u32],
    label: &str,
    subject: bridge::Subject,
) -> anyhow::Result<Measured> {
    let opts = &ctx.opts;
    let publisher = Publisher::connect(&opts.amqp_url, exchange, opts.publishers).await?;
    warm_up(ctx, &publisher, &format!("{label}: warm-up")).await?;
    ctx.progress.phase(&format!("{label}: measuring"));
    let rec = recorders.runs[1].clone();
    ctx.progress.target.store(targets.len() as u64, Relaxed);
    ctx.progress.received.store(0, Relaxed);
    let bridge_pid = match subject {
        bridge::Subject::Process(pid) => Some(pid),
        bridge::Subject::Threads(_) => None,
    };
    bridge::window_hook(opts.window_hook.as_deref(), "start", bridge_pid).await?;
    let cpu = bridge::CpuWindow::start(Some(subject));
    let published = publish_to_users(ctx, &publisher, targets, 1).await?;
    publisher.close().await;
    ensure_confirmed(&published)?;
    wait_for(
        || rec.seqs.unique(),
        targets.len() as u64,
        opts.drain_timeout,
    )
    .await;
    let cpu = cpu.stop();
    bridge::window_hook(opts.window_hook.as_deref(), "stop", bridge_pid).await?;
    ctx.progress.target.store(0, Relaxed);
    Ok(Measured::of(&rec, published, cpu))
}

/// The bare consumer on the same stream; with [`Extra::Floor`], the floor.
async fn run_baseline(ctx: &Ctx, targets: &[u32], extra: Extra) -> anyhow::Result<Measured> {
    let phase = match extra {
        Extra::Nothing => "baseline",
        Extra::Floor { .. } => "floor",
    };
    ctx.progress.phase(phase);
    let recorders = ctx.recorders(vec![
        Recorder::unicast(ctx.opts.warmup),
        Recorder::unicast(targets.len() as u64),
    ]);
    let consumer = Baseline::start(
        &ctx.opts.amqp_url,
        &ctx.names.baseline_exchange,
        &ctx.names.baseline_queue,
        ctx.opts.prefetch,
        recorders.clone(),
        extra,
        ctx.opts.quorum,
    )
    .await?;
    let measured = drive_unicast(
        ctx,
        &ctx.names.baseline_exchange,
        &recorders,
        targets,
        phase,
        bridge::Subject::Threads(consumer.threads()),
    )
    .await;
    consumer.stop().await?;
    measured
}

fn add_measured(r: &mut Report, key: &str, label: &str, m: &Measured, expected: u64) {
    r.add(
        &format!("{key}_msgs_per_sec"),
        &format!("{label}: delivered msg/s"),
        m.rate.round(),
        format!("{:.0}", m.rate),
    );
    r.add(
        &format!("{key}_publish_rate"),
        &format!("{label}: publish rate achieved"),
        per_sec(m.published.sent, m.published.first_ns, m.published.last_ns).round(),
        format!(
            "{:.0} msg/s",
            per_sec(m.published.sent, m.published.first_ns, m.published.last_ns)
        ),
    );
    r.latency(
        &format!("{key}_latency"),
        &format!("{label}: latency"),
        &m.summary,
    );
    r.add(
        &format!("{key}_lost"),
        &format!("{label}: lost / duplicated / stray"),
        expected.saturating_sub(m.received),
        format!(
            "{} / {} / {}",
            expected.saturating_sub(m.received),
            m.duplicates,
            m.strays
        ),
    );
    r.add(
        &format!("{key}_duplicates"),
        "",
        m.duplicates,
        String::new(),
    );
    add_cpu(r, key, label, &m.cpu);
    if let Some(us) = m.cpu_us_per_message() {
        let (subject_key, subject) = subject_names(key);
        r.add(
            &format!("{key}_{subject_key}_cpu_us_per_notification"),
            &format!("{label}: {subject} CPU per notification"),
            (us * 10.0).round() / 10.0,
            format!("{us:.1} µs"),
        );
    }
    if m.received < expected || m.duplicates > 0 || m.strays > 0 {
        r.problem(format!(
            "{label}: {} lost, {} duplicated, {} stray of {expected}",
            expected.saturating_sub(m.received),
            m.duplicates,
            m.strays
        ));
    }
}

/// What the CPU rows of `key` measure: the bare consumer's threads for the
/// baseline, the bridge's process otherwise (JSON key part, label).
fn subject_names(key: &str) -> (&'static str, &'static str) {
    match key {
        "baseline" => ("consumer", "bare consumer"),
        "floor" => ("consumer", "floor consumer"),
        _ => ("bridge", "bridge"),
    }
}

fn add_cpu(r: &mut Report, key: &str, label: &str, cpu: &bridge::CpuUse) {
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} %"));
    let json = |v: Option<f64>| {
        v.map_or(serde_json::Value::Null, |v| {
            ((v * 10.0).round() / 10.0).into()
        })
    };
    r.add(
        &format!("{key}_cpu_percent"),
        &format!(
            "{label}: CPU (% of a core) {} / broker / bench",
            subject_names(key).1
        ),
        serde_json::json!({subject_names(key).0: json(cpu.bridge), "broker": json(cpu.broker), "bench": json(cpu.bench)}),
        format!("{} / {} / {}", show(cpu.bridge), show(cpu.broker), show(cpu.bench)),
    );
    add_steal(r, key, label, cpu.steal);
}

/// Above this share of the machine's CPU taken by the host, a run's
/// figures get a note: they are not those of a quiet machine.
const STEAL_NOTE_PERCENT: f64 = 5.0;

/// The CPU the hypervisor took during the window: on a shared host it
/// halved this machine's speed within an hour (docs/performance.md), and
/// no figure of a run means much without it.
fn add_steal(r: &mut Report, key: &str, label: &str, steal: Option<f64>) {
    let Some(steal) = steal else { return };
    r.add(
        &format!("{key}_steal_percent"),
        &format!("{label}: CPU taken by the host (steal, % of the machine)"),
        (steal * 10.0).round() / 10.0,
        format!("{steal:.1} %"),
    );
    if steal > STEAL_NOTE_PERCENT {
        r.note(format!(
            "{label}: the host took {steal:.0} % of this machine's CPU during the window (steal): not a quiet machine's figures"
        ));
    }
}

async fn bridge_figures(r: &mut Report, handle: &Handle) {
    let delivered = handle
        .metric("notify_bridge_messages_total", r#"outcome="delivered""#)
        .await
        .unwrap_or(-1.0);
    let none = handle
        .metric("notify_bridge_messages_total", r#"outcome="no_recipient""#)
        .await
        .unwrap_or(-1.0);
    let invalid = handle
        .metric("notify_bridge_messages_total", r#"outcome="invalid""#)
        .await
        .unwrap_or(-1.0);
    r.add(
        "bridge_messages_delivered",
        "bridge: messages delivered / no_recipient / invalid",
        delivered,
        format!("{delivered} / {none} / {invalid}"),
    );
    let commits = handle
        .metric("notify_bridge_inbox_commit_seconds_count", "")
        .await
        .unwrap_or(0.0);
    if commits > 0.0 {
        let sum = handle
            .metric("notify_bridge_inbox_commit_seconds_sum", "")
            .await
            .unwrap_or(0.0);
        let stored = handle
            .metric("notify_bridge_inbox_stored_total", "")
            .await
            .unwrap_or(0.0);
        r.add(
            "inbox_commit_mean_seconds",
            "inbox: commits / mean commit time / entries per commit",
            sum / commits,
            format!(
                "{commits} / {:.2} ms / {:.0}",
                sum / commits * 1e3,
                stored / commits
            ),
        );
    }
    if let (Ok(rss), Ok(fds)) = (handle.rss_bytes(), handle.open_fds()) {
        r.add(
            "bridge_rss_bytes",
            "bridge: RSS / open fds at the end",
            rss,
            format!("{} / {fds}", mib(rss as f64)),
        );
    }
}

/// Ends a reader: with a close handshake (`clean`) or by dropping it.
async fn close_reader(reader: Reader, clean: bool) {
    if clean {
        if let Some(mut ws) = reader.into_socket().await {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
    } else {
        reader.task.abort();
    }
}
