//! The cluster scenario (issue 12): three instances of the release binary
//! (A, B, C) in one cluster on a fresh PostgreSQL schema, the users'
//! sockets on A and B only, a unicast stream paced at `--rate`; then the
//! same stream to the same users on one instance with the SQLite inbox and
//! on one without the inbox, in the same invocation, so the three share the
//! machine's state. It reports each one's throughput and publish→frame
//! latency, each instance's CPU per notification (C, holding nobody, in
//! particular) and every instance's `notify_bridge_cluster_live_received_total`.

use std::{net::SocketAddr, sync::atomic::Ordering::Relaxed, sync::Arc, time::Duration};

use anyhow::Context;
use lapin::{
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
    Connection, ConnectionProperties,
};
use testkit::proc::{self, Pid};

use super::{
    add_measured, base_report, ensure_confirmed, plot_latency, publish_to_users, unicast_targets,
    wait_for, warm_up, Ctx, Measured,
};
use crate::{
    bridge::{self, Bridge, BridgeOptions, Handle, Names},
    clients::{self, Publisher, Reader, Recorder, Recorders},
    report::Report,
};

/// The cluster's instance ids, in start order: A starts first, so it is
/// the ingest queue's single active consumer (the writer).
const INSTANCES: [&str; 3] = ["a", "b", "c"];

/// The cluster's name on the broker and in the database, derived from the
/// run id so that the clean-up finds everything without shared state.
fn cluster_name(names: &Names) -> String {
    format!("bench-{}", names.run_id)
}

/// The run's own PostgreSQL schema, dropped at the end.
fn schema_name(names: &Names) -> String {
    format!("nb_bench_{}", names.run_id)
}

/// One configuration's own exchange and queue, so the three never see
/// each other's messages.
fn names_for(names: &Names, suffix: &str) -> Names {
    let mut own = names.clone();
    own.exchange = format!("{}.{suffix}", names.exchange);
    own.queue = format!("{}.{suffix}", names.queue);
    own
}

/// `url` with its sessions' search_path set to `schema`.
fn in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let connecting = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| anyhow::anyhow!("PostgreSQL at {url}: no answer within 10 s"))?
        .with_context(|| format!("cannot connect to PostgreSQL at {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

fn postgres_url(ctx: &Ctx) -> anyhow::Result<&str> {
    ctx.opts.postgres_url.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "the cluster scenario needs PostgreSQL: --postgres-url or \
             NOTIFY_BRIDGE_BENCH_POSTGRES_URL (bash scripts/postgres url)"
        )
    })
}

/// Creates the run's schema; the URL whose sessions use it.
async fn create_schema(ctx: &Ctx) -> anyhow::Result<String> {
    let url = postgres_url(ctx)?;
    let schema = schema_name(&ctx.names);
    pg_connect(url)
        .await?
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .with_context(|| format!("cannot create schema {schema}"))?;
    Ok(in_schema(url, &schema))
}

/// Deletes what the scenario left on the broker and in the database (its
/// queues, exchanges and schema); run by the caller whatever happened.
/// Each half is tried even when the other fails (a broker away must not
/// leave the schema behind).
pub async fn cleanup(
    amqp_url: &str,
    postgres_url: Option<&str>,
    names: &Names,
) -> anyhow::Result<()> {
    let broker = delete_topology(amqp_url, names).await;
    let database = match postgres_url {
        Some(url) => drop_schema(url, &schema_name(names)).await,
        None => Ok(()),
    };
    match (broker, database) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(b), Err(d)) => Err(anyhow::anyhow!("{b:#}; {d:#}")),
    }
}

async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    pg_connect(url)
        .await?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .with_context(|| format!("cannot drop schema {schema}"))
}

/// The cluster's queues and exchanges and the single instances' ones.
async fn delete_topology(amqp_url: &str, names: &Names) -> anyhow::Result<()> {
    let cluster = cluster_name(names);
    let mut queues = vec![format!("{cluster}.ingest")];
    queues.extend(INSTANCES.map(|i| format!("{cluster}.live.{i}")));
    let mut exchanges = vec![format!("{cluster}.live")];
    for suffix in ["cluster", "sqlite", "none"] {
        let own = names_for(names, suffix);
        queues.push(own.queue);
        exchanges.push(own.exchange);
    }
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(amqp_url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("cannot reach the broker to clean up: timed out"))??;
    let ch = conn.create_channel().await?;
    for queue in &queues {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("cannot delete queue {queue}"))?;
    }
    for exchange in &exchanges {
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .with_context(|| format!("cannot delete exchange {exchange}"))?;
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

/// Starts one instance of the release binary with its own scratch folder
/// and ports; `env` before the user's `--bridge-env`, which wins.
async fn start_instance(
    ctx: &Ctx,
    names: &Names,
    inbox: bool,
    dir: &str,
    env: Vec<(String, String)>,
) -> anyhow::Result<Bridge> {
    let binary = match &ctx.opts.bridge_bin {
        Some(b) => b.clone(),
        None => bridge::default_binary()?,
    };
    let mut extra_env = env;
    extra_env.extend(ctx.opts.bridge_env.iter().cloned());
    let options = BridgeOptions {
        binary,
        amqp_url: ctx.opts.amqp_url.clone(),
        prefetch: ctx.opts.prefetch,
        inbox,
        work_dir: bridge::work_dir(&ctx.opts.out_dir, &ctx.names).join(dir),
        extra_env,
    };
    ctx.progress.phase(&format!("starting {dir}"));
    let started = Bridge::start(&options, names).await?;
    eprintln!(
        "bench: {dir} pid {} ws {} http {} (exchange {})",
        started.pid, started.ws_addr, started.http_addr, names.exchange
    );
    Ok(started)
}

/// A, B and C, started one after the other (each ready before the next).
async fn start_cluster(ctx: &Ctx, db_url: &str) -> anyhow::Result<Vec<Bridge>> {
    let names = names_for(&ctx.names, "cluster");
    let cluster = cluster_name(&ctx.names);
    let mut out = Vec::new();
    for id in INSTANCES {
        let env = [
            ("NOTIFY_BRIDGE_INBOX__STORE", "postgres"),
            ("NOTIFY_BRIDGE_INBOX__POSTGRES_URL", db_url),
            ("NOTIFY_BRIDGE_CLUSTER__ENABLED", "true"),
            ("NOTIFY_BRIDGE_CLUSTER__NAME", cluster.as_str()),
            ("NOTIFY_BRIDGE_CLUSTER__INSTANCE_ID", id),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
        out.push(start_instance(ctx, &names, true, &format!("cluster-{id}"), env).await?);
    }
    Ok(out)
}

/// CPU ticks of a set of processes at the start of a window.
struct Ticks {
    start: Vec<(Pid, u64)>,
    started: std::time::Instant,
}

impl Ticks {
    fn start(pids: Vec<u32>) -> Self {
        let start = pids
            .into_iter()
            .filter_map(|p| Some((Pid::Of(p), proc::cpu_ticks(Pid::Of(p)).ok()?)))
            .collect();
        Self {
            start,
            started: std::time::Instant::now(),
        }
    }

    /// CPU seconds of each process since the start (None: it is gone), and
    /// the window's length in seconds.
    fn stop(&self) -> (Vec<Option<f64>>, f64) {
        let each = self
            .start
            .iter()
            .map(|(pid, t0)| Some(proc::cpu_ticks(*pid).ok()?.saturating_sub(*t0) as f64 / 100.0))
            .collect();
        (each, self.started.elapsed().as_secs_f64().max(1e-3))
    }
}

/// What one configuration measured.
struct Load {
    measured: Measured,
    /// CPU seconds of each instance in the measured window.
    cpu: Vec<Option<f64>>,
    /// Each instance's CPU (% of a core) in a quiet window before it.
    idle: Vec<Option<f64>>,
    /// The measured window's length, seconds.
    window: f64,
    /// The PostgreSQL server's CPU seconds in the measured window.
    postgres: Option<f64>,
    /// Each instance's counters over the measured window.
    counters: Vec<Counters>,
}

/// Connects users 1..=N, user u to `homes[(u - 1) % homes.len()]`, each
/// from its own source index; their readers record into `recorders`.
async fn connect_spread(
    ctx: &Ctx,
    homes: &[SocketAddr],
    recorders: &Arc<Recorders>,
) -> anyhow::Result<Vec<Reader>> {
    ctx.progress.phase("connecting");
    ctx.progress.connected.store(0, Relaxed);
    let tokens = ctx.tokens();
    let mut readers = Vec::new();
    for (k, home) in homes.iter().enumerate() {
        let users = (1..=ctx.opts.users)
            .filter(|u| (u - 1) as usize % homes.len() == k)
            .map(|u| (u, (u - 1) as usize))
            .collect();
        let sockets = clients::connect_many(
            *home,
            users,
            ctx.opts.per_source,
            ctx.opts.connect_concurrency,
            &tokens,
            None,
            &ctx.progress,
        )
        .await?;
        readers.extend(Reader::spawn_all(sockets, recorders));
    }
    Ok(readers)
}

/// Each process's CPU (% of a core) over a quiet window: what heartbeats
/// and timers cost without messages.
async fn idle_cpu(pids: &[u32], quiet: Duration) -> Vec<Option<f64>> {
    let ticks = Ticks::start(pids.to_vec());
    tokio::time::sleep(quiet).await;
    let (each, secs) = ticks.stop();
    each.into_iter()
        .map(|s| s.map(|s| s * 100.0 / secs))
        .collect()
}

/// Connects the users to the first `holders` of `bridges`, warms up,
/// measures the bridges' quiet CPU, then the measured window; the
/// bridges' counters are read around it.
async fn drive(
    ctx: &Ctx,
    exchange: &str,
    bridges: &[Handle],
    holders: usize,
    targets: &[u32],
    label: &str,
) -> anyhow::Result<(Load, Vec<Reader>)> {
    let o = &ctx.opts;
    let homes: Vec<SocketAddr> = bridges[..holders].iter().map(|h| h.ws_addr).collect();
    let pids: Vec<u32> = bridges.iter().map(|h| h.pid).collect();
    let count = targets.len() as u64;
    let recorders = ctx.recorders(vec![Recorder::unicast(o.warmup), Recorder::unicast(count)]);
    let readers = connect_spread(ctx, &homes, &recorders).await?;
    let publisher = Publisher::connect(&o.amqp_url, exchange, o.publishers).await?;
    warm_up(ctx, &publisher, "warm-up").await?;
    let idle = idle_cpu(&pids, Duration::from_secs(2)).await;
    let before = Counters::read_all(bridges).await;
    ctx.progress.phase(&format!("{label}: measuring"));
    let window = measure(ctx, publisher, &recorders.runs[1], targets, &pids).await?;
    let after = Counters::read_all(bridges).await;
    let load = Load {
        measured: window.measured,
        cpu: window.cpu,
        idle,
        window: window.seconds,
        postgres: (pids.len() > 1).then_some(window.postgres),
        counters: after.iter().zip(&before).map(|(a, b)| a.minus(b)).collect(),
    };
    Ok((load, readers))
}

/// What the measured window gave.
struct Window {
    measured: Measured,
    cpu: Vec<Option<f64>>,
    seconds: f64,
    postgres: f64,
}

/// Publishes `targets` (run 1) at `--rate` and waits for them, timing the
/// CPU of `pids` (their sum is the configuration's CPU) and PostgreSQL's.
async fn measure(
    ctx: &Ctx,
    publisher: Publisher,
    rec: &Recorder,
    targets: &[u32],
    pids: &[u32],
) -> anyhow::Result<Window> {
    let o = &ctx.opts;
    let count = targets.len() as u64;
    ctx.progress.target.store(count, Relaxed);
    ctx.progress.received.store(0, Relaxed);
    let usage = bridge::CpuWindow::start(pids.first().copied().map(bridge::Subject::Process));
    let ticks = Ticks::start(pids.to_vec());
    let pg = Ticks::start(proc::pids_named("postgres"));
    let published = publish_to_users(ctx, &publisher, targets, 1).await?;
    publisher.close().await;
    ensure_confirmed(&published)?;
    wait_for(|| rec.seqs.unique(), count, o.drain_timeout).await;
    let (cpu, seconds) = ticks.stop();
    let postgres = pg.stop().0.into_iter().flatten().sum::<f64>();
    let mut used = usage.stop();
    let total: f64 = cpu.iter().flatten().sum();
    used.bridge = Some(total * 100.0 / seconds);
    used.bridge_seconds = Some(total);
    ctx.progress.target.store(0, Relaxed);
    Ok(Window {
        measured: Measured::of(rec, published, used),
        cpu,
        seconds,
        postgres,
    })
}

/// Sums of a few counters of one instance, read after a configuration ran.
#[derive(Default, Clone, Copy)]
struct Counters {
    live_received: f64,
    stored: f64,
    commits: f64,
    commit_seconds: f64,
    gap_repairs: f64,
    /// notify_bridge_delivery_seconds: from the delivery reaching this
    /// instance (a live message, in a cluster) to the frame written.
    deliveries: f64,
    delivery_seconds: f64,
    /// Commits, and last hops, that took more than [`SLOW_SECONDS`]: where a
    /// publish→frame tail comes from, or does not.
    slow_commits: f64,
    slow_deliveries: f64,
}

/// What counts as slow, in seconds: one of the bridge's histogram bucket
/// bounds (`metrics::LATENCY_BUCKETS`), so its `le` bucket is exact.
const SLOW_SECONDS: f64 = 0.01;

impl Counters {
    async fn read(handle: &Handle) -> Self {
        let m = |name: &'static str| async move { handle.metric(name, "").await.unwrap_or(-1.0) };
        let within = |name: &'static str| async move {
            let le = format!("le=\"{SLOW_SECONDS}\"");
            handle.metric(name, &le).await.unwrap_or(0.0)
        };
        let commits = m("notify_bridge_inbox_commit_seconds_count").await;
        let deliveries = m("notify_bridge_delivery_seconds_count").await;
        Self {
            live_received: m("notify_bridge_cluster_live_received_total").await,
            stored: m("notify_bridge_inbox_stored_total").await,
            commits,
            commit_seconds: m("notify_bridge_inbox_commit_seconds_sum").await,
            gap_repairs: m("notify_bridge_inbox_gap_repairs_total").await,
            deliveries,
            delivery_seconds: m("notify_bridge_delivery_seconds_sum").await,
            slow_commits: commits - within("notify_bridge_inbox_commit_seconds_bucket").await,
            slow_deliveries: deliveries - within("notify_bridge_delivery_seconds_bucket").await,
        }
    }

    async fn read_all(handles: &[Handle]) -> Vec<Self> {
        let mut out = Vec::new();
        for h in handles {
            out.push(Self::read(h).await);
        }
        out
    }

    fn minus(&self, b: &Self) -> Self {
        Self {
            live_received: self.live_received - b.live_received,
            stored: self.stored - b.stored,
            commits: self.commits - b.commits,
            commit_seconds: self.commit_seconds - b.commit_seconds,
            gap_repairs: self.gap_repairs - b.gap_repairs,
            deliveries: self.deliveries - b.deliveries,
            delivery_seconds: self.delivery_seconds - b.delivery_seconds,
            slow_commits: self.slow_commits - b.slow_commits,
            slow_deliveries: self.slow_deliveries - b.slow_deliveries,
        }
    }
}

/// Stops the bridges (SIGTERM); a non-zero exit is a problem of the run.
/// Their WARN/ERROR log lines are counted in a row (one each is expected:
/// no `http.api_keys` configured).
async fn stop_all(r: &mut Report, key: &str, label: &str, bridges: Vec<Bridge>) {
    let mut warnings = Vec::new();
    let mut lines = std::collections::BTreeSet::new();
    for (i, mut b) in bridges.into_iter().enumerate() {
        warnings.push(b.warnings());
        // The WARN/ERROR lines still in its log tail, without timestamps.
        for line in b.log_tail().lines() {
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                lines.insert(
                    line.split_once(' ')
                        .map_or(line, |(_, l)| l)
                        .trim()
                        .to_string(),
                );
            }
        }
        match b.stop().await {
            Ok(Some(0)) | Ok(None) => {}
            Ok(Some(code)) => r.problem(format!("{label} #{i} exited with code {code}")),
            Err(e) => r.problem(format!("{label} #{i}: {e:#}")),
        }
    }
    for line in lines {
        r.note(format!("{label}: {line}"));
    }
    let shown: Vec<String> = warnings.iter().map(u64::to_string).collect();
    r.add(
        &format!("{key}_warnings"),
        &format!("{label}: WARN/ERROR log lines"),
        serde_json::json!(warnings),
        shown.join(" / "),
    );
}

/// The cluster part: A, B, C on PostgreSQL, users on A and B.
async fn run_cluster(
    ctx: &Ctx,
    r: &mut Report,
    targets: &[u32],
) -> anyhow::Result<(Load, [Counters; 3])> {
    let db_url = create_schema(ctx).await?;
    let bridges = start_cluster(ctx, &db_url).await?;
    let handles: Vec<Handle> = bridges.iter().map(|b| b.handle()).collect();
    let exchange = names_for(&ctx.names, "cluster").exchange;
    let (load, readers) = drive(ctx, &exchange, &handles, 2, targets, "cluster").await?;
    let mut counters = [Counters::default(); 3];
    for (c, h) in counters.iter_mut().zip(&handles) {
        *c = Counters::read(h).await;
    }
    Reader::abort_all(readers);
    stop_all(r, "cluster", "cluster A / B / C", bridges).await;
    Ok((load, counters))
}

/// One instance, SQLite inbox (`inbox`) or none, every user on it.
async fn run_single(
    ctx: &Ctx,
    r: &mut Report,
    targets: &[u32],
    inbox: bool,
) -> anyhow::Result<Load> {
    let suffix = if inbox { "sqlite" } else { "none" };
    let names = names_for(&ctx.names, suffix);
    let bridge = start_instance(ctx, &names, inbox, suffix, Vec::new()).await?;
    let h = bridge.handle();
    let (load, readers) = drive(ctx, &names.exchange, &[h], 1, targets, suffix).await?;
    Reader::abort_all(readers);
    let key = if inbox { "sqlite" } else { "no_inbox" };
    stop_all(r, key, &format!("one instance, {suffix}"), vec![bridge]).await;
    Ok(load)
}

/// The scenario: the cluster, then one instance with SQLite, then one
/// without the inbox, the same stream each time; one report.
pub async fn cluster(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    postgres_url(ctx)?;
    ctx.check_fd_budget(o.users)?;
    let mut r = base_report(ctx, "cluster");
    r.param("users", o.users);
    r.param("messages", o.messages);
    r.param("rate", o.rate);
    r.param("cluster", cluster_name(&ctx.names));
    r.param("load_before", load_average());
    let targets = unicast_targets(o.seed, o.messages, o.users);
    let (cl, counters) = run_cluster(ctx, &mut r, &targets).await?;
    let sq = run_single(ctx, &mut r, &targets, true).await?;
    let none = run_single(ctx, &mut r, &targets, false).await?;
    r.param("load_after", load_average());

    let runs = [
        ("cluster", "cluster (A+B+C, PostgreSQL)", &cl),
        ("sqlite", "one instance, SQLite inbox", &sq),
        ("no_inbox", "one instance, no inbox", &none),
    ];
    for (key, label, load) in runs {
        add_measured(&mut r, key, label, &load.measured, o.messages);
        add_breakdown(&mut r, key, label, load);
    }
    describe_cluster(&mut r, &cl, &counters);
    r.target(
        "cluster p99 publish→frame",
        cl.measured.summary.p99 as f64 / 1e6,
        25.0,
        false,
        "ms",
    );
    plot_latency(
        ctx,
        &mut r,
        "cluster",
        &format!("cluster: {} users on A and B, {} msg/s", o.users, o.rate),
        &[
            ("cluster (PostgreSQL inbox)".into(), cl.measured.cdf.clone()),
            ("one instance, SQLite inbox".into(), sq.measured.cdf.clone()),
            ("one instance, no inbox".into(), none.measured.cdf.clone()),
        ],
    )?;
    Ok(r)
}

/// The 1-minute load average, as `uptime` shows it (other engineers share
/// the machine).
fn load_average() -> String {
    proc::load_average().map_or_else(String::new, |l| format!("{l:.2}"))
}

/// Where the mean publish→frame time goes, from the bridges' own
/// histograms over the measured window: the writer's commit, and each
/// holder's last hop (delivery at that instance → frame written; on one
/// instance that includes the commit). The rest is the broker hops, the
/// wait in the commit stage and, in a cluster, the presence lookup and the
/// live publish.
fn add_breakdown(r: &mut Report, key: &str, label: &str, load: &Load) {
    let mean_ms = |sum: f64, n: f64| if n > 0.0 { sum / n * 1e3 } else { 0.0 };
    let writer = load.counters.iter().find(|c| c.commits > 0.0);
    let commit = writer.map_or(0.0, |c| mean_ms(c.commit_seconds, c.commits));
    let per_commit = writer.map_or(0.0, |c| c.stored / c.commits);
    let (sum, n) = load.counters.iter().fold((0.0, 0.0), |(s, n), c| {
        (s + c.delivery_seconds, n + c.deliveries)
    });
    let last_hop = mean_ms(sum, n);
    let e2e = load.measured.summary.mean / 1e6;
    r.add(
        &format!("{key}_breakdown_ms"),
        &format!("{label}: mean e2e / commit (entries) / last hop"),
        serde_json::json!({"e2e": e2e, "commit": commit, "entries_per_commit": per_commit, "last_hop": last_hop}),
        format!("{e2e:.2} ms / {commit:.2} ms ({per_commit:.1}) / {last_hop:.2} ms"),
    );
    let slow_commits = writer.map_or(0.0, |c| c.slow_commits);
    let slow_hops: f64 = load.counters.iter().map(|c| c.slow_deliveries).sum();
    let slow_e2e = load.measured.over((SLOW_SECONDS * 1e9) as u64);
    r.add(
        &format!("{key}_over_10ms"),
        &format!("{label}: over 10 ms: publish→frame / commits / last hops"),
        serde_json::json!({"e2e": slow_e2e, "commits": slow_commits, "last_hops": slow_hops}),
        format!("{slow_e2e} / {slow_commits} / {slow_hops}"),
    );
}

/// One figure of each of A, B and C in one row (a JSON array, `a / b / c`
/// in the table); the figures.
fn add_per_instance(r: &mut Report, key: &str, label: &str, each: [f64; 3]) -> [f64; 3] {
    r.add(
        key,
        label,
        serde_json::json!(each),
        format!("{} / {} / {}", each[0], each[1], each[2]),
    );
    each
}

/// Per instance: CPU, live messages received; C's share; the writer.
fn describe_cluster(r: &mut Report, cl: &Load, counters: &[Counters; 3]) {
    let delivered = cl.measured.received.max(1) as f64;
    for (i, id) in INSTANCES.iter().enumerate() {
        let secs = cl.cpu[i];
        let pct = secs.map(|s| s * 100.0 / cl.window);
        let us = secs.map(|s| s * 1e6 / delivered);
        let show = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.1}{unit}"));
        let holds = ["holds odd users", "holds even users", "holds nobody"][i];
        let role = if counters[i].stored > 0.0 {
            format!("writer, {holds}")
        } else {
            holds.to_string()
        };
        r.add(
            &format!("cluster_cpu_{id}"),
            &format!("cluster: {} ({role}) CPU idle / loaded / per notification", id.to_uppercase()),
            serde_json::json!({"idle_percent": cl.idle[i], "percent": pct, "us_per_notification": us}),
            format!("{} / {} / {}", show(cl.idle[i], " %"), show(pct, " %"), show(us, " µs")),
        );
    }
    let live = add_per_instance(
        r,
        "cluster_live_received",
        "cluster: live messages received A / B / C (whole run)",
        counters.map(|c| c.live_received),
    );
    if live[2] != 0.0 {
        r.problem(format!(
            "instance C (holding nobody) received {} live messages",
            live[2]
        ));
    }
    add_per_instance(
        r,
        "cluster_stored",
        "cluster: entries stored by A / B / C (whole run)",
        counters.map(|c| c.stored),
    );
    r.add(
        "cluster_gap_repairs",
        "cluster: gap repairs A / B",
        counters[0].gap_repairs + counters[1].gap_repairs,
        format!("{} / {}", counters[0].gap_repairs, counters[1].gap_repairs),
    );
    if let Some(pg) = cl.postgres {
        let us = pg * 1e6 / delivered;
        r.add(
            "cluster_postgres_cpu_us_per_notification",
            "cluster: PostgreSQL server CPU (all its processes) / per notification",
            (us * 10.0).round() / 10.0,
            format!("{:.0} % / {us:.1} µs", pg * 100.0 / cl.window),
        );
    }
    // C's CPU above its own quiet level, per notification: what others'
    // messages cost the instance that holds none of their users.
    let c_loaded = cl.cpu[2].unwrap_or(0.0);
    let c_idle = cl.idle[2].unwrap_or(0.0) / 100.0 * cl.window;
    let c_us = (c_loaded - c_idle).max(0.0) * 1e6 / delivered;
    r.add(
        "c_cpu_us_per_others_notification",
        "cluster: C's CPU above idle per notification (1 tick = 10 ms)",
        (c_us * 100.0).round() / 100.0,
        format!("{c_us:.2} µs ({c_loaded:.2} s loaded vs {c_idle:.2} s idle)"),
    );
    r.target(
        "C's CPU above idle per others' notification",
        c_us,
        1.0,
        false,
        "µs",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the broker away, the run's schema is dropped all the same.
    /// Needs NOTIFY_BRIDGE_TEST_POSTGRES_URL (scripts/test sets it);
    /// skipped without it.
    #[tokio::test]
    async fn the_schema_is_dropped_even_when_the_broker_is_away() {
        let Ok(url) = std::env::var("NOTIFY_BRIDGE_TEST_POSTGRES_URL") else {
            eprintln!("SKIPPED: NOTIFY_BRIDGE_TEST_POSTGRES_URL is unset");
            return;
        };
        let names = Names::new();
        let schema = schema_name(&names);
        let db = pg_connect(&url).await.unwrap();
        db.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let refused = "amqp://guest:guest@127.0.0.1:1/%2f";
        assert!(cleanup(refused, Some(&url), &names).await.is_err());
        let left = db
            .query("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
            .await
            .unwrap();
        let _ = db
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await;
        assert!(left.is_empty(), "schema {schema} was left behind");
    }

    #[test]
    fn the_schema_url_keeps_existing_parameters() {
        assert_eq!(
            in_schema("postgres://u@127.0.0.1:1/db", "s1"),
            "postgres://u@127.0.0.1:1/db?options=-csearch_path%3Ds1"
        );
        assert_eq!(
            in_schema("postgres://u@127.0.0.1:1/db?sslmode=disable", "s1"),
            "postgres://u@127.0.0.1:1/db?sslmode=disable&options=-csearch_path%3Ds1"
        );
    }

    #[test]
    fn each_configuration_has_its_own_topology_and_the_run_its_own_names() {
        let names = Names::new();
        let (cluster, sqlite) = (names_for(&names, "cluster"), names_for(&names, "sqlite"));
        assert_ne!(cluster.exchange, sqlite.exchange);
        assert_ne!(cluster.queue, sqlite.queue);
        assert!(cluster.exchange.starts_with(&names.exchange));
        let other = Names::new();
        assert_ne!(cluster_name(&names), cluster_name(&other));
        assert_ne!(schema_name(&names), schema_name(&other));
        // A schema name PostgreSQL takes unquoted: lower case, digits, _.
        assert!(schema_name(&names)
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    }

    /// The slow count reads the bucket `le="0.01"`: a bound that is not
    /// one of the bridge's would match no line and count every commit.
    #[test]
    fn the_slow_bound_is_one_of_the_bridges_buckets() {
        use notify_bridge::metrics::LATENCY_BUCKETS;
        assert!(LATENCY_BUCKETS.contains(&SLOW_SECONDS));
        let metrics = notify_bridge::metrics::Metrics::default();
        metrics
            .inbox_commit_seconds
            .observe(std::time::Duration::from_millis(20));
        let body = metrics.render();
        let le = format!("notify_bridge_inbox_commit_seconds_bucket{{le=\"{SLOW_SECONDS}\"}} 0");
        assert!(body.contains(&le), "no {le} in {body}");
    }

    #[test]
    fn counters_over_a_window_are_differences() {
        let before = Counters {
            stored: 10.0,
            commits: 2.0,
            deliveries: 5.0,
            ..Default::default()
        };
        let after = Counters {
            stored: 25.0,
            commits: 5.0,
            deliveries: 5.0,
            ..Default::default()
        };
        let d = after.minus(&before);
        assert_eq!((d.stored, d.commits, d.deliveries), (15.0, 3.0, 0.0));
    }
}
