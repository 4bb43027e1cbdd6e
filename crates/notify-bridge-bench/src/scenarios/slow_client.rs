//! The slow-client scenario: the others' latency while some clients never
//! read, and how the bridge closed the slow ones.

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use super::{
    base_report, bridge_figures, close_reader, plot_latency, run_cdfs, wait_for, Ctx, Options,
};
use crate::{
    bridge::Handle,
    clients::{self, Publisher, Reader, Recorder, Recorders, Ws},
    report::Report,
    stats::Rng,
};

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
