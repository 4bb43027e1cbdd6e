//! The idle scenario: sockets that receive nothing, and what each costs the
//! bridge at rest (RSS, fds); one broadcast at the end checks they all work.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use super::{base_report, wait_for, Ctx};
use crate::{
    bridge::Handle,
    clients::{self, Publisher, Reader, Recorder, Ws},
    report::{self, mib, Axis, Report, Series},
};

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
