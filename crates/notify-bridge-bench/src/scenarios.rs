//! The scenarios of issue 5: what each one sets up, drives, waits for and
//! reports. Each is bounded in count and time and leaves nothing behind
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

use crate::{
    baseline::{Baseline, Extra},
    bridge::{self, Bridge, BridgeOptions, Handle, Names},
    clients::{self, Publisher, Reader, Recorder, Recorders, Ws},
    report::{self, mib, Axis, Report, Series},
    stats::{Clock, Histogram, Progress, Rng},
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

// ---------------------------------------------------------------------------

/// baseline: the unicast stream through a bare consumer only, what the broker
/// and the clients allow without the bridge.
pub async fn baseline(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    let mut r = base_report(ctx, "baseline");
    r.param("users", o.users);
    r.param("messages", o.messages);
    r.param("rate", o.rate);
    r.param("quorum", o.quorum);
    let targets = unicast_targets(o.seed, o.messages, o.users);
    let m = run_baseline(ctx, &targets, Extra::Nothing).await?;
    add_measured(&mut r, "baseline", "baseline", &m, o.messages);
    plot_latency(
        ctx,
        &mut r,
        "baseline",
        "baseline: publish → bare consumer",
        &[("baseline".into(), m.cdf.clone())],
    )?;
    Ok(r)
}

/// unicast: the stream through the bridge (after the same stream through
/// the bare consumer, the baseline its throughput is compared with).
pub async fn unicast(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    ctx.check_fd_budget(o.users)?;
    let mut r = base_report(ctx, "unicast");
    r.param("users", o.users);
    r.param("messages", o.messages);
    r.param("rate", o.rate);
    r.param("window", o.window as u64);
    let targets = unicast_targets(o.seed, o.messages, o.users);
    let base = if o.baseline {
        Some(run_baseline(ctx, &targets, Extra::Nothing).await?)
    } else {
        None
    };
    let floor = if o.floor {
        let store_dir = o
            .inbox
            .then(|| bridge::work_dir(&o.out_dir, &ctx.names).join("floor-inbox"));
        Some(run_baseline(ctx, &targets, Extra::Floor { store_dir }).await?)
    } else {
        None
    };
    let handle = ctx.start_bridge().await?;
    let (m, readers) = unicast_through_bridge(ctx, &mut r, &handle, &targets).await?;
    let mut runs = unicast_figures(&mut r, o, &m, base.as_ref());
    if let Some(f) = &floor {
        floor_figures(&mut r, o, &m, f, &mut runs);
    }
    bridge_figures(&mut r, &handle).await;
    sockets_closed_early(&mut r, readers);
    let rate = if o.rate > 0.0 {
        format!("{} msg/s", o.rate)
    } else {
        "max rate".into()
    };
    let title = format!(
        "unicast: {} users, {rate}{}{}",
        o.users,
        if o.inbox { ", inbox" } else { "" },
        if o.receipts { ", receipts" } else { "" }
    );
    plot_latency(ctx, &mut r, "unicast", &title, &runs)?;
    Ok(r)
}

/// Connects every user to the bridge and drives the stream; with
/// `--receipts`, drains the receipts and adds their rows. The readers stay
/// open for the figures that follow.
async fn unicast_through_bridge(
    ctx: &Ctx,
    r: &mut Report,
    handle: &Handle,
    targets: &[u32],
) -> anyhow::Result<(Measured, Vec<Reader>)> {
    let o = &ctx.opts;
    let receipts = match o.receipts {
        true => Some(crate::receipts::Sink::bind(&o.amqp_url, &ctx.names).await?),
        false => None,
    };
    ctx.progress.phase("connecting");
    let sockets = ctx.connect(handle, 1, o.users, 0, None).await?;
    let recorders = ctx.recorders(vec![
        Recorder::unicast(o.warmup),
        Recorder::unicast(o.messages),
    ]);
    let readers = Reader::spawn_all(sockets, &recorders);
    let subject = bridge::Subject::Process(handle.pid);
    let m = drive_unicast(
        ctx,
        &ctx.names.exchange,
        &recorders,
        targets,
        "bridge",
        subject,
    )
    .await?;
    if let Some(sink) = receipts {
        sink.finish(r, o.warmup + o.messages).await;
    }
    Ok((m, readers))
}

/// The bridge's rows, the baseline's and their ratio, and the target that
/// applies (throughput at max rate, p99 when paced); the CDFs to plot.
fn unicast_figures(
    r: &mut Report,
    o: &Options,
    m: &Measured,
    base: Option<&Measured>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    add_measured(r, "unicast", "bridge", m, o.messages);
    let mut runs = vec![("bridge".to_string(), m.cdf.clone())];
    if let Some(b) = base {
        add_measured(r, "baseline", "baseline", b, o.messages);
        let ratio = if b.rate > 0.0 { m.rate / b.rate } else { 0.0 };
        r.add(
            "ratio_to_baseline",
            "bridge msg/s ÷ baseline msg/s",
            (ratio * 1000.0).round() / 1000.0,
            format!("{ratio:.3}"),
        );
        if o.rate == 0.0 {
            r.target("unicast throughput ÷ baseline", ratio, 0.95, true, "×");
        }
        if let (Some(bridge), Some(bare)) = (m.cpu_us_per_message(), b.cpu_us_per_message()) {
            let ratio = bridge / bare.max(1e-3);
            r.add(
                "cpu_ratio_to_baseline",
                "bridge CPU ÷ bare consumer CPU per notification",
                (ratio * 1000.0).round() / 1000.0,
                format!("{ratio:.2}"),
            );
        }
        runs.push(("baseline (bare consumer)".to_string(), b.cdf.clone()));
    }
    if o.rate > 0.0 {
        r.target(
            "unicast p99 publish→frame",
            m.summary.p99 as f64 / 1e6,
            2.0,
            false,
            "ms",
        );
    }
    runs
}

/// The floor's rows and the bridge's CPU over the floor's, in the same run.
fn floor_figures(
    r: &mut Report,
    o: &Options,
    m: &Measured,
    f: &Measured,
    runs: &mut Vec<(String, Vec<(f64, f64)>)>,
) {
    add_measured(r, "floor", "floor", f, o.messages);
    if let (Some(bridge), Some(floor)) = (m.cpu_us_per_message(), f.cpu_us_per_message()) {
        let ratio = bridge / floor.max(1e-3);
        r.add(
            "cpu_ratio_to_floor",
            "bridge CPU ÷ floor CPU per notification",
            (ratio * 1000.0).round() / 1000.0,
            format!("{ratio:.2}"),
        );
    }
    let what = if o.inbox {
        "decode, commit, write"
    } else {
        "decode, write"
    };
    runs.push((format!("floor ({what}, one task)"), f.cdf.clone()));
}

/// How many sockets the bridge closed during the run (none should be);
/// then stops the readers.
fn sockets_closed_early(r: &mut Report, readers: Vec<Reader>) {
    let closed = readers
        .iter()
        .filter(|c| c.state.ended.load(Relaxed))
        .count();
    r.add(
        "sockets_closed_early",
        "sockets closed during the run",
        closed as u64,
        closed.to_string(),
    );
    Reader::abort_all(readers);
}

/// broadcast: every message to every socket; frames/s and the latency to the
/// last socket (fan-out cost).
pub async fn broadcast(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    ctx.check_fd_budget(o.users)?;
    let mut r = base_report(ctx, "broadcast");
    r.param("sockets", o.users);
    r.param("messages", o.messages);
    r.param("rate", o.rate);
    let k = o.messages;
    let base_rate = if o.baseline {
        Some(broadcast_baseline(ctx).await?)
    } else {
        None
    };

    let handle = ctx.start_bridge().await?;
    ctx.progress.phase("connecting");
    let sockets = ctx.connect(&handle, 1, o.users, 0, None).await?;
    let warm = 5u64;
    let recorders = ctx.recorders(vec![Recorder::broadcast(warm), Recorder::broadcast(k)]);
    let readers = Reader::spawn_all(sockets, &recorders);
    let publisher = Publisher::connect(&o.amqp_url, &ctx.names.exchange, o.publishers).await?;
    broadcast_warm_up(ctx, &publisher, warm).await?;
    let rec = recorders.runs[1].clone();
    let (published, cpu) = broadcast_measured(ctx, publisher, &handle, &rec).await?;
    let tally = Tally::of(&rec, k, o.users);
    broadcast_figures(&mut r, ctx, &rec, &published, &cpu, &tally, base_rate);
    bridge_figures(&mut r, &handle).await;
    Reader::abort_all(readers);
    plot_latency(
        ctx,
        &mut r,
        "broadcast",
        &format!("broadcast: {} sockets × {k} messages", o.users),
        &[
            ("every frame".into(), rec.latency.cdf()),
            (
                "last socket of each message".into(),
                tally.last_socket.cdf(),
            ),
        ],
    )?;
    Ok(r)
}

/// A broadcast body of run `run` (0: warm-up, 1: measured).
fn broadcast_body(o: &Options, run: usize, seq: u64, t: u64, out: &mut Vec<u8>) {
    clients::body(out, r#""broadcast":true"#, run, seq, t, o.payload_bytes)
}

/// The baseline: the same broadcast bodies through the bare consumer; its
/// msg/s.
async fn broadcast_baseline(ctx: &Ctx) -> anyhow::Result<f64> {
    let o = &ctx.opts;
    let k = o.messages;
    ctx.progress.phase("baseline");
    let recorders = ctx.recorders(vec![Recorder::unicast(0), Recorder::unicast(k)]);
    let consumer = Baseline::start(
        &o.amqp_url,
        &ctx.names.baseline_exchange,
        &ctx.names.baseline_queue,
        o.prefetch,
        recorders.clone(),
        Extra::Nothing,
        false,
    )
    .await?;
    let publisher =
        Publisher::connect(&o.amqp_url, &ctx.names.baseline_exchange, o.publishers).await?;
    let p = publisher
        .run(
            k,
            o.rate,
            o.window,
            ctx.clock,
            &ctx.progress,
            |s, t, out| broadcast_body(o, 1, s, t, out),
        )
        .await?;
    publisher.close().await;
    let rec = recorders.runs[1].clone();
    let rec2 = rec.clone();
    wait_for(move || rec2.seqs.unique(), k, o.drain_timeout).await;
    consumer.stop().await?;
    Ok(per_sec(
        rec.seqs.unique(),
        p.first_ns,
        rec.last_receive.get(),
    ))
}

/// `warm` broadcasts, waited for on every socket.
async fn broadcast_warm_up(ctx: &Ctx, publisher: &Publisher, warm: u64) -> anyhow::Result<()> {
    let o = &ctx.opts;
    ctx.progress.phase("warm-up");
    let before = ctx.progress.received.load(Relaxed);
    publisher
        .run(
            warm,
            0.0,
            o.window,
            ctx.clock,
            &ctx.progress,
            |s, t, out| broadcast_body(o, 0, s, t, out),
        )
        .await?;
    let progress = ctx.progress.clone();
    wait_for(
        || progress.received.load(Relaxed) - before,
        warm * o.users,
        o.drain_timeout,
    )
    .await;
    Ok(())
}

/// The measured broadcasts (each one's publish time noted for the
/// last-socket latency), waited for on every socket; the bridge's CPU.
async fn broadcast_measured(
    ctx: &Ctx,
    publisher: Publisher,
    handle: &Handle,
    rec: &Arc<Recorder>,
) -> anyhow::Result<(clients::Published, bridge::CpuUse)> {
    let o = &ctx.opts;
    ctx.progress.phase("measuring");
    let expected = o.messages * o.users;
    ctx.progress.received.store(0, Relaxed);
    ctx.progress.target.store(expected, Relaxed);
    let pm_sent = rec.per_message.as_ref().map(|pm| &pm.sent);
    let cpu = bridge::CpuWindow::start(Some(bridge::Subject::Process(handle.pid)));
    let published = publisher
        .run(
            o.messages,
            o.rate,
            o.window,
            ctx.clock,
            &ctx.progress,
            |s, t, out| {
                if let Some(sent) = pm_sent {
                    sent[s as usize].store(t, Relaxed);
                }
                broadcast_body(o, 1, s, t, out)
            },
        )
        .await?;
    publisher.close().await;
    let rec2 = rec.clone();
    wait_for(move || rec2.frames.load(Relaxed), expected, o.drain_timeout).await;
    let cpu = cpu.stop();
    ctx.progress.target.store(0, Relaxed);
    Ok((published, cpu))
}

/// Per broadcast message: did every socket get it, and how long until the
/// last one did.
struct Tally {
    complete: u64,
    duplicates: u64,
    last_socket: Histogram,
}

impl Tally {
    fn of(rec: &Recorder, k: u64, users: u64) -> Self {
        let mut t = Tally {
            complete: 0,
            duplicates: 0,
            last_socket: Histogram::default(),
        };
        if let Some(pm) = &rec.per_message {
            t.duplicates = pm.duplicates.load(Relaxed);
            for i in 0..k as usize {
                if pm.frames[i].load(Relaxed) == users {
                    t.complete += 1;
                }
                let last = pm.last_arrival[i].load(Relaxed);
                if last > 0 {
                    t.last_socket
                        .record(last.saturating_sub(pm.sent[i].load(Relaxed)));
                }
            }
        }
        t
    }
}

/// The broadcast scenario's rows, problems and target.
fn broadcast_figures(
    r: &mut Report,
    ctx: &Ctx,
    rec: &Recorder,
    published: &clients::Published,
    cpu: &bridge::CpuUse,
    tally: &Tally,
    base_rate: Option<f64>,
) {
    let (k, duplicates, complete) = (ctx.opts.messages, tally.duplicates, tally.complete);
    let expected = k * ctx.opts.users;
    let frames = rec.frames.load(Relaxed);
    let frames_per_sec = per_sec(frames, published.first_ns, rec.last_receive.get());
    let msgs_per_sec = per_sec(k, published.first_ns, rec.last_receive.get());
    r.add(
        "frames_per_sec",
        "frames delivered per second",
        frames_per_sec.round(),
        format!("{frames_per_sec:.0}"),
    );
    r.add(
        "broadcast_msgs_per_sec",
        "broadcast messages per second",
        msgs_per_sec.round(),
        format!("{msgs_per_sec:.1}"),
    );
    r.add(
        "frames",
        "frames received / expected",
        frames,
        format!("{frames} / {expected}"),
    );
    r.add(
        "lost",
        "lost frames / duplicated",
        expected.saturating_sub(frames),
        format!("{} / {duplicates}", expected.saturating_sub(frames)),
    );
    r.add(
        "complete_messages",
        "messages every socket got",
        complete,
        format!("{complete} / {k}"),
    );
    add_cpu(r, "broadcast", "bridge", cpu);
    r.latency("frame_latency", "per-frame latency", &rec.latency.summary());
    r.latency(
        "last_socket_latency",
        "latency to the last socket",
        &tally.last_socket.summary(),
    );
    if let Some(b) = base_rate {
        add_broadcast_baseline(r, msgs_per_sec, b);
    }
    if frames < expected || duplicates > 0 {
        r.problem(format!(
            "broadcast: {} frames lost, {duplicates} duplicated",
            expected.saturating_sub(frames)
        ));
    }
    r.target(
        "broadcast frames/s",
        frames_per_sec,
        500_000.0,
        true,
        "frames/s",
    );
}

/// The baseline's msg/s on the same broadcast stream, and the bridge's
/// msg/s as a ratio to it.
fn add_broadcast_baseline(r: &mut Report, msgs_per_sec: f64, b: f64) {
    let ratio = if b > 0.0 { msgs_per_sec / b } else { 0.0 };
    r.add(
        "baseline_msgs_per_sec",
        "baseline: consumed msg/s (same stream)",
        b.round(),
        format!("{b:.0}"),
    );
    r.add(
        "ratio_to_baseline",
        "broadcast msg/s ÷ baseline msg/s",
        (ratio * 1000.0).round() / 1000.0,
        format!("{ratio:.3}"),
    );
}

/// idle: connected sockets that receive nothing; the bridge's RSS and fds per
/// socket (what a connection costs at rest).
pub async fn idle(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    ctx.check_fd_budget(o.users)?;
    let mut r = base_report(ctx, "idle");
    r.param("sockets", o.users);
    r.param("per_source", o.per_source as u64);
    r.param("hold_s", o.hold.as_secs());
    let handle = ctx.start_bridge().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = handle.rss_bytes()?;
    let fds0 = handle.open_fds()?;
    let bench_rss0 = testkit::proc::rss_bytes(testkit::proc::Pid::Myself)?;

    let (sockets, connect_secs, mut curve) = connect_sampling_rss(ctx, handle, rss0).await?;
    let recorders = ctx.recorders(vec![Recorder::broadcast(0), Recorder::broadcast(1)]);
    let readers = Reader::spawn_all(sockets, &recorders);
    ctx.progress.phase("holding");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds1 = handle.open_fds()?;
    let (rss2, rss_max) = hold(&handle, o.hold).await?;
    let bench_rss = testkit::proc::rss_bytes(testkit::proc::Pid::Myself)?;
    curve.push((o.users as f64, rss2 as f64 / 1048576.0));
    let alive = check_broadcast(ctx, &recorders.runs[1]).await?;
    let held = Held {
        connect_secs,
        rss: (rss0, rss2, rss_max),
        fds: (fds0, fds1),
        bench_rss: (bench_rss0, bench_rss),
        alive,
    };
    idle_figures(&mut r, o.users, &held);
    Reader::abort_all(readers);
    let path = ctx.plot_path("idle");
    let ymax = curve.iter().map(|p| p.1).fold(0.0, f64::max);
    report::write_svg(
        &path,
        &format!("idle: bridge RSS while {} sockets connect", o.users),
        &Axis::linear("open WebSockets", o.users as f64),
        &Axis::linear("bridge RSS (MiB)", ymax),
        &[Series {
            name: "VmRSS".into(),
            points: curve,
        }],
    )?;
    r.plots.push(path.display().to_string());
    Ok(r)
}

/// Connects the idle sockets while sampling the bridge's RSS against the
/// sockets open (for the plot): the sockets, the seconds it took, and the
/// (sockets, MiB) curve.
async fn connect_sampling_rss(
    ctx: &Ctx,
    handle: Handle,
    rss0: u64,
) -> anyhow::Result<(Vec<(u64, Ws)>, f64, Vec<(f64, f64)>)> {
    let o = &ctx.opts;
    ctx.progress.phase("connecting");
    ctx.progress.target.store(o.users, Relaxed);
    let curve = Arc::new(std::sync::Mutex::new(vec![(0.0, rss0 as f64 / 1048576.0)]));
    let sampler = {
        let (curve, progress) = (curve.clone(), ctx.progress.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(rss) = handle.rss_bytes() {
                    if let Ok(mut c) = curve.lock() {
                        c.push((
                            progress.connected.load(Relaxed) as f64,
                            rss as f64 / 1048576.0,
                        ));
                    }
                }
            }
        })
    };
    let started = tokio::time::Instant::now();
    let sockets = ctx.connect(&handle, 1, o.users, 0, None).await;
    sampler.abort();
    let sockets = sockets?;
    let connect_secs = started.elapsed().as_secs_f64();
    let curve = curve.lock().map(|c| c.clone()).unwrap_or_default();
    Ok((sockets, connect_secs, curve))
}

/// Holds the sockets for `hold`: the RSS at the end and the most seen.
async fn hold(handle: &Handle, hold: Duration) -> anyhow::Result<(u64, u64)> {
    let mut rss_max = handle.rss_bytes()?;
    let hold_until = tokio::time::Instant::now() + hold;
    while tokio::time::Instant::now() < hold_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(handle.rss_bytes()?);
    }
    Ok((handle.rss_bytes()?, rss_max))
}

/// Every socket still works: one broadcast reaches all of them. The
/// sockets that got it.
async fn check_broadcast(ctx: &Ctx, rec: &Arc<Recorder>) -> anyhow::Result<u64> {
    let o = &ctx.opts;
    ctx.progress.phase("checking sockets");
    let publisher = Publisher::connect(&o.amqp_url, &ctx.names.exchange, o.publishers).await?;
    publisher
        .run(1, 0.0, 1, ctx.clock, &ctx.progress, |s, t, out| {
            clients::body(out, r#""broadcast":true"#, 1, s, t, 0)
        })
        .await?;
    publisher.close().await;
    let rec2 = rec.clone();
    wait_for(
        move || rec2.frames.load(Relaxed),
        o.users,
        Duration::from_secs(5),
    )
    .await;
    Ok(rec.frames.load(Relaxed))
}

/// What the idle scenario measured.
struct Held {
    connect_secs: f64,
    /// Bridge RSS before connecting, after holding, and the most seen.
    rss: (u64, u64, u64),
    /// Bridge fds before and after connecting.
    fds: (u64, u64),
    /// The bench's own RSS before and after.
    bench_rss: (u64, u64),
    alive: u64,
}

/// The idle scenario's rows, problems and target.
fn idle_figures(r: &mut Report, users: u64, h: &Held) {
    let ((rss0, rss2, rss_max), (fds0, fds1)) = (h.rss, h.fds);
    let (bench_rss0, bench_rss) = h.bench_rss;
    let (connect_secs, alive) = (h.connect_secs, h.alive);
    let n = users.max(1) as f64;
    let per_conn = (rss2 as f64 - rss0 as f64) / n;
    let fds_per_conn = (fds1 as f64 - fds0 as f64) / n;
    r.add(
        "connect_secs",
        "time to connect all sockets",
        connect_secs,
        format!("{connect_secs:.1} s ({:.0}/s)", n / connect_secs),
    );
    r.add(
        "rss_before_bytes",
        "bridge RSS before / after / max",
        rss0,
        format!(
            "{} / {} / {}",
            mib(rss0 as f64),
            mib(rss2 as f64),
            mib(rss_max as f64)
        ),
    );
    r.add("rss_after_bytes", "", rss2, String::new());
    r.add(
        "rss_per_socket_bytes",
        "bridge RSS per socket",
        per_conn.round(),
        format!("{:.2} KiB", per_conn / 1024.0),
    );
    r.add(
        "fds_per_socket",
        "bridge fds before / after (per socket)",
        fds_per_conn,
        format!("{fds0} / {fds1} ({fds_per_conn:.3})"),
    );
    r.add(
        "bench_rss_per_socket_bytes",
        "bench (client) RSS per socket",
        ((bench_rss as f64 - bench_rss0 as f64) / n).round(),
        format!(
            "{:.2} KiB",
            (bench_rss as f64 - bench_rss0 as f64) / n / 1024.0
        ),
    );
    r.add(
        "alive",
        "sockets that got a broadcast after holding",
        alive,
        format!("{alive} / {users}"),
    );
    if alive < users {
        r.problem(format!(
            "idle: only {alive} of {users} sockets got the check broadcast"
        ));
    }
    r.target(
        "bridge RSS per idle socket",
        per_conn / 1024.0,
        8.0,
        false,
        "KiB",
    );
    r.note(format!(
        "fd limit per process here: {} (bench and bridge each hold one fd per socket)",
        testkit::proc::open_files_limit().map_or("unknown".into(), |l| l.to_string())
    ));
}

/// slow-client: the others' latency with every client reading (phase A),
/// then with some clients that never read (phase B), and how the bridge
/// closed the slow ones.
pub async fn slow_client(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    ctx.check_fd_budget(o.users + 2 * o.slow)?;
    let mut r = base_report(ctx, "slow-client");
    r.param("users", o.users);
    r.param("slow", o.slow);
    r.param("rate", o.rate);
    r.param("slow_rate", o.slow_rate);
    r.param("slow_payload", o.slow_payload as u64);
    r.param("duration_s", o.duration.as_secs_f64());
    let plan = SlowPlan::new(o);

    let handle = ctx.start_bridge().await?;
    ctx.progress.phase("connecting");
    let sockets = ctx.connect(&handle, 1, o.users + o.slow, 0, None).await?;
    // Runs: 1 = others with every client reading, 2 = others with slow
    // clients, 3/4 = what the slow users got in each phase.
    let recorders = ctx.recorders(vec![
        Recorder::unicast(0),
        Recorder::unicast(plan.count),
        Recorder::unicast(plan.count),
        Recorder::unicast(plan.count),
        Recorder::unicast(plan.count),
    ]);
    let mut readers = Reader::spawn_all(sockets, &recorders);
    let publisher = Publisher::connect(&o.amqp_url, &ctx.names.exchange, o.publishers).await?;
    slow_phase(ctx, &publisher, &plan, &recorders, 1).await?;
    let slow_readers = readers.split_off(o.users as usize);
    let slow_sockets = reconnect_slow(ctx, &handle, slow_readers).await?;
    let closes_before = slow_closes(&handle).await;
    slow_phase(ctx, &publisher, &plan, &recorders, 2).await?;
    publisher.close().await;
    let closes = slow_closes(&handle).await - closes_before;
    let outcomes = CloseOutcomes::drain(ctx, slow_sockets).await;

    let change = others_figures(&mut r, &recorders, plan.regular);
    slow_figures(&mut r, o, closes, &outcomes);
    r.target(
        "others' p99 change with slow clients",
        change,
        10.0,
        false,
        "%",
    );
    bridge_figures(&mut r, &handle).await;
    Reader::abort_all(readers);
    let title = format!(
        "slow-client: {} users at {} msg/s, {} slow",
        o.users, o.rate, o.slow
    );
    let runs = [
        ("others, all clients reading", 1),
        ("others, slow clients present", 2),
    ];
    plot_latency(
        ctx,
        &mut r,
        "slow-client",
        &title,
        &run_cdfs(&recorders, &runs),
    )?;
    Ok(r)
}

/// The slow-client stream, the same in both phases: per message, whether
/// it goes to a slow user, and the user.
struct SlowPlan {
    messages: Vec<(bool, u32)>,
    /// Messages per phase, and those to the regular users.
    count: u64,
    regular: u64,
    /// The regular and the slow users' rates together.
    total_rate: f64,
}

impl SlowPlan {
    fn new(o: &Options) -> Self {
        let total_rate = o.rate + o.slow_rate;
        let count = (total_rate * o.duration.as_secs_f64()).round() as u64;
        let mut rng = Rng::new(o.seed);
        let messages: Vec<(bool, u32)> = (0..count)
            .map(|_| {
                let slow = (rng.below(1_000_000) as f64) < o.slow_rate / total_rate * 1e6;
                let user = if slow {
                    o.users + 1 + rng.below(o.slow.max(1))
                } else {
                    1 + rng.below(o.users)
                };
                (slow, user as u32)
            })
            .collect();
        let regular = messages.iter().filter(|(s, _)| !s).count() as u64;
        Self {
            messages,
            count,
            regular,
            total_rate,
        }
    }
}

/// One phase (run 1: A, all read; run 2: B, slow clients): the whole plan,
/// the slow users' messages padded and recorded as run + 2; waits for the
/// regular users' messages.
async fn slow_phase(
    ctx: &Ctx,
    publisher: &Publisher,
    plan: &SlowPlan,
    recorders: &Recorders,
    run: usize,
) -> anyhow::Result<()> {
    let o = &ctx.opts;
    ctx.progress.phase(&format!(
        "phase {}",
        if run == 1 { "A (all read)" } else { "B (slow)" }
    ));
    ctx.progress.received.store(0, Relaxed);
    publisher
        .run(
            plan.count,
            plan.total_rate,
            o.window,
            ctx.clock,
            &ctx.progress,
            |s, t, out| {
                let (slow, user) = plan.messages[s as usize];
                let (run, pad) = if slow {
                    (run + 2, o.slow_payload)
                } else {
                    (run, o.payload_bytes)
                };
                clients::body(out, &format!(r#""user_id":{user}"#), run, s, t, pad)
            },
        )
        .await?;
    let rec = recorders.runs[run].clone();
    wait_for(move || rec.seqs.unique(), plan.regular, o.drain_timeout).await;
    Ok(())
}

/// Phase B's set-up: the slow users close their reading sockets and
/// reconnect with sockets that never read (a small receive buffer, so the
/// bridge's send queue fills soon).
async fn reconnect_slow(
    ctx: &Ctx,
    handle: &Handle,
    slow_readers: Vec<Reader>,
) -> anyhow::Result<Vec<(u64, Ws)>> {
    let o = &ctx.opts;
    for reader in slow_readers {
        close_reader(reader, true).await;
    }
    ctx.progress.phase("connecting slow");
    ctx.connect(
        handle,
        o.users + 1,
        o.slow,
        (o.users + o.slow) as usize,
        Some(4096),
    )
    .await
}

/// The bridge's count of slow clients it closed (0 when unreadable).
async fn slow_closes(handle: &Handle) -> f64 {
    handle
        .metric("notify_bridge_slow_client_closes_total", "")
        .await
        .unwrap_or(0.0)
}

/// How the slow sockets ended, read after phase B.
#[derive(Default)]
struct CloseOutcomes {
    /// A close frame with 1013 (the contract's "queue full").
    code_1013: u64,
    other_code: u64,
    /// The connection dropped without a close frame.
    dropped: u64,
    still_open: u64,
}

impl CloseOutcomes {
    /// Reads each slow socket to its end (5 s at most) and counts how it
    /// ended.
    async fn drain(ctx: &Ctx, slow_sockets: Vec<(u64, Ws)>) -> Self {
        ctx.progress.phase("draining slow sockets");
        let drained = futures_util::future::join_all(
            slow_sockets
                .into_iter()
                .map(|(_, ws)| clients::drain_for_close(ws, Duration::from_secs(5))),
        )
        .await;
        let mut out = Self::default();
        for code in drained {
            match code {
                Some(1013) => out.code_1013 += 1,
                Some(0) => out.still_open += 1,
                Some(_) => out.other_code += 1,
                None => out.dropped += 1,
            }
        }
        out
    }
}

/// The regular users' rows in both phases (latency, loss); their p99
/// change in percent, the scenario's target.
fn others_figures(r: &mut Report, recorders: &Recorders, regular: u64) -> f64 {
    let a = recorders.runs[1].latency.summary();
    let b = recorders.runs[2].latency.summary();
    r.latency(
        "others_latency_all_reading",
        "others, all clients reading",
        &a,
    );
    r.latency("others_latency_with_slow", "others, with slow clients", &b);
    let change = if a.p99 > 0 {
        (b.p99 as f64 / a.p99 as f64 - 1.0) * 100.0
    } else {
        0.0
    };
    r.add(
        "p99_change_percent",
        "others' p99 change",
        (change * 10.0).round() / 10.0,
        format!("{change:+.1} %"),
    );
    for (run, key, label) in [
        (1, "others_lost_all_reading", "others lost, all reading"),
        (2, "others_lost_with_slow", "others lost, with slow clients"),
    ] {
        let rec = &recorders.runs[run];
        let lost = regular.saturating_sub(rec.seqs.unique());
        r.add(
            key,
            label,
            lost,
            format!("{lost} of {regular} (dup {})", rec.seqs.duplicates()),
        );
        if lost > 0 || rec.seqs.duplicates() > 0 {
            r.problem(format!(
                "{label}: {lost} lost, {} duplicated",
                rec.seqs.duplicates()
            ));
        }
    }
    change
}

/// The slow clients' rows: the bridge's count of closes and how the
/// sockets ended.
fn slow_figures(r: &mut Report, o: &Options, closes: f64, c: &CloseOutcomes) {
    r.add(
        "slow_client_closes",
        "slow clients closed by the bridge (metric)",
        closes,
        format!("{closes} of {}", o.slow),
    );
    r.add(
        "slow_close_frames_1013",
        "slow sockets: 1013 frame / other / dropped / open",
        c.code_1013,
        format!(
            "{} / {} / {} / {}",
            c.code_1013, c.other_code, c.dropped, c.still_open
        ),
    );
    r.note("a slow client whose close frame cannot be written within 2 s is dropped without one (contract); the metric counts both");
}

/// soak: steady traffic with connection churn; RSS and open fds must stay flat
/// (no leak per connection).
pub async fn soak(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    let churn_pool = (o.churn.ceil() as u64).max(1);
    ctx.check_fd_budget(o.users + churn_pool + 10)?;
    let mut r = base_report(ctx, "soak");
    r.param("users", o.users);
    r.param("rate", o.rate);
    r.param("duration_s", o.duration.as_secs_f64());
    r.param("churn_per_s", o.churn);
    let count = (o.rate * o.duration.as_secs_f64()).round() as u64;
    let targets = unicast_targets(o.seed, count, o.users);

    let handle = ctx.start_bridge().await?;
    ctx.progress.phase("connecting");
    let sockets = ctx.connect(&handle, 1, o.users, 0, None).await?;
    let recorders = ctx.recorders(vec![Recorder::unicast(0), Recorder::unicast(count)]);
    let readers = Reader::spawn_all(sockets, &recorders);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = (handle.rss_bytes()?, handle.open_fds()?);

    let (samples, sampler) = spawn_sampler(ctx, handle);
    let mut churn = Churn::spawn(ctx, handle, &recorders, churn_pool);
    let published = publish_soak(ctx, &targets).await?;
    let churn_errors = churn.stop().await;
    let rec = recorders.runs[1].clone();
    let rec2 = rec.clone();
    wait_for(move || rec2.seqs.unique(), count, o.drain_timeout).await;
    ctx.progress.phase("settling");
    tokio::time::sleep(Duration::from_secs(3)).await;
    sampler.abort();
    let end = (handle.rss_bytes()?, handle.open_fds()?);
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let soaked = Soaked {
        count,
        published: published.sent,
        rec: &rec,
        churned: churn.churned.load(Relaxed),
        churn_errors,
        start,
        end,
        samples: &samples,
    };
    soak_figures(&mut r, &soaked);
    bridge_figures(&mut r, &handle).await;
    Reader::abort_all(readers);
    soak_plots(ctx, &mut r, &soaked)?;
    Ok(r)
}

/// One resource sample: seconds since the start, bridge RSS, open fds.
type Sample = (f64, u64, u64);

/// Samples the bridge's RSS and open fds every second until aborted.
fn spawn_sampler(
    ctx: &Ctx,
    handle: Handle,
) -> (
    Arc<std::sync::Mutex<Vec<Sample>>>,
    tokio::task::JoinHandle<()>,
) {
    let samples = Arc::new(std::sync::Mutex::new(Vec::<Sample>::new()));
    let t0 = ctx.clock.now();
    let (out, clock) = (samples.clone(), ctx.clock);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let (Ok(rss), Ok(fds)) = (handle.rss_bytes(), handle.open_fds()) {
                let t = (clock.now() - t0) as f64 / 1e9;
                if let Ok(mut s) = out.lock() {
                    s.push((t, rss, fds));
                }
            }
        }
    });
    (samples, task)
}

/// The soak's connection churn: a task that connects one new user every
/// 1/churn s and lets the oldest churned socket go, alternately with a
/// close handshake and by dropping TCP.
struct Churn {
    stop: Arc<tokio::sync::Notify>,
    churned: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Churn {
    fn spawn(ctx: &Ctx, handle: Handle, recorders: &Arc<Recorders>, pool_size: u64) -> Self {
        let stop = Arc::new(tokio::sync::Notify::new());
        let churned = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, churned2, recorders) = (stop.clone(), churned.clone(), recorders.clone());
        let tokens = ctx.tokens();
        let (per_source, users, churn) = (ctx.opts.per_source, ctx.opts.users, ctx.opts.churn);
        let task = tokio::spawn(async move {
            let mut pool = std::collections::VecDeque::new();
            let mut n: u64 = 0;
            let mut errors = 0u64;
            if churn <= 0.0 {
                return errors;
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / churn));
            loop {
                tokio::select! {
                    _ = stop2.notified() => break,
                    _ = tick.tick() => {}
                }
                let user = users + 1 + n % 100_000;
                let source =
                    clients::source_addr(users as usize + (n % 20_000) as usize, per_source);
                let connected = match tokens(user) {
                    Ok(token) => clients::connect(handle.ws_addr, source, &token, None).await,
                    Err(e) => Err(e),
                };
                match connected {
                    Ok(ws) => pool.push_back(Reader::spawn(ws, recorders.clone())),
                    Err(_) => errors += 1,
                }
                n += 1;
                while pool.len() as u64 > pool_size {
                    if let Some(old) = pool.pop_front() {
                        close_reader(old, n.is_multiple_of(2)).await;
                        churned2.fetch_add(1, Relaxed);
                    }
                }
            }
            for (i, old) in pool.into_iter().enumerate() {
                close_reader(old, i.is_multiple_of(2)).await;
                churned2.fetch_add(1, Relaxed);
            }
            errors
        });
        Self {
            stop,
            churned,
            task,
        }
    }

    /// Stops churning, closes the pool; the failed connects.
    async fn stop(&mut self) -> u64 {
        self.stop.notify_one();
        (&mut self.task).await.unwrap_or(0)
    }
}

/// The soak's paced unicast stream to the stable users.
async fn publish_soak(ctx: &Ctx, targets: &[u32]) -> anyhow::Result<clients::Published> {
    let o = &ctx.opts;
    let count = targets.len() as u64;
    let publisher = Publisher::connect(&o.amqp_url, &ctx.names.exchange, o.publishers).await?;
    ctx.progress.phase("soaking");
    ctx.progress.target.store(count, Relaxed);
    ctx.progress.received.store(0, Relaxed);
    let published = publish_to_users(ctx, &publisher, targets, 1).await?;
    publisher.close().await;
    Ok(published)
}

/// What a soak measured, for its figures and plots.
struct Soaked<'a> {
    count: u64,
    published: u64,
    rec: &'a Recorder,
    churned: u64,
    churn_errors: u64,
    /// (RSS bytes, open fds) after connecting and after settling.
    start: (u64, u64),
    end: (u64, u64),
    samples: &'a [Sample],
}

impl Soaked<'_> {
    /// The samples of the second half of the run (after warm-up).
    fn second_half(&self) -> &[Sample] {
        &self.samples[self.samples.len() / 2..]
    }
}

/// RSS growth over `samples` in bytes per minute (least squares).
fn rss_slope(samples: &[Sample]) -> f64 {
    if samples.len() < 2 {
        return 0.0;
    }
    let n = samples.len() as f64;
    let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let num: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 as f64 - my)).sum();
    let den: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    if den > 0.0 {
        num / den * 60.0
    } else {
        0.0
    }
}

/// The soak's rows, problems and targets.
fn soak_figures(r: &mut Report, s: &Soaked) {
    let (count, rec) = (s.count, s.rec);
    let received = rec.seqs.unique();
    let lost = count.saturating_sub(received);
    r.add(
        "messages",
        "messages published / received",
        count,
        format!("{} / {received}", s.published),
    );
    r.add(
        "lost",
        "lost / duplicated",
        lost,
        format!("{lost} / {}", rec.seqs.duplicates()),
    );
    r.latency("latency", "latency", &rec.latency.summary());
    r.add(
        "churned",
        "connections churned (connect errors)",
        s.churned,
        format!("{} ({})", s.churned, s.churn_errors),
    );
    let late_growth = soak_memory_figures(r, s);
    let ((_, fds0), (_, fds_end)) = (s.start, s.end);
    if received < count || rec.seqs.duplicates() > 0 {
        r.problem(format!(
            "soak: {lost} lost, {} duplicated",
            rec.seqs.duplicates()
        ));
    }
    if fds_end > fds0 + 2 {
        r.problem(format!("soak: open fds grew from {fds0} to {fds_end}"));
    }
    if s.churn_errors > 0 {
        r.problem(format!("soak: {} churn connects failed", s.churn_errors));
    }
    r.target(
        "soak RSS growth over the second half",
        late_growth,
        2.0,
        false,
        "%",
    );
    r.target(
        "soak open fds end − start",
        fds_end as f64 - fds0 as f64,
        2.0,
        false,
        "fds",
    );
}

/// RSS and fd rows; the RSS growth over the second half, in percent.
fn soak_memory_figures(r: &mut Report, s: &Soaked) -> f64 {
    let ((rss0, fds0), (rss_end, fds_end)) = (s.start, s.end);
    let rss_max = s.samples.iter().map(|s| s.1).max().unwrap_or(rss_end);
    let slope = rss_slope(s.second_half());
    r.add(
        "rss_start_bytes",
        "bridge RSS start / end / max",
        rss0,
        format!(
            "{} / {} / {}",
            mib(rss0 as f64),
            mib(rss_end as f64),
            mib(rss_max as f64)
        ),
    );
    r.add("rss_end_bytes", "", rss_end, String::new());
    r.add(
        "rss_slope_bytes_per_min",
        "bridge RSS trend, second half",
        slope.round(),
        format!("{} per minute", mib(slope)),
    );
    r.add(
        "fds_start",
        "bridge open fds start / end",
        fds0,
        format!("{fds0} / {fds_end}"),
    );
    r.add("fds_end", "", fds_end, String::new());
    // Flat means: no growth once warmed up. Allocator pools and the maps
    // grow to the churn's peak during the first part of a run, so the
    // target looks at the second half only; start→end is shown as well.
    let growth = (rss_end as f64 - rss0 as f64) / rss0.max(1) as f64 * 100.0;
    let rss_half = s.second_half().first().map_or(rss0, |s| s.1);
    let late_growth = (rss_end as f64 - rss_half as f64) / rss0.max(1) as f64 * 100.0;
    r.add(
        "rss_growth_percent",
        "bridge RSS growth start→end / second half",
        (growth * 10.0).round() / 10.0,
        format!("{growth:+.1} % / {late_growth:+.1} %"),
    );
    r.add(
        "rss_growth_second_half_percent",
        "",
        (late_growth * 10.0).round() / 10.0,
        String::new(),
    );
    late_growth
}

/// The latency CDF and the resources-over-time plot.
fn soak_plots(ctx: &Ctx, r: &mut Report, s: &Soaked) -> anyhow::Result<()> {
    let o = &ctx.opts;
    plot_latency(
        ctx,
        r,
        "soak",
        &format!(
            "soak: {} users, {} msg/s, churn {}/s",
            o.users, o.rate, o.churn
        ),
        &[("stable users".into(), s.rec.latency.cdf())],
    )?;
    let res_path = ctx.plot_path("soak-resources");
    let tmax = s.samples.last().map_or(1.0, |s| s.0);
    let rss_pts: Vec<(f64, f64)> = s
        .samples
        .iter()
        .map(|s| (s.0, s.1 as f64 / 1048576.0))
        .collect();
    let fd_pts: Vec<(f64, f64)> = s
        .samples
        .iter()
        .map(|s| (s.0, s.2 as f64 / 100.0))
        .collect();
    let ymax = rss_pts
        .iter()
        .chain(fd_pts.iter())
        .map(|p| p.1)
        .fold(0.0, f64::max);
    report::write_svg(
        &res_path,
        "soak: bridge resources over time",
        &Axis::linear("seconds", tmax),
        &Axis::linear("RSS (MiB) · open fds (hundreds)", ymax),
        &[
            Series {
                name: "RSS, MiB".into(),
                points: rss_pts,
            },
            Series {
                name: "open fds ÷ 100".into(),
                points: fd_pts,
            },
        ],
    )?;
    r.plots.push(res_path.display().to_string());
    Ok(())
}

async fn close_reader(reader: Reader, clean: bool) {
    if clean {
        if let Some(mut ws) = reader.into_socket().await {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
    } else {
        reader.task.abort();
    }
}
