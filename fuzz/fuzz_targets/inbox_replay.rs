//! The inbox store under a fuzzed sequence of writes and replays:
//! `notify_bridge::inbox::sqlite::SqliteStore` (the default store) and its
//! reader, against a model of what the contract promises.
//!
//! Input: a sequence of operations, two or nine bytes each: `append` (a
//! message with one of 8 ids for a subset of 3 users), `remove` and
//! `read` (one id for one user), and `replay` (one user, with a `since`
//! taken from 8 input bytes, so any u64 from 0 to 2^64-1 is reached).
//!
//! The oracle is CONTRACT.md's, checked after every replay: `through` is
//! the last seq assigned to that user (never more); the entries are exactly
//! the model's held entries with `since < seq <= through`, in order; a
//! `since` at or beyond the last seq replays nothing. Seqs are dense per
//! user (1, 2, 3, …, never reused) and a redelivered id is recognised. A
//! `since` cast to a negative `i64` once replayed everything, and a session
//! that took `since` itself as its dedupe mark dropped every later live
//! frame; both break this oracle.
#![no_main]

use std::{collections::BTreeMap, path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use notify_bridge::inbox::{
    sqlite::SqliteStore,
    store::{Change, InboxReader, InboxStore, NewMessage, PageBound},
};

const USERS: [&str; 3] = ["a", "b", "c"];

/// One scratch folder per fuzzing process, on tmpfs when there is one, so
/// the store's fsyncs cost little.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("nb-fuzz-inbox-{}", std::process::id()))
    })
}

/// What the contract says a user's inbox holds.
#[derive(Default)]
struct Model {
    /// The last seq assigned to the user (0: none yet).
    last: u64,
    /// Held entries: seq to id.
    held: BTreeMap<u64, String>,
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let _ = std::fs::remove_dir_all(dir);
    let mut store = SqliteStore::open(&dir.join("inbox.db")).expect("a fresh store opens");
    let mut reader = store.reader().expect("a reader");
    let mut model: BTreeMap<&str, Model> = BTreeMap::new();
    let big = PageBound {
        entries: 10_000,
        bytes: usize::MAX,
    };

    let mut ops = data;
    while let [op, arg, rest @ ..] = ops {
        ops = rest;
        let user = USERS[(*arg % 3) as usize];
        let id = format!("m{}", (*arg >> 2) % 8);
        match op % 4 {
            0 => {
                let users: Vec<String> = USERS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (op >> (2 + i)) & 1 == 1 || *i == (*arg % 3) as usize)
                    .map(|(_, u)| u.to_string())
                    .collect();
                let message = NewMessage {
                    id: id.clone(),
                    event: "notification".into(),
                    payload: format!(r#"{{"id":"{id}"}}"#),
                    users: users.clone(),
                };
                let seqs = store.append(&[message], 0, 1000).expect("append");
                for (user, seq) in users.iter().zip(&seqs[0]) {
                    let m = model.entry(USERS.iter().find(|u| *u == user).unwrap()).or_default();
                    let holds = m.held.values().any(|held| *held == id);
                    match seq {
                        Some(seq) => {
                            assert!(!holds, "{id} stored twice for {user}");
                            assert_eq!(*seq, m.last + 1, "seqs are dense for {user}");
                            m.last = *seq;
                            m.held.insert(*seq, id.clone());
                        }
                        None => assert!(holds, "{id} not stored for {user}, who lacks it"),
                    }
                }
            }
            1 => {
                store.change(user, &Change::Remove(vec![id.clone()])).expect("remove");
                if let Some(m) = model.get_mut(user) {
                    m.held.retain(|_, held| *held != id);
                }
            }
            2 => {
                store.change(user, &Change::MarkRead(vec![id])).expect("read");
            }
            _ => {
                let Some((since_bytes, rest)) = ops.split_first_chunk::<8>() else {
                    return;
                };
                ops = rest;
                let since = u64::from_le_bytes(*since_bytes);
                let replay = reader.replay(user, Some(since), big).expect("replay");
                let m = model.entry(user).or_default();
                assert_eq!(replay.through, m.last, "through for {user}");
                let got: Vec<(u64, &str)> =
                    replay.entries.iter().map(|e| (e.seq, e.id.as_str())).collect();
                let want: Vec<(u64, &str)> = m
                    .held
                    .range(since.saturating_add(1)..)
                    .map(|(seq, id)| (*seq, id.as_str()))
                    .collect();
                assert_eq!(got, want, "replay of {user} since {since}");
                if since >= m.last {
                    assert!(replay.entries.is_empty());
                }
            }
        }
    }
});
