//! The baseline: a bare lapin consumer with the bridge's prefetch and
//! topology that decodes each body as JSON, reads its stamp and acks as
//! the bridge does (one `multiple` ack at most [`ACK_DELAY`] after the
//! first it owes, or once a quarter of the prefetch is owed: at a steady
//! pace an ack per arrival would charge the floor a write and an I/O
//! thread wake-up per message that the bridge does not pay). No
//! WebSockets.
//!
//! It runs on a tokio runtime of its own, so its CPU can be told apart
//! from the bench's publisher: its runtime's threads plus its
//! connection's lapin I/O thread. That CPU per message is the floor any
//! lapin consumer pays on this machine, measured in the same run as the
//! bridge's (issue 13: a target below it is a target for the AMQP client).
//! With a [`FloorWork`] (`--floor`) it also does what no bridge can skip
//! (`floor.rs`), and its readers, not the consumer, record the arrivals.

use std::sync::{atomic::Ordering::Relaxed, Arc};

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
    Acker, Connection, ConnectionProperties, Consumer,
};
use notify_bridge::amqp::settle::ACK_DELAY;
use testkit::proc;
use tokio::{
    runtime::Runtime,
    task::JoinHandle,
    time::{sleep_until, Instant},
};

use crate::{
    clients::Recorders,
    floor::{FloorSide, FloorWork, BURST},
};

/// The name of the baseline runtime's threads.
const THREAD_NAME: &str = "bare-consumer";
/// The name lapin gives each connection's I/O thread.
const LAPIN_THREAD: &str = "lapin-io-loop";

/// A running baseline consumer; [`Baseline::stop`] ends it.
pub struct Baseline {
    connection: Connection,
    task: JoinHandle<anyhow::Result<()>>,
    /// `None` once shut down (a runtime must not be dropped inside
    /// another one's task, so it is shut down in the background).
    runtime: Option<Runtime>,
    threads: Vec<u32>,
    floor: Option<FloorSide>,
}

/// What the baseline does besides decoding and acking.
pub enum Extra {
    /// Nothing: lapin's own floor.
    Nothing,
    /// The floor of any bridge (`floor.rs`); with a store in this folder
    /// when it is `Some`.
    Floor {
        store_dir: Option<std::path::PathBuf>,
    },
}

impl Baseline {
    /// Declares the baseline's own exchange and queue with the daemon's
    /// topology code and starts consuming, so its figures come from the same
    /// broker path as the bridge's.
    pub async fn start(
        url: &str,
        exchange: &str,
        queue: &str,
        prefetch: u16,
        recorders: Arc<Recorders>,
        extra: Extra,
        quorum: bool,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name(THREAD_NAME)
            .enable_all()
            .build()
            .context("cannot start the baseline's runtime")?;
        let lapin_before = proc::my_threads_named(LAPIN_THREAD);
        let config = notify_bridge::config::AmqpConfig {
            url: url.to_string(),
            exchange: exchange.to_string(),
            queue: queue.to_string(),
            prefetch,
            ..Default::default()
        };
        let (connection, consumer) = runtime.spawn(connect(config, quorum)).await??;
        let mut threads = proc::my_threads_named(THREAD_NAME);
        threads.extend(
            proc::my_threads_named(LAPIN_THREAD)
                .into_iter()
                .filter(|tid| !lapin_before.contains(tid)),
        );
        let (work, floor) = match extra {
            Extra::Nothing => (None, None),
            Extra::Floor { store_dir } => {
                let (work, side) = FloorWork::open(&runtime, store_dir, &recorders).await?;
                (Some(work), Some(side))
            }
        };
        let ack_every = usize::from(prefetch / 4).max(1);
        let task = runtime.spawn(consume(consumer, recorders, ack_every, work));
        Ok(Self {
            connection,
            task,
            runtime: Some(runtime),
            threads,
            floor,
        })
    }

    /// The consumer's threads, for its CPU use.
    pub fn threads(&self) -> Vec<u32> {
        self.threads.clone()
    }

    /// Closes the connection and ends the consumer and its runtime, once
    /// the last ack it owed is out: unacked deliveries would come back to
    /// the next consumer of the queue (the floor's run follows on it) as
    /// duplicates.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        tokio::time::sleep(ACK_DELAY * 2).await;
        let _ = self.connection.close(200, "baseline done".into()).await;
        self.task.abort();
        if let Some(floor) = self.floor.take() {
            floor.finish();
        }
        Ok(())
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Connects, declares and starts consuming, on the baseline's runtime
/// (lapin's connection lives on the runtime it was opened from). With
/// `quorum`, the queue is declared as cluster mode declares its ingest
/// queue (quorum, single active consumer): that leg's own latency.
async fn connect(
    config: notify_bridge::config::AmqpConfig,
    quorum: bool,
) -> anyhow::Result<(Connection, Consumer)> {
    let url = &config.url;
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect the baseline consumer to {url}"))?;
    let ingest = match quorum {
        true => notify_bridge::amqp::topology::IngestQueue::shared(config.queue.clone()),
        false => notify_bridge::amqp::topology::IngestQueue::own(&config),
    };
    let channel = notify_bridge::amqp::topology::declare(&connection, &config, &ingest)
        .await
        .context("cannot declare the baseline's exchange and queue")?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            "bench-baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot consume the baseline queue")?;
    Ok((connection, consumer))
}

/// What the consumer waits for next. It lives on the stack for one turn
/// of the loop; boxing the delivery would add an allocation per message to
/// the floor being measured.
#[allow(clippy::large_enum_variant)]
enum Next {
    Delivery(lapin::Result<lapin::message::Delivery>),
    /// The owed ack's deadline passed.
    AckDue,
    /// The stream ended (the connection was closed).
    End,
}

/// Records each delivery (or, with `work`, hands it to the floor's work,
/// whose readers record it); acks with the bridge's policy (the module's
/// comment).
async fn consume(
    mut consumer: Consumer,
    recorders: Arc<Recorders>,
    ack_every: usize,
    mut work: Option<FloorWork>,
) -> anyhow::Result<()> {
    let (mut newest, mut owed, mut due): (Option<Acker>, usize, Option<Instant>) = (None, 0, None);
    loop {
        let next = tokio::select! {
            next = consumer.next() => next.map_or(Next::End, Next::Delivery),
            _ = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => Next::AckDue,
        };
        match next {
            Next::End => return Ok(()),
            Next::Delivery(delivery) => {
                let delivery = delivery?;
                let acker = match &mut work {
                    None => {
                        record_delivery(&delivery.data, &recorders);
                        owed += 1;
                        delivery.acker
                    }
                    Some(work) => {
                        let burst = burst(delivery, &mut consumer, work.takes_bursts())?;
                        work.deliver(&burst).await?;
                        owed += burst.len();
                        burst.into_iter().next_back().expect("a burst").acker
                    }
                };
                newest = Some(acker);
                due.get_or_insert_with(|| Instant::now() + ACK_DELAY);
                if owed < ack_every {
                    continue;
                }
            }
            Next::AckDue => {}
        }
        if let Some(acker) = newest.take() {
            acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .context("baseline ack failed")?;
        }
        (owed, due) = (0, None);
    }
}

/// `first` and, when `gather`, every delivery that is already there (up
/// to [`BURST`]), as the bridge's stage takes them.
fn burst(
    first: lapin::message::Delivery,
    consumer: &mut Consumer,
    gather: bool,
) -> anyhow::Result<Vec<lapin::message::Delivery>> {
    let mut burst = vec![first];
    while gather && burst.len() < BURST {
        match consumer.next().now_or_never() {
            Some(Some(delivery)) => burst.push(delivery?),
            Some(None) | None => break,
        }
    }
    Ok(burst)
}

fn record_delivery(data: &[u8], recorders: &Recorders) {
    let now = recorders.clock.now();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let payload = &value["payload"];
    let (Some(run), Some(seq), Some(sent)) = (
        payload["r"].as_u64(),
        payload["s"].as_u64(),
        payload["t"].as_u64(),
    ) else {
        return;
    };
    recorders.progress.received.fetch_add(1, Relaxed);
    let Some(rec) = recorders.runs.get(run as usize) else {
        return;
    };
    if run == 0 {
        return;
    }
    rec.frames.fetch_add(1, Relaxed);
    rec.last_receive.update(now);
    if rec.seqs.mark(seq) {
        rec.latency.record(now.saturating_sub(sent));
    }
}
