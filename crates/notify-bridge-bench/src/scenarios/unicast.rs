//! The unicast and baseline scenarios: N users with one socket each, M
//! messages to random users through the bridge, beside the bare consumer
//! and (`--floor`) the floor on the same stream; and the bare consumer alone.

use std::sync::atomic::Ordering::Relaxed;

use super::{
    add_measured, base_report, bridge_figures, drive_unicast, plot_latency, run_baseline,
    unicast_targets, Ctx, Measured, Options,
};
use crate::{
    baseline::Extra,
    bridge::{self, Handle},
    clients::{Reader, Recorder},
    report::Report,
};

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
        add_cpu_ratio(r, "cpu_ratio_to_baseline", "bare consumer", m, b);
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

/// The bridge's CPU per notification over `other`'s, measured in the same
/// run (the ratio is what a noisy machine leaves comparable).
fn add_cpu_ratio(r: &mut Report, key: &str, other_label: &str, m: &Measured, other: &Measured) {
    if let (Some(bridge), Some(them)) = (m.cpu_us_per_message(), other.cpu_us_per_message()) {
        let ratio = bridge / them.max(1e-3);
        r.add(
            key,
            &format!("bridge CPU ÷ {other_label} CPU per notification"),
            (ratio * 1000.0).round() / 1000.0,
            format!("{ratio:.2}"),
        );
    }
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
    add_cpu_ratio(r, "cpu_ratio_to_floor", "floor", m, f);
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
