//! The PostgreSQL inbox store against a real server (scripts/postgres),
//! mirroring the SQLite store's unit tests, plus what only a shared server
//! has: concurrent writers on overlapping users, migrations run twice and
//! by two stores at once.

mod pg;

use std::sync::Arc;

use notify_bridge::inbox::{Change, Counts, Entry, ListQuery, NewMessage, PageBound, PgStore};

/// A store on a fresh schema, and that schema's URL; `None` when skipped.
async fn store() -> Option<(PgStore, String)> {
    let url = pg::fresh_schema().await?;
    Some((PgStore::connect(&url).await.unwrap(), url))
}

fn msg(users: &[&str], id: &str) -> NewMessage {
    NewMessage {
        users: users.iter().map(|u| u.to_string()).collect(),
        id: id.into(),
        event: "notification".into(),
        payload: format!(r#"{{"id":"{id}"}}"#),
    }
}

fn new(user: &str, id: &str) -> NewMessage {
    msg(&[user], id)
}

/// Appends one-user messages; their seqs.
async fn append(s: &PgStore, batch: &[NewMessage], max: usize) -> Vec<Option<u64>> {
    s.append(batch, 0, max).await.unwrap().concat()
}

async fn payloads(url: &str) -> i64 {
    pg::connect(url)
        .await
        .query_one("SELECT COUNT(*) FROM inbox_payloads", &[])
        .await
        .unwrap()
        .get(0)
}

const ALL: PageBound = PageBound {
    entries: 10_000,
    bytes: usize::MAX,
};

fn seqs(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn seqs_are_per_user_and_redeliveries_are_recognised() {
    let Some((s, _)) = store().await else { return };
    let got = append(
        &s,
        &[new("a", "1"), new("b", "1"), new("a", "2"), new("a", "1")],
        100,
    )
    .await;
    assert_eq!(got, vec![Some(1), Some(1), Some(2), None]);
    assert_eq!(
        append(&s, &[new("a", "2"), new("a", "3")], 100).await,
        vec![None, Some(3)]
    );
    // A batch of nothing but redeliveries takes no seq.
    assert_eq!(
        append(&s, &[new("a", "3"), new("b", "1")], 100).await,
        vec![None, None]
    );
    let replay = s.replay("a", Some(1), ALL).await.unwrap();
    assert_eq!(seqs(&replay.entries), vec![2, 3]);
    let counts = Counts {
        total: 3,
        unread: 3,
        ..Default::default()
    };
    assert_eq!((replay.counts, replay.through), (counts, 3));
    assert_eq!(replay.gap_oldest, None);
    // A removed entry is stored again when redelivered, with a new seq.
    s.change("a", &Change::Remove(vec!["1".into()]))
        .await
        .unwrap();
    assert_eq!(append(&s, &[new("a", "1")], 100).await, vec![Some(4)]);
}

#[tokio::test]
async fn a_message_for_many_users_keeps_one_payload() {
    let Some((s, url)) = store().await else {
        return;
    };
    let got = s
        .append(&[msg(&["a", "b", "c"], "m"), msg(&["a"], "n")], 0, 100)
        .await
        .unwrap();
    assert_eq!(got, vec![vec![Some(1), Some(1), Some(1)], vec![Some(2)]]);
    assert_eq!(payloads(&url).await, 2);
    let again = s.append(&[msg(&["a", "b"], "m")], 0, 100).await.unwrap();
    assert_eq!((again, payloads(&url).await), (vec![vec![None, None]], 2));
    let some = s.append(&[msg(&["a", "d"], "m")], 0, 100).await.unwrap();
    assert_eq!((some, payloads(&url).await), (vec![vec![None, Some(1)]], 3));
    let entry = &s.replay("c", Some(0), ALL).await.unwrap().entries[0];
    assert_eq!(
        (entry.id.as_str(), entry.payload.as_str()),
        ("m", r#"{"id":"m"}"#)
    );
}

#[tokio::test]
async fn payloads_no_entry_refers_to_are_freed() {
    let Some((s, url)) = store().await else {
        return;
    };
    s.append(&[msg(&["a", "b"], "shared")], 0, 2).await.unwrap();
    s.append(&[new("a", "x"), new("b", "y")], 5, 2)
        .await
        .unwrap();
    assert_eq!(payloads(&url).await, 3);
    // Count retention: a drops "shared"; b still refers to it.
    s.append(&[new("a", "z")], 10, 2).await.unwrap();
    assert_eq!(payloads(&url).await, 4);
    s.change("b", &Change::Remove(vec!["shared".into()]))
        .await
        .unwrap();
    assert_eq!(payloads(&url).await, 3, "x, y and z: shared freed");
    assert_eq!(s.expire(10).await.unwrap(), 2);
    assert_eq!(payloads(&url).await, 1);
    s.change("a", &Change::RemoveAll).await.unwrap();
    assert_eq!(payloads(&url).await, 0);
}

#[tokio::test]
async fn retention_makes_gaps_but_removals_do_not() {
    let Some((s, _)) = store().await else { return };
    for i in 1..=5 {
        append(&s, &[new("u", &i.to_string())], 3).await;
    }
    let replay = s.replay("u", Some(1), ALL).await.unwrap();
    assert_eq!(replay.gap_oldest, Some(3));
    assert_eq!(replay.entries.len(), 3);
    assert_eq!(s.replay("u", Some(2), ALL).await.unwrap().gap_oldest, None);
    s.change("u", &Change::Remove(vec!["3".into()]))
        .await
        .unwrap();
    assert_eq!(s.replay("u", Some(2), ALL).await.unwrap().gap_oldest, None);
    let beyond = s.replay("u", Some(99), ALL).await.unwrap();
    assert!(beyond.entries.is_empty() && beyond.gap_oldest.is_none());
    // Everything expired: the gap points at the next seq.
    assert_eq!(s.expire(1).await.unwrap(), 2);
    assert_eq!(
        s.replay("u", Some(2), ALL).await.unwrap().gap_oldest,
        Some(6)
    );
}

async fn held(s: &PgStore, user: &str) -> Vec<u64> {
    seqs(&s.replay(user, Some(0), ALL).await.unwrap().entries)
}

/// Retention runs only for users who may be past the limit (the seqs
/// between `dropped_through` and `next_seq` bound what a user holds): at
/// the limit nothing goes, one past it the oldest goes, a batch larger
/// than the limit keeps its newest, and removals never make it drop more.
#[tokio::test]
async fn retention_holds_at_the_limit_and_past_it_in_one_batch() {
    let Some((s, _)) = store().await else { return };
    for i in 1..=3 {
        append(&s, &[new("u", &i.to_string())], 3).await;
    }
    assert_eq!(held(&s, "u").await, [1, 2, 3], "at the limit");
    append(&s, &[new("u", "4")], 3).await;
    assert_eq!(held(&s, "u").await, [2, 3, 4], "one past it");
    let five: Vec<_> = (0..5).map(|i| new("v", &format!("b{i}"))).collect();
    append(&s, &five, 3).await;
    assert_eq!(held(&s, "v").await, [3, 4, 5], "a batch past it");
    s.change("u", &Change::Remove(vec!["3".into()]))
        .await
        .unwrap();
    append(&s, &[new("u", "5")], 3).await;
    assert_eq!(held(&s, "u").await, [2, 4, 5], "a removal made room");
    append(&s, &[new("u", "6"), new("u", "7")], 3).await;
    assert_eq!(held(&s, "u").await, [5, 6, 7]);
}

#[tokio::test]
async fn since_past_i64_replays_nothing_and_through_is_the_last_seq() {
    let Some((s, _)) = store().await else { return };
    append(&s, &[new("u", "1"), new("u", "2")], 100).await;
    for since in [1 << 63, u64::MAX, i64::MAX as u64] {
        let replay = s.replay("u", Some(since), ALL).await.unwrap();
        assert!(replay.entries.is_empty(), "since={since}");
        assert_eq!((replay.gap_oldest, replay.through), (None, 2), "{since}");
        let page = s.replay_page("u", since, u64::MAX, ALL).await.unwrap();
        assert!(page.is_empty());
    }
    let nobody = s.replay("nobody", Some(u64::MAX), ALL).await.unwrap();
    assert_eq!(nobody.through, 0);
}

#[tokio::test]
async fn pages_stop_at_their_count_and_byte_bounds() {
    let Some((s, _)) = store().await else { return };
    let big = |id: &str| NewMessage {
        payload: format!(r#""{}""#, "b".repeat(1000)),
        ..new("u", id)
    };
    let batch: Vec<NewMessage> = (1..=10).map(|i| big(&i.to_string())).collect();
    append(&s, &batch, 100).await;
    let by_count = PageBound {
        entries: 4,
        bytes: usize::MAX,
    };
    let first = s.replay("u", Some(0), by_count).await.unwrap();
    assert_eq!(
        (seqs(&first.entries), first.through),
        (vec![1, 2, 3, 4], 10)
    );
    let next = s.replay_page("u", 4, 10, by_count).await.unwrap();
    assert_eq!(seqs(&next), vec![5, 6, 7, 8]);
    let last = s.replay_page("u", 8, 9, by_count).await.unwrap();
    assert_eq!(seqs(&last), vec![9]);
    let by_bytes = PageBound {
        entries: 64,
        bytes: 2500,
    };
    let two = s.replay_page("u", 0, 10, by_bytes).await.unwrap();
    assert_eq!(seqs(&two), vec![1, 2]);
    let tiny = PageBound {
        entries: 64,
        bytes: 1,
    };
    let one = s.replay_page("u", 0, 10, tiny).await.unwrap();
    assert_eq!(seqs(&one), vec![1]);
    let query = ListQuery {
        unread_only: false,
        before: Some(10),
        limit: 3,
    };
    let (counts, page) = s.list("u", query, by_bytes).await.unwrap();
    assert_eq!((counts.total, seqs(&page)), (10, vec![9, 8]));
    let page = s.list_page("u", query, by_count).await.unwrap();
    assert_eq!(seqs(&page), vec![9, 8, 7]);
}

#[tokio::test]
async fn read_state_changes_touch_only_that_user() {
    let Some((s, _)) = store().await else { return };
    append(
        &s,
        &[new("a", "x"), new("a", "y"), new("a", "z"), new("b", "x")],
        100,
    )
    .await;
    let other = s
        .change("b", &Change::MarkRead(vec!["y".into(), "nope".into()]))
        .await
        .unwrap();
    let counts = |total, unread| Counts {
        total,
        unread,
        ..Default::default()
    };
    assert_eq!(other, (false, counts(1, 1)));
    let x = Change::MarkRead(vec!["x".into()]);
    assert_eq!(s.change("a", &x).await.unwrap(), (true, counts(3, 2)));
    assert!(!s.change("a", &x).await.unwrap().0);
    let up_to = s.change("a", &Change::MarkReadUpTo(2)).await.unwrap();
    assert_eq!(up_to.1.unread, 1);
    let unread_query = ListQuery {
        unread_only: true,
        before: None,
        limit: 10,
    };
    let (c, unread) = s.list("a", unread_query, ALL).await.unwrap();
    assert_eq!((c.total, unread.len(), unread[0].id.as_str()), (3, 1, "z"));
    let page_query = ListQuery {
        unread_only: false,
        before: Some(3),
        limit: 1,
    };
    let (_, page) = s.list("a", page_query, ALL).await.unwrap();
    assert_eq!(seqs(&page), vec![2]);
    let all = s.change("a", &Change::MarkAllRead).await.unwrap();
    assert_eq!(all.1.unread, 0);
    let removed = s.change("a", &Change::RemoveAll).await.unwrap();
    assert_eq!(removed, (true, Counts::default()));
    assert_eq!(s.replay("b", None, ALL).await.unwrap().counts.total, 1);
}

#[tokio::test]
async fn changes_take_forty_thousand_ids() {
    let Some((s, _)) = store().await else { return };
    append(&s, &[new("a", "id-1"), new("a", "id-39999")], 100).await;
    let ids: Vec<String> = (0..40_000).map(|i| format!("id-{i}")).collect();
    let (changed, counts) = s.change("a", &Change::MarkRead(ids.clone())).await.unwrap();
    assert_eq!((changed, counts.unread), (true, 0));
    let (changed, counts) = s.change("a", &Change::Remove(ids)).await.unwrap();
    assert_eq!((changed, counts.total), (true, 0));
}

/// Four stores (four instances) write batches for overlapping users at
/// once: every user's seqs are exactly 1..=N, none twice, and no writer
/// fails (a deadlock would be an error after its retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_concurrent_writers_on_overlapping_users_get_dense_unique_seqs() {
    let Some(url) = pg::fresh_schema().await else {
        return;
    };
    const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
    const BATCHES: usize = 50;
    let mut writers = Vec::new();
    for w in 0..4 {
        let s = Arc::new(PgStore::connect(&url).await.unwrap());
        writers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for b in 0..BATCHES {
                // Each batch names the users in a different order, and
                // writers overlap on most of them.
                let mut users: Vec<&str> = USERS.iter().copied().skip(w % 2).collect();
                let len = users.len();
                users.rotate_left((w + b) % len);
                let batch: Vec<NewMessage> = (0..4)
                    .map(|i| {
                        let end = (i + 1 + i % 2).min(users.len());
                        msg(&users[i..end], &format!("w{w}-b{b}-{i}"))
                    })
                    .collect();
                let seqs = s.append(&batch, 0, 100_000).await.unwrap();
                for (m, seqs) in batch.iter().zip(seqs) {
                    for (u, seq) in m.users.iter().zip(seqs) {
                        got.push((u.clone(), seq.expect("every id is new")));
                    }
                }
            }
            got
        }));
    }
    let mut by_user: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for w in writers {
        for (u, seq) in w.await.unwrap() {
            by_user.entry(u).or_default().push(seq);
        }
    }
    let check = PgStore::connect(&url).await.unwrap();
    for (user, mut got) in by_user {
        got.sort_unstable();
        let n = got.len() as u64;
        assert_eq!(got, (1..=n).collect::<Vec<_>>(), "{user}'s seqs");
        let replay = check.replay(&user, Some(0), ALL).await.unwrap();
        assert_eq!((replay.through, replay.counts.total), (n, n), "{user}");
    }
}

/// Four stores append the same batches at once, as an instance taking
/// over the ingest queue does with what the dead one committed but had
/// not acked: each (user, id) is stored once, by one of them, the others
/// told it was held, and every user's seqs stay 1..=N. A writer that
/// waited for another's lock must see what that one committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_racing_on_the_same_messages_store_each_once() {
    let Some(url) = pg::fresh_schema().await else {
        return;
    };
    const USERS: [&str; 3] = ["d0", "d1", "d2"];
    const BATCHES: usize = 40;
    let mut writers = Vec::new();
    for _ in 0..4 {
        let s = Arc::new(PgStore::connect(&url).await.unwrap());
        writers.push(tokio::spawn(async move {
            let mut stored = Vec::new();
            for b in 0..BATCHES {
                let batch: Vec<NewMessage> =
                    (0..3).map(|i| msg(&USERS, &format!("b{b}-{i}"))).collect();
                let seqs = s.append(&batch, 0, 100_000).await.unwrap();
                for (m, seqs) in batch.iter().zip(seqs) {
                    for (u, seq) in m.users.iter().zip(seqs) {
                        stored.extend(seq.map(|seq| (u.clone(), m.id.clone(), seq)));
                    }
                }
            }
            stored
        }));
    }
    let mut stored = Vec::new();
    for w in writers {
        stored.extend(w.await.unwrap());
    }
    let n = (BATCHES * 3) as u64;
    assert_eq!(
        stored.len() as u64,
        n * USERS.len() as u64,
        "each pair once"
    );
    let check = PgStore::connect(&url).await.unwrap();
    for user in USERS {
        let mut got: Vec<u64> = stored
            .iter()
            .filter(|(u, _, _)| u == user)
            .map(|(_, _, seq)| *seq)
            .collect();
        got.sort_unstable();
        assert_eq!(got, (1..=n).collect::<Vec<_>>(), "{user}'s seqs");
        let replay = check.replay(user, Some(0), ALL).await.unwrap();
        assert_eq!((replay.through, replay.counts.total), (n, n), "{user}");
    }
}

#[tokio::test]
async fn migrations_run_once_and_two_stores_may_start_at_once() {
    let Some(url) = pg::fresh_schema().await else {
        return;
    };
    let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
    let (a, _b) = (a.unwrap(), b.unwrap());
    append(&a, &[new("u", "1")], 10).await;
    // A third start is a no-op: the data is still there, one version row.
    let c = PgStore::connect(&url).await.unwrap();
    assert_eq!(c.replay("u", None, ALL).await.unwrap().through, 1);
    let db = pg::connect(&url).await;
    let versions: Vec<i32> = db
        .query("SELECT version FROM inbox_schema_version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        versions,
        (1..=notify_bridge::inbox::postgres_schema::VERSION).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_schema_from_a_newer_bridge_is_refused() {
    let Some((_, url)) = store().await else {
        return;
    };
    pg::connect(&url)
        .await
        .execute(
            "INSERT INTO inbox_schema_version (version) VALUES (999)",
            &[],
        )
        .await
        .unwrap();
    let err = PgStore::connect(&url).await.err().expect("refused");
    assert!(format!("{err:#}").contains("newer"), "{err:#}");
}

/// Appends, removals and ttl expiry from three stores at once on the same
/// users: all take the users' rows in the same order, so none fails (a
/// deadlock would surface as an error after its retries) and every seq is
/// handed out once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_removals_and_expiry_at_once_do_not_deadlock() {
    let Some(url) = pg::fresh_schema().await else {
        return;
    };
    const USERS: [&str; 4] = ["x0", "x1", "x2", "x3"];
    const ROUNDS: i64 = 60;
    let writer = Arc::new(PgStore::connect(&url).await.unwrap());
    let remover = Arc::new(PgStore::connect(&url).await.unwrap());
    let expirer = Arc::new(PgStore::connect(&url).await.unwrap());
    let appends = tokio::spawn(async move {
        for round in 0..ROUNDS {
            let batch: Vec<NewMessage> = (0..3)
                .map(|i| msg(&USERS, &format!("r{round}-{i}")))
                .collect();
            writer.append(&batch, round, 5).await.unwrap();
        }
    });
    let removals = tokio::spawn(async move {
        for round in 0..ROUNDS {
            let user = USERS[round as usize % USERS.len()];
            let ids = vec![format!("r{}-1", round.saturating_sub(1))];
            remover.change(user, &Change::Remove(ids)).await.unwrap();
        }
    });
    let expiry = tokio::spawn(async move {
        for round in 0..ROUNDS {
            expirer.expire(round - 10).await.unwrap();
        }
    });
    let (a, r, e) = tokio::join!(appends, removals, expiry);
    a.unwrap();
    r.unwrap();
    e.unwrap();
    let check = PgStore::connect(&url).await.unwrap();
    for user in USERS {
        let replay = check.replay(user, Some(0), ALL).await.unwrap();
        assert_eq!(replay.through, 3 * ROUNDS as u64, "{user}");
        let got = seqs(&replay.entries);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{user}: {got:?}");
        assert!(got.len() <= 5, "{user}: retention kept {got:?}");
    }
}

#[tokio::test]
async fn a_failed_batch_leaves_nothing_and_the_connections_usable() {
    let Some((s, _)) = store().await else { return };
    assert_eq!(append(&s, &[new("a", "1")], 100).await, vec![Some(1)]);
    // PostgreSQL's text refuses NUL: in an event, the insert fails after
    // the lock took the user's row and reserved a seq for the batch; in a
    // user id, the lock itself fails, before any COMMIT was sent.
    let mut bad_event = new("a", "2");
    bad_event.event = "no\0pe".into();
    let bad_user = msg(&["a", "b\0"], "2");
    for _ in 0..10 {
        assert!(s
            .append(std::slice::from_ref(&bad_event), 0, 100)
            .await
            .is_err());
        assert!(s
            .append(std::slice::from_ref(&bad_user), 0, 100)
            .await
            .is_err());
    }
    // Every pooled connection is out of the failed transactions, and the
    // reservation went with them: seq 2 is the next one.
    assert_eq!(append(&s, &[new("a", "3")], 100).await, vec![Some(2)]);
    let replay = s.replay("a", Some(0), ALL).await.unwrap();
    assert_eq!(seqs(&replay.entries), vec![1, 2]);
}
