//! The default store: one SQLite file, written by one connection.
//!
//! SQLite (through rusqlite with the bundled library) because it is one file
//! with no server to run, survives `kill -9` with every committed
//! transaction (WAL, `synchronous = FULL`), lets readers on their own
//! connections run beside the writer (WAL), and operators can open it with
//! the `sqlite3` tool they already know.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    schema,
    sqlite_read::{self, SqliteReader},
    store::{Change, Changed, InboxReader, InboxStore, NewMessage, ReadEntry},
};

/// The writing side of the SQLite store.
pub struct SqliteStore {
    db: Connection,
    path: PathBuf,
}

/// Creates missing folders `0700` and the file `0600` before SQLite opens
/// it: SQLite gives `-wal` and `-shm` the main file's mode, so the store's
/// contents are never readable by other local users.
fn create_private(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true);
        #[cfg(unix)]
        dirs.mode(0o700);
        dirs.create(parent)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create(true);
    #[cfg(unix)]
    file.mode(0o600);
    file.open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    Ok(())
}

impl SqliteStore {
    /// Opens or creates the store at `path`, creating missing folders, and
    /// migrates an older schema. Any failure (unwritable, not a database,
    /// corrupt, newer schema) is an error.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        create_private(path)?;
        let mut db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let check: String = db.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            anyhow::bail!("the store failed its integrity check: {check}");
        }
        schema::migrate(&mut db)?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }
}

/// The newest entry past the limit: it and everything older go. The
/// user is `CAST` to TEXT because with a bare `?1` beside `ORDER BY`, the
/// bundled SQLite (STAT4) re-compiles the statement every time a new value
/// is bound (~44,000 instructions per user a commit touched:
/// docs/performance.md, "The inbox's commit"); the cast fixes the value's
/// affinity, and the plan is the same primary-key search.
const NEWEST_PAST_LIMIT: &str = "SELECT seq FROM inbox_entries WHERE user_id = CAST(?1 AS TEXT)
     ORDER BY seq DESC LIMIT 1 OFFSET ?2";

/// Drops `user`'s oldest entries past `max_per_user`, remembering the
/// highest dropped seq for `gap`.
fn trim(tx: &rusqlite::Transaction<'_>, user: &str, max_per_user: usize) -> rusqlite::Result<()> {
    let mut newest_past = tx.prepare_cached(NEWEST_PAST_LIMIT)?;
    let cut: Option<i64> = newest_past
        .query_row(params![user, max_per_user as i64], |r| r.get(0))
        .optional()?;
    if let Some(cut) = cut {
        tx.execute(
            "DELETE FROM inbox_entries WHERE user_id = ?1 AND seq <= ?2",
            params![user, cut],
        )?;
        tx.execute(
            "UPDATE inbox_users SET dropped_through = MAX(dropped_through, ?2) WHERE user_id = ?1",
            params![user, cut],
        )?;
    }
    Ok(())
}

impl InboxStore for SqliteStore {
    fn append(
        &mut self,
        batch: &[NewMessage],
        now_ms: i64,
        max_per_user: usize,
    ) -> anyhow::Result<Vec<Vec<Option<u64>>>> {
        let tx = self.db.transaction()?;
        let mut seqs = Vec::with_capacity(batch.len());
        // Users that may now hold more than `max_per_user` entries: only
        // those are trimmed. A user holds at most the seqs after
        // `dropped_through` (removals and expiry only take entries away).
        let mut over_limit: HashSet<&str> = HashSet::new();
        {
            let mut exists =
                tx.prepare_cached("SELECT 1 FROM inbox_entries WHERE user_id = ?1 AND id = ?2")?;
            let mut payload = tx.prepare_cached(
                "INSERT INTO inbox_payloads (id, event, payload, created_at)
                 VALUES (?1, ?2, ?3, ?4) RETURNING pid",
            )?;
            let mut next = tx.prepare_cached(
                "INSERT INTO inbox_users (user_id, next_seq) VALUES (?1, 2)
                 ON CONFLICT (user_id) DO UPDATE SET next_seq = next_seq + 1
                 RETURNING next_seq - 1, dropped_through",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO inbox_entries (user_id, seq, id, created_at, payload_ref)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for m in batch {
                // Written when the first user needs it: a message every
                // user already holds stores no payload.
                let mut pid: Option<i64> = None;
                let mut for_message = Vec::with_capacity(m.users.len());
                for user in &m.users {
                    if exists.exists(params![user, m.id])? {
                        for_message.push(None);
                        continue;
                    }
                    let pid = match pid {
                        Some(pid) => pid,
                        None => *pid.insert(
                            payload.query_row(params![m.id, m.event, m.payload, now_ms], |r| {
                                r.get(0)
                            })?,
                        ),
                    };
                    let (seq, dropped_through): (i64, i64) =
                        next.query_row(params![user], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    insert.execute(params![user, seq, m.id, now_ms, pid])?;
                    for_message.push(Some(seq as u64));
                    if seq - dropped_through > max_per_user as i64 {
                        over_limit.insert(user);
                    }
                }
                seqs.push(for_message);
            }
        }
        for user in over_limit {
            trim(&tx, user, max_per_user)?;
        }
        tx.commit()?;
        Ok(seqs)
    }

    fn change_reporting(
        &mut self,
        user: &str,
        change: &Change,
        report_reads: bool,
    ) -> anyhow::Result<Changed> {
        let tx = self.db.transaction()?;
        // Ids go in as one JSON array, so any number of them fits in one
        // statement (SQLite allows at most 32,766 bound variables).
        let ids_json = |ids: &[String]| serde_json::to_string(ids).expect("strings serialise");
        let mut newly_read = Vec::new();
        let changed = match change {
            Change::MarkRead(ids) if ids.is_empty() => 0,
            Change::MarkRead(ids) => mark_read(
                &tx,
                "UPDATE inbox_entries SET read = 1 WHERE user_id = ?1 AND read = 0
                 AND id IN (SELECT value FROM json_each(?2))",
                params![user, ids_json(ids)],
                report_reads.then_some(&mut newly_read),
            )?,
            Change::MarkReadUpTo(seq) => mark_read(
                &tx,
                "UPDATE inbox_entries SET read = 1 WHERE user_id = ?1 AND read = 0 AND seq <= ?2",
                params![user, super::store::clamp_seq(*seq)],
                report_reads.then_some(&mut newly_read),
            )?,
            Change::MarkAllRead => mark_read(
                &tx,
                "UPDATE inbox_entries SET read = 1 WHERE user_id = ?1 AND read = 0",
                params![user],
                report_reads.then_some(&mut newly_read),
            )?,
            Change::Remove(ids) if ids.is_empty() => 0,
            Change::Remove(ids) => tx.execute(
                "DELETE FROM inbox_entries WHERE user_id = ?1
                 AND id IN (SELECT value FROM json_each(?2))",
                params![user, ids_json(ids)],
            )?,
            Change::RemoveAll => tx.execute(
                "DELETE FROM inbox_entries WHERE user_id = ?1",
                params![user],
            )?,
        };
        let counts = sqlite_read::counts(&tx, user)?;
        tx.commit()?;
        Ok(Changed {
            changed: changed > 0,
            counts,
            newly_read,
        })
    }

    fn expire(&mut self, cutoff_ms: i64) -> anyhow::Result<usize> {
        let tx = self.db.transaction()?;
        tx.execute(
            "UPDATE inbox_users SET dropped_through = MAX(dropped_through, (
                 SELECT MAX(seq) FROM inbox_entries e
                 WHERE e.user_id = inbox_users.user_id AND e.created_at < ?1))
             WHERE EXISTS (SELECT 1 FROM inbox_entries e
                 WHERE e.user_id = inbox_users.user_id AND e.created_at < ?1)",
            params![cutoff_ms],
        )?;
        let dropped = tx.execute(
            "DELETE FROM inbox_entries WHERE created_at < ?1",
            params![cutoff_ms],
        )?;
        tx.commit()?;
        Ok(dropped)
    }

    fn reader(&self) -> anyhow::Result<Box<dyn InboxReader>> {
        Ok(Box::new(SqliteReader::open(&self.path)?))
    }
}

/// Runs a marking `UPDATE`; with `report`, through `RETURNING id, seq`, so
/// the entries that flipped from unread to read are known (for their
/// `read` receipts). Returns how many rows changed.
fn mark_read(
    tx: &rusqlite::Transaction<'_>,
    update: &str,
    params: impl rusqlite::Params,
    report: Option<&mut Vec<ReadEntry>>,
) -> rusqlite::Result<usize> {
    let Some(out) = report else {
        return tx.execute(update, params);
    };
    let mut statement = tx.prepare(&format!("{update} RETURNING id, seq"))?;
    let rows = statement.query_map(params, |row| {
        Ok(ReadEntry {
            id: row.get(0)?,
            seq: row.get::<_, i64>(1)? as u64,
        })
    })?;
    for row in rows {
        out.push(row?);
    }
    Ok(out.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::store::{Counts, Entry, ListQuery, PageBound};

    fn store() -> (SqliteStore, Box<dyn InboxReader>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("nb-inbox-{}", uuid::Uuid::now_v7().simple()));
        let path = dir.join("nested").join("inbox.db");
        let store = SqliteStore::open(&path).unwrap();
        let reader = store.reader().unwrap();
        (store, reader, dir)
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
    fn append(s: &mut SqliteStore, batch: &[NewMessage], max: usize) -> Vec<Option<u64>> {
        s.append(batch, 0, max).unwrap().concat()
    }

    /// How often the retention query ran, and was re-compiled, so far.
    fn trim_runs(s: &SqliteStore) -> (i32, i32) {
        let query = s.db.prepare_cached(NEWEST_PAST_LIMIT).unwrap();
        (
            query.get_status(rusqlite::StatementStatus::Run),
            query.get_status(rusqlite::StatementStatus::RePrepare),
        )
    }

    #[test]
    fn retention_is_checked_only_past_the_limit_and_never_recompiled() {
        let (mut s, mut r, _dir) = store();
        for i in 0..10 {
            append(&mut s, &[new("a", &format!("m{i}"))], 10);
        }
        assert_eq!(trim_runs(&s), (0, 0), "nobody can be over the limit yet");
        for i in 10..40 {
            append(&mut s, &[new("a", &format!("m{i}"))], 10);
        }
        let (runs, recompiled) = trim_runs(&s);
        assert_eq!(runs, 30, "one check per commit past the limit");
        assert_eq!(recompiled, 0, "the statement is compiled once");
        let replay = r.replay("a", Some(0), ALL).unwrap();
        let seqs: Vec<u64> = replay.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (31..=40).collect::<Vec<_>>());
    }

    fn payloads(s: &SqliteStore) -> i64 {
        s.db.query_row("SELECT COUNT(*) FROM inbox_payloads", [], |r| r.get(0))
            .unwrap()
    }

    const ALL: PageBound = PageBound {
        entries: 10_000,
        bytes: usize::MAX,
    };

    #[test]
    fn seqs_are_per_user_and_redeliveries_are_recognised() {
        let (mut s, mut r, dir) = store();
        let seqs = append(
            &mut s,
            &[new("a", "1"), new("b", "1"), new("a", "2"), new("a", "1")],
            100,
        );
        assert_eq!(seqs, vec![Some(1), Some(1), Some(2), None]);
        assert_eq!(
            append(&mut s, &[new("a", "2"), new("a", "3")], 100),
            vec![None, Some(3)]
        );
        let replay = r.replay("a", Some(1), ALL).unwrap();
        assert_eq!(
            replay.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            (replay.counts, replay.through),
            (
                Counts {
                    total: 3,
                    unread: 3,
                    ..Default::default()
                },
                3
            )
        );
        assert_eq!(replay.gap_oldest, None);
        // A removed entry is stored again when redelivered, with a new seq.
        s.change("a", &Change::Remove(vec!["1".into()])).unwrap();
        assert_eq!(append(&mut s, &[new("a", "1")], 100), vec![Some(4)]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_message_for_many_users_keeps_one_payload() {
        let (mut s, mut r, dir) = store();
        let seqs = s
            .append(&[msg(&["a", "b", "c"], "m"), msg(&["a"], "n")], 0, 100)
            .unwrap();
        assert_eq!(seqs, vec![vec![Some(1), Some(1), Some(1)], vec![Some(2)]]);
        assert_eq!(payloads(&s), 2);
        // Every user already holds it: no payload is written.
        let again = s.append(&[msg(&["a", "b"], "m")], 0, 100).unwrap();
        assert_eq!((again, payloads(&s)), (vec![vec![None, None]], 2));
        // Some hold it: one more payload, for the one that did not.
        let some = s.append(&[msg(&["a", "d"], "m")], 0, 100).unwrap();
        assert_eq!((some, payloads(&s)), (vec![vec![None, Some(1)]], 3));
        let entry = &r.replay("c", Some(0), ALL).unwrap().entries[0];
        assert_eq!(
            (entry.id.as_str(), entry.payload.as_str()),
            ("m", r#"{"id":"m"}"#)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn payloads_no_entry_refers_to_are_freed() {
        let (mut s, _r, dir) = store();
        s.append(&[msg(&["a", "b"], "shared")], 0, 2).unwrap();
        s.append(&[new("a", "x"), new("b", "y")], 5, 2).unwrap();
        assert_eq!(payloads(&s), 3);
        // Count retention: a drops "shared"; b still refers to it.
        s.append(&[new("a", "z")], 10, 2).unwrap();
        assert_eq!(payloads(&s), 4);
        // remove: b's "shared" goes, and with it the payload.
        s.change("b", &Change::Remove(vec!["shared".into()]))
            .unwrap();
        assert_eq!(payloads(&s), 3, "x, y and z: shared freed");
        // ttl: everything created before 10 goes (x, y).
        assert_eq!(s.expire(10).unwrap(), 2);
        assert_eq!(payloads(&s), 1);
        s.change("a", &Change::RemoveAll).unwrap();
        assert_eq!(payloads(&s), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn retention_makes_gaps_but_removals_do_not() {
        let (mut s, mut r, dir) = store();
        for i in 1..=5 {
            append(&mut s, &[new("u", &i.to_string())], 3);
        }
        // Held: 3, 4, 5. Since 0 and 1 lost entries to retention.
        let replay = r.replay("u", Some(1), ALL).unwrap();
        assert_eq!(replay.gap_oldest, Some(3));
        assert_eq!(replay.entries.len(), 3);
        assert_eq!(r.replay("u", Some(2), ALL).unwrap().gap_oldest, None);
        // The user removes 3: since 2 still has no gap.
        s.change("u", &Change::Remove(vec!["3".into()])).unwrap();
        assert_eq!(r.replay("u", Some(2), ALL).unwrap().gap_oldest, None);
        // Beyond the last seq: nothing, no gap.
        let beyond = r.replay("u", Some(99), ALL).unwrap();
        assert!(beyond.entries.is_empty() && beyond.gap_oldest.is_none());
        // Everything expired: the gap points at the next seq.
        assert_eq!(s.expire(1).unwrap(), 2);
        assert_eq!(r.replay("u", Some(2), ALL).unwrap().gap_oldest, Some(6));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn since_past_i64_replays_nothing_and_through_is_the_last_seq() {
        let (mut s, mut r, dir) = store();
        append(&mut s, &[new("u", "1"), new("u", "2")], 100);
        for since in [1 << 63, u64::MAX, i64::MAX as u64] {
            let replay = r.replay("u", Some(since), ALL).unwrap();
            assert!(replay.entries.is_empty(), "since={since}");
            assert_eq!(
                (replay.gap_oldest, replay.through),
                (None, 2),
                "since={since}"
            );
            assert!(r.replay_page("u", since, u64::MAX, ALL).unwrap().is_empty());
        }
        assert_eq!(r.replay("nobody", Some(u64::MAX), ALL).unwrap().through, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pages_stop_at_their_count_and_byte_bounds() {
        let (mut s, mut r, dir) = store();
        let big = |id: &str| NewMessage {
            payload: format!(r#""{}""#, "b".repeat(1000)),
            ..new("u", id)
        };
        let batch: Vec<NewMessage> = (1..=10).map(|i| big(&i.to_string())).collect();
        append(&mut s, &batch, 100);
        let seqs = |entries: &[Entry]| entries.iter().map(|e| e.seq).collect::<Vec<_>>();
        let by_count = PageBound {
            entries: 4,
            bytes: usize::MAX,
        };
        let first = r.replay("u", Some(0), by_count).unwrap();
        assert_eq!(
            (seqs(&first.entries), first.through),
            (vec![1, 2, 3, 4], 10)
        );
        assert_eq!(
            seqs(&r.replay_page("u", 4, 10, by_count).unwrap()),
            vec![5, 6, 7, 8]
        );
        assert_eq!(seqs(&r.replay_page("u", 8, 9, by_count).unwrap()), vec![9]);
        // ~1 KB each: a 2.5 KB bound takes two; a bound below one takes one.
        let by_bytes = PageBound {
            entries: 64,
            bytes: 2500,
        };
        assert_eq!(
            seqs(&r.replay_page("u", 0, 10, by_bytes).unwrap()),
            vec![1, 2]
        );
        let tiny = PageBound {
            entries: 64,
            bytes: 1,
        };
        assert_eq!(seqs(&r.replay_page("u", 0, 10, tiny).unwrap()), vec![1]);
        let query = ListQuery {
            unread_only: false,
            before: Some(10),
            limit: 3,
        };
        let (counts, page) = r.list("u", query, by_bytes).unwrap();
        assert_eq!((counts.total, seqs(&page)), (10, vec![9, 8]));
        assert_eq!(
            seqs(&r.list_page("u", query, by_count).unwrap()),
            vec![9, 8, 7]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn read_state_changes_touch_only_that_user() {
        let (mut s, mut r, dir) = store();
        append(
            &mut s,
            &[new("a", "x"), new("a", "y"), new("a", "z"), new("b", "x")],
            100,
        );
        assert_eq!(
            s.change("b", &Change::MarkRead(vec!["y".into(), "nope".into()]))
                .unwrap(),
            (
                false,
                Counts {
                    total: 1,
                    unread: 1,
                    ..Default::default()
                }
            )
        );
        assert_eq!(
            s.change("a", &Change::MarkRead(vec!["x".into()])).unwrap(),
            (
                true,
                Counts {
                    total: 3,
                    unread: 2,
                    ..Default::default()
                }
            )
        );
        assert!(
            !s.change("a", &Change::MarkRead(vec!["x".into()]))
                .unwrap()
                .0
        );
        assert_eq!(s.change("a", &Change::MarkReadUpTo(2)).unwrap().1.unread, 1);
        let unread_query = ListQuery {
            unread_only: true,
            before: None,
            limit: 10,
        };
        let (counts, unread) = r.list("a", unread_query, ALL).unwrap();
        assert_eq!(
            (counts.total, unread.len(), unread[0].id.as_str()),
            (3, 1, "z")
        );
        let page_query = ListQuery {
            unread_only: false,
            before: Some(3),
            limit: 1,
        };
        let (_, page) = r.list("a", page_query, ALL).unwrap();
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.change("a", &Change::MarkAllRead).unwrap().1.unread, 0);
        assert_eq!(
            s.change("a", &Change::RemoveAll).unwrap(),
            (true, Counts::default())
        );
        assert_eq!(r.replay("b", None, ALL).unwrap().counts.total, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_reporting_change_names_the_entries_it_turned_read_once() {
        let (mut s, _r, dir) = store();
        append(
            &mut s,
            &[new("a", "x"), new("a", "y"), new("a", "z"), new("b", "x")],
            100,
        );
        let read = |s: &mut SqliteStore, change: Change| {
            let mut flipped = s.change_reporting("a", &change, true).unwrap().newly_read;
            flipped.sort_by_key(|e| e.seq);
            flipped
                .into_iter()
                .map(|e| (e.id, e.seq))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            read(&mut s, Change::MarkRead(vec!["y".into(), "nope".into()])),
            [("y".to_string(), 2)]
        );
        // Already read: nothing flips again.
        assert!(read(&mut s, Change::MarkRead(vec!["y".into()])).is_empty());
        assert_eq!(
            read(&mut s, Change::MarkReadUpTo(2)),
            [("x".to_string(), 1)]
        );
        // Removing an unread entry reports nothing.
        assert!(read(&mut s, Change::Remove(vec!["z".into()])).is_empty());
        append(&mut s, &[new("a", "w")], 100);
        let all = s.change_reporting("a", &Change::MarkAllRead, true).unwrap();
        assert_eq!((all.changed, all.counts.unread), (true, 0));
        assert_eq!(
            all.newly_read,
            [ReadEntry {
                id: "w".into(),
                seq: 4
            }]
        );
        // Without asking, nothing is collected.
        append(&mut s, &[new("a", "v")], 100);
        let quiet = s
            .change_reporting("a", &Change::MarkAllRead, false)
            .unwrap();
        assert!(quiet.changed && quiet.newly_read.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn changes_take_more_ids_than_sqlite_has_variables() {
        let (mut s, _r, dir) = store();
        append(&mut s, &[new("a", "id-1"), new("a", "id-39999")], 100);
        let ids: Vec<String> = (0..40_000).map(|i| format!("id-{i}")).collect();
        let (changed, counts) = s.change("a", &Change::MarkRead(ids.clone())).unwrap();
        assert_eq!((changed, counts.unread), (true, 0));
        let (changed, counts) = s.change("a", &Change::Remove(ids)).unwrap();
        assert_eq!((changed, counts.total), (true, 0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_store_from_a_newer_bridge_is_refused() {
        let dir = std::env::temp_dir().join(format!("nb-new-{}", uuid::Uuid::now_v7().simple()));
        let path = dir.join("inbox.db");
        drop(SqliteStore::open(&path).unwrap());
        let db = Connection::open(&path).unwrap();
        db.pragma_update(None, "user_version", schema::VERSION + 1)
            .unwrap();
        drop(db);
        let err = SqliteStore::open(&path)
            .err()
            .expect("a newer schema is refused");
        assert!(format!("{err:#}").contains("newer"), "{err:#}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_store_is_refused() {
        let dir = std::env::temp_dir().join(format!("nb-bad-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("inbox.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        assert!(SqliteStore::open(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
