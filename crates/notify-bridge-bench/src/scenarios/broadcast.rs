//! The broadcast scenario: every message to every socket; frames/s and the
//! latency to the last socket, beside the bare consumer's msg/s.

use std::sync::{atomic::Ordering::Relaxed, Arc};

use super::{add_cpu, base_report, bridge_figures, per_sec, plot_latency, wait_for, Ctx, Options};
use crate::{
    baseline::{Baseline, Extra},
    bridge::{self, Handle},
    clients::{self, Publisher, Reader, Recorder},
    report::Report,
    stats::Histogram,
};

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
