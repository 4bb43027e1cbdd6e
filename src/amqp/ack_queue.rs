//! The settling task's queue: one item per delivery, read in batches, and
//! a receiver that is not woken for each of them.
//!
//! An ack waits up to [`super::settle::ACK_DELAY`] to be coalesced anyway,
//! yet a plain mpsc woke the settling task on every send: at a steady pace
//! that was one more task wake-up per notification, often the one that
//! woke the second worker thread (docs/performance.md, "Wake-ups per
//! notification"). Here a receiver that has a deadline sleeps through
//! sends until the deadline, until `wake_at` items wait, or until an
//! urgent item arrives; without a deadline, the first send wakes it.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::{
    sync::{mpsc, Notify},
    time::{sleep_until, Instant},
};

/// A queue whose receiver wakes early for `wake_at` waiting items.
pub(super) fn channel<T>(wake_at: usize) -> (Sender<T>, Receiver<T>) {
    let (items, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        waiting: AtomicUsize::new(0),
        wake_at: wake_at.max(1),
        early: Notify::new(),
    });
    let sender = Sender {
        items,
        shared: shared.clone(),
    };
    (sender, Receiver { items: rx, shared })
}

#[derive(Debug)]
struct Shared {
    /// Items sent and not yet taken by the receiver.
    waiting: AtomicUsize,
    wake_at: usize,
    /// Ends a receiver's wait for its deadline.
    early: Notify,
}

/// The sending half; the receiver sees the end once every clone is gone.
#[derive(Debug)]
pub(super) struct Sender<T> {
    items: mpsc::UnboundedSender<T>,
    shared: Arc<Shared>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self {
            items: self.items.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item`; an `urgent` one ends a receiver's wait for its
    /// deadline. `false` once the receiver is gone.
    pub fn send(&self, item: T, urgent: bool) -> bool {
        // Counted before it is in the channel: a receiver on another thread
        // may take it (and subtract it) the moment it is there.
        let waiting = self.shared.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        if self.items.send(item).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if urgent || waiting == self.shared.wake_at {
            self.shared.early.notify_one();
        }
        true
    }
}

/// The receiving half, for one task.
#[derive(Debug)]
pub(super) struct Receiver<T> {
    items: mpsc::UnboundedReceiver<T>,
    shared: Arc<Shared>,
}

impl<T> Receiver<T> {
    /// Moves up to `limit` items into `batch`: without a `deadline` as
    /// soon as there is one, with it once the deadline passed or the
    /// receiver was woken early (possibly none then). How many it moved;
    /// `None` when every sender is gone and nothing is left.
    pub async fn recv(
        &mut self,
        batch: &mut Vec<T>,
        limit: usize,
        deadline: Option<Instant>,
    ) -> Option<usize> {
        let taken = match deadline {
            None => match self.items.recv_many(batch, limit).await {
                0 => return None,
                taken => taken,
            },
            Some(deadline) => {
                tokio::select! {
                    _ = self.shared.early.notified() => {}
                    _ = sleep_until(deadline) => {}
                }
                if self.items.is_empty() {
                    0
                } else {
                    self.items.recv_many(batch, limit).await
                }
            }
        };
        self.shared.waiting.fetch_sub(taken, Ordering::Relaxed);
        Some(taken)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;
    use tokio::time::{advance, Instant};

    use std::sync::atomic::Ordering;

    use super::channel;

    const DELAY: Duration = Duration::from_millis(25);

    #[tokio::test(start_paused = true)]
    async fn a_receiver_with_a_deadline_sleeps_through_sends_until_it_is_due() {
        let (tx, mut rx) = channel(10);
        let mut batch = Vec::new();
        let deadline = Instant::now() + DELAY;
        {
            let wait = rx.recv(&mut batch, 256, Some(deadline));
            tokio::pin!(wait);
            for n in 0..9 {
                assert!(tx.send(n, false));
            }
            assert!(
                (&mut wait).now_or_never().is_none(),
                "woken before it was due"
            );
            advance(DELAY).await;
            assert_eq!(wait.await, Some(9));
        }
        assert_eq!(batch, (0..9).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn enough_waiting_items_or_an_urgent_one_wake_it_early() {
        let (tx, mut rx) = channel(3);
        let mut batch = Vec::new();
        let deadline = Instant::now() + DELAY;
        for n in 0..3 {
            tx.send(n, false);
        }
        let early = rx.recv(&mut batch, 256, Some(deadline)).now_or_never();
        assert_eq!(early, Some(Some(3)), "the third item must wake it");
        tx.send(3, true);
        let urgent = rx.recv(&mut batch, 256, Some(deadline)).now_or_never();
        assert_eq!(urgent, Some(Some(1)), "an urgent item must wake it");
        assert_eq!(batch, vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_the_first_item_wakes_it_and_the_end_is_seen() {
        let (tx, mut rx) = channel(100);
        let mut batch = Vec::new();
        {
            let wait = rx.recv(&mut batch, 256, None);
            tokio::pin!(wait);
            assert!((&mut wait).now_or_never().is_none());
            tx.send(7, false);
            assert_eq!(wait.await, Some(1));
        }
        let late = tx.clone();
        drop(tx);
        late.send(8, false);
        drop(late);
        assert_eq!(rx.recv(&mut batch, 256, None).await, Some(1));
        assert_eq!(rx.recv(&mut batch, 256, None).await, None);
        assert_eq!(batch, vec![7, 8]);
    }

    /// A receiver on another thread may take an item the moment it is in
    /// the channel: the count of waiting items must already include it, or
    /// the count wraps below zero (and the sender's next add overflows).
    #[test]
    fn a_receiver_racing_the_sender_never_sees_the_count_go_below_zero() {
        const ITEMS: usize = 200_000;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let (tx, mut rx) = channel::<usize>(usize::MAX);
        let shared = tx.shared.clone();
        let receiver = runtime.spawn(async move {
            let (mut batch, mut taken, mut wrapped) = (Vec::new(), 0, 0);
            while let Some(n) = rx.recv(&mut batch, 16, None).await {
                taken += n;
                batch.clear();
                if rx.shared.waiting.load(Ordering::Relaxed) > ITEMS {
                    wrapped += 1;
                }
            }
            (taken, wrapped)
        });
        let sender = std::thread::spawn(move || {
            for n in 0..ITEMS {
                tx.send(n, false);
            }
        });
        sender.join().expect("the sender must not panic");
        let (taken, wrapped) = runtime.block_on(receiver).unwrap();
        assert_eq!(taken, ITEMS);
        assert_eq!(wrapped, 0, "the waiting count went below zero");
        assert_eq!(shared.waiting.load(Ordering::Relaxed), 0);
    }
}
