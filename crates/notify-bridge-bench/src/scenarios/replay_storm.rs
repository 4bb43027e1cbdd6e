//! The replay-storm scenario (issue 11): users with the inbox on receive a
//! steady paced stream while one user with a full inbox reconnects in a
//! loop with `since=0`. It reports the others' commit latency (the
//! bridge's `notify_bridge_inbox_commit_seconds`, per phase from /metrics)
//! and their publish→frame latency, in three phases of one run: quiet,
//! storm, quiet again (the second quiet phase shows the run's own noise).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use futures_util::StreamExt;
use testkit::proc::{self, Pid};
use tokio_tungstenite::tungstenite::Message;

use super::{base_report, plot_latency, publish_to_users, run_cdfs, wait_for, Ctx};
use crate::{
    bridge::{self, Handle},
    clients::{self, Publisher, Reader, Recorder, Recorders},
    report::{self, Report},
    stats::Rng,
};

const HISTOGRAM: &str = "notify_bridge_inbox_commit_seconds";

/// The commit histogram at one moment.
#[derive(Clone, Default)]
struct Commits {
    sum: f64,
    count: f64,
    /// (upper bound in seconds, cumulative count), `+Inf` last.
    buckets: Vec<(f64, f64)>,
}

impl Commits {
    async fn read(handle: &Handle) -> anyhow::Result<Self> {
        let (status, body) = bridge::http_get(handle.http_addr, "/metrics").await?;
        anyhow::ensure!(status == 200, "GET /metrics answered {status}");
        let mut out = Commits::default();
        for line in body.lines().filter(|l| l.starts_with(HISTOGRAM)) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            let rest = &series[HISTOGRAM.len()..];
            if rest == "_sum" {
                out.sum = value;
            } else if rest == "_count" {
                out.count = value;
            } else if let Some(le) = rest.strip_prefix("_bucket{le=\"") {
                let le = le.trim_end_matches("\"}");
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                };
                out.buckets.push((bound, value));
            }
        }
        Ok(out)
    }

    /// What happened between `earlier` and `self`: (commits, mean seconds,
    /// upper bound of the bucket holding the 99th percentile).
    fn since(&self, earlier: &Commits) -> (f64, f64, f64) {
        let count = self.count - earlier.count;
        if count <= 0.0 {
            return (0.0, 0.0, 0.0);
        }
        let mean = (self.sum - earlier.sum) / count;
        let p99 = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .find(|((_, now), (_, then))| now - then >= 0.99 * count)
            .map_or(f64::INFINITY, |((bound, _), _)| *bound);
        (count, mean, p99)
    }
}

/// What the storm did.
#[derive(Default)]
struct Storm {
    stop: AtomicBool,
    replays: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// Reconnects as `user` with `since=0` and reads the whole replay
/// (`entries` frames), again and again until stopped.
async fn storm_loop(storm: Arc<Storm>, ws_addr: std::net::SocketAddr, token: String, entries: u64) {
    let url = format!("ws://{ws_addr}/ws?token={token}&since=0");
    while !storm.stop.load(Relaxed) {
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            storm.errors.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut got = 0;
        while got < entries {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    storm.bytes.fetch_add(t.len() as u64, Relaxed);
                    if t.as_str().contains(r#""seq":"#) {
                        got += 1;
                        storm.frames.fetch_add(1, Relaxed);
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => {
                    storm.errors.fetch_add(1, Relaxed);
                    break;
                }
            }
        }
        if got >= entries {
            storm.replays.fetch_add(1, Relaxed);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
}

/// Runs the storm on a thread and runtime of its own, so that reading
/// replays as fast as it can does not delay this process's measuring
/// clients (the hostile client would be another machine).
fn spawn_storm(
    storm: Arc<Storm>,
    ws_addr: std::net::SocketAddr,
    token: String,
    entries: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the storm");
        runtime.block_on(storm_loop(storm, ws_addr, token, entries));
    })
}

/// Fills the storm user's inbox (run 0: not measured) and waits until it
/// is committed.
async fn fill_storm_inbox(
    ctx: &Ctx,
    handle: &Handle,
    publisher: &Publisher,
    user: u64,
) -> anyhow::Result<()> {
    let o = &ctx.opts;
    ctx.progress.phase("filling the storm user's inbox");
    publisher
        .run(
            o.storm_entries,
            0.0,
            o.window,
            ctx.clock,
            &ctx.progress,
            |s, t, out| {
                clients::body(
                    out,
                    &format!(r#""user_id":{user}"#),
                    0,
                    s,
                    t,
                    o.storm_payload,
                )
            },
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while handle
        .metric("notify_bridge_inbox_stored_total", "")
        .await
        .unwrap_or(0.0)
        < o.storm_entries as f64
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the storm user's entries were not stored within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One phase's figures.
struct Phase {
    commits: (f64, f64, f64),
    /// The bridge's peak RSS during the phase, when it could be reset.
    peak_rss: Option<u64>,
    cpu: bridge::CpuUse,
    latency: crate::stats::Summary,
    lost: u64,
}

/// What every phase uses.
struct Rig<'a> {
    handle: &'a Handle,
    publisher: &'a Publisher,
    recorders: &'a Arc<Recorders>,
    storm: Arc<Storm>,
    /// The addressed user of each message.
    plan: &'a [u32],
    storm_user: u64,
}

/// One phase: the paced stream as run `run`, with the storm when `run` is
/// 2; the commit histogram, CPU and latency over it.
async fn run_phase(ctx: &Ctx, rig: &Rig<'_>, run: usize, label: &str) -> anyhow::Result<Phase> {
    let o = &ctx.opts;
    let count = rig.plan.len() as u64;
    let storm_thread = (run == 2).then(|| {
        let token = ctx.tokens()(rig.storm_user).expect("a token");
        let entries = o.storm_entries.min(1000);
        spawn_storm(rig.storm.clone(), rig.handle.ws_addr, token, entries)
    });
    ctx.progress.phase(&format!("phase {label}"));
    ctx.progress.received.store(0, Relaxed);
    let before = Commits::read(rig.handle).await?;
    let cpu = bridge::CpuWindow::start(Some(bridge::Subject::Process(rig.handle.pid)));
    let peak_reset = proc::reset_peak_rss(Pid::Of(rig.handle.pid)).is_ok();
    publish_to_users(ctx, rig.publisher, rig.plan, run).await?;
    let rec = rig.recorders.runs[run].clone();
    let unique = wait_for(|| rec.seqs.unique(), count, o.drain_timeout).await;
    let after = Commits::read(rig.handle).await?;
    let cpu = cpu.stop();
    let peak_rss = peak_reset
        .then(|| proc::peak_rss_bytes(Pid::Of(rig.handle.pid)).ok())
        .flatten();
    if let Some(thread) = storm_thread {
        rig.storm.stop.store(true, Relaxed);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    Ok(Phase {
        commits: after.since(&before),
        peak_rss,
        cpu,
        latency: rec.latency.summary(),
        lost: count.saturating_sub(unique),
    })
}

/// The scenario: fill the storm user's inbox, connect the others, run the
/// three phases, report.
pub async fn replay_storm(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.opts;
    anyhow::ensure!(
        o.inbox,
        "replay-storm needs the inbox (it sets --inbox itself)"
    );
    ctx.check_fd_budget(o.users + 4)?;
    let mut r = base_report(ctx, "replay-storm");
    r.param("users", o.users);
    r.param("rate", o.rate);
    r.param("duration_s", o.duration.as_secs_f64());
    r.param("storm_entries", o.storm_entries);
    r.param("storm_payload", o.storm_payload as u64);
    let count = (o.rate * o.duration.as_secs_f64()).round().max(1.0) as u64;
    let storm_user = o.users + 1;
    let mut rng = Rng::new(o.seed);
    let plan: Vec<u32> = (0..count).map(|_| 1 + rng.below(o.users) as u32).collect();

    let handle = ctx.start_bridge().await?;
    let publisher = Publisher::connect(&o.amqp_url, &ctx.names.exchange, o.publishers).await?;
    fill_storm_inbox(ctx, &handle, &publisher, storm_user).await?;
    ctx.progress.phase("connecting");
    let sockets = ctx.connect(&handle, 1, o.users, 0, None).await?;
    // Let the fill's commits and WAL checkpoints settle before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let recorders = ctx.recorders(
        (0..4)
            .map(|i| Recorder::unicast(if i == 0 { 0 } else { count }))
            .collect(),
    );
    let readers = Reader::spawn_all(sockets, &recorders);

    let rig = Rig {
        handle: &handle,
        publisher: &publisher,
        recorders: &recorders,
        storm: Arc::new(Storm::default()),
        plan: &plan,
        storm_user,
    };
    let mut phases = Vec::new();
    for (run, label) in [(1, "A (quiet)"), (2, "B (storm)"), (3, "C (quiet again)")] {
        phases.push(run_phase(ctx, &rig, run, label).await?);
    }
    let storm = rig.storm;
    publisher.close().await;
    Reader::abort_all(readers);
    describe(&mut r, &phases, &storm, count);
    super::bridge_figures(&mut r, &handle).await;
    let title = format!(
        "replay-storm: {} users at {} msg/s, one user replaying {} entries in a loop",
        o.users, o.rate, o.storm_entries
    );
    let runs = [
        ("others, quiet", 1),
        ("others, during the storm", 2),
        ("others, quiet again", 3),
    ];
    plot_latency(
        ctx,
        &mut r,
        "replay-storm",
        &title,
        &run_cdfs(&recorders, &runs),
    )?;
    Ok(r)
}

fn percent(after: f64, before: f64) -> f64 {
    if before > 0.0 {
        ((after / before - 1.0) * 1000.0).round() / 10.0
    } else {
        0.0
    }
}

/// The report rows: per phase, then the storm's effect and the target.
fn describe(r: &mut Report, phases: &[Phase], storm: &Storm, count: u64) {
    let names = ["quiet", "storm", "quiet_again"];
    for (phase, name) in phases.iter().zip(names) {
        describe_phase(r, phase, name, count);
    }
    let (quiet, storm_mean, again) = (
        phases[0].commits.1,
        phases[1].commits.1,
        phases[2].commits.1,
    );
    let change = percent(storm_mean, (quiet + again) / 2.0);
    r.add(
        "commit_mean_change_percent",
        "commit mean, storm vs the quiet phases' mean",
        change,
        format!(
            "{change:+.1} % (quiet → quiet again: {:+.1} %)",
            percent(again, quiet)
        ),
    );
    let p99_change = percent(
        phases[1].latency.p99 as f64,
        (phases[0].latency.p99 + phases[2].latency.p99) as f64 / 2.0,
    );
    r.add(
        "others_p99_change_percent",
        "others' publish→frame p99, storm vs quiet",
        p99_change,
        format!("{p99_change:+.1} %"),
    );
    describe_storm(r, storm);
    r.target(
        "others' commit mean change during the storm",
        change,
        10.0,
        false,
        "%",
    );
}

/// One phase's rows (`name` in their keys): the others' commit mean,
/// latency, CPU and the bridge's peak RSS; a problem when messages were
/// lost.
fn describe_phase(r: &mut Report, phase: &Phase, name: &str, count: u64) {
    let (commits, mean, p99) = phase.commits;
    r.add(
        &format!("commit_mean_ms_{name}"),
        &format!("others' commit mean ({name})"),
        (mean * 1e6).round() / 1e3,
        format!(
            "{:.3} ms over {commits} commits, p99 ≤ {} ms",
            mean * 1e3,
            p99 * 1e3
        ),
    );
    r.latency(
        &format!("others_latency_{name}"),
        &format!("others, {name}"),
        &phase.latency,
    );
    super::add_cpu(
        r,
        &format!("cpu_{name}"),
        &format!("CPU, {name}"),
        &phase.cpu,
    );
    if let Some(peak) = phase.peak_rss {
        r.add(
            &format!("peak_rss_bytes_{name}"),
            &format!("bridge: peak RSS ({name})"),
            peak,
            report::mib(peak as f64),
        );
    }
    if phase.lost > 0 {
        r.problem(format!("{name}: {} of {count} messages lost", phase.lost));
    }
}

/// What the storm user read: whole replays, frames, bytes, errors; a
/// problem when it never read a whole one (then the storm measured
/// nothing).
fn describe_storm(r: &mut Report, storm: &Storm) {
    let replays = storm.replays.load(Relaxed);
    r.add(
        "storm_replays",
        "storm: whole replays read",
        replays,
        format!(
            "{replays} ({} frames, {}, {} errors)",
            storm.frames.load(Relaxed),
            report::mib(storm.bytes.load(Relaxed) as f64),
            storm.errors.load(Relaxed)
        ),
    );
    if replays == 0 {
        r.problem("the storm user never read a whole replay");
    }
}
