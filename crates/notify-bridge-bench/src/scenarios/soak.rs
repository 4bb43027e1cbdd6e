//! The soak scenario: steady traffic with connection churn; RSS and open
//! fds must stay flat.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use super::{
    base_report, bridge_figures, close_reader, plot_latency, publish_to_users, unicast_targets,
    wait_for, Ctx,
};
use crate::{
    bridge::Handle,
    clients::{self, Publisher, Reader, Recorder, Recorders},
    report::{self, mib, Axis, Report, Series},
};

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
