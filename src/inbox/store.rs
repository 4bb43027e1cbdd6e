//! The inbox store: an interface small enough that a server database can be
//! added behind it later, and its default implementation, one SQLite file.
//!
//! SQLite (through rusqlite with the bundled library) because it is one file
//! with no server to run, survives `kill -9` with every committed
//! transaction (WAL, `synchronous = FULL`), and operators can open it with
//! the `sqlite3` tool they already know.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

/// One entry to store for one user.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub user: String,
    pub id: String,
    pub event: String,
    pub payload: String,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub id: String,
    pub event: String,
    /// The payload's JSON text, as received.
    pub payload: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    pub read: bool,
}

/// The whole inbox's counts, whatever filter a listing used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Counts {
    pub total: u64,
    pub unread: u64,
}

/// What a reconnecting client with `?since=N` gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub counts: Counts,
    /// `Some(oldest)` when retention dropped entries after `since`.
    pub gap_oldest: Option<u64>,
    /// Entries with `seq > since`, in order.
    pub entries: Vec<Entry>,
}

/// A listing for the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListQuery {
    pub unread_only: bool,
    /// Only entries with `seq < before`.
    pub before: Option<u64>,
    pub limit: usize,
}

/// A read-state change, from a client frame or the HTTP PATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    MarkRead(Vec<String>),
    MarkReadUpTo(u64),
    MarkAllRead,
    Remove(Vec<String>),
    RemoveAll,
}

/// The operations the inbox needs from a store. Implementations run on the
/// store's own thread, so they may block.
pub trait InboxStore: Send + 'static {
    /// Stores a batch atomically; for each entry its new `seq`, or `None`
    /// when the user's inbox already holds that id (a redelivery). Applies
    /// the count retention to the users it touched.
    fn append(
        &mut self,
        batch: &[NewEntry],
        now_ms: i64,
        max_per_user: usize,
    ) -> anyhow::Result<Vec<Option<u64>>>;
    fn replay(&mut self, user: &str, since: Option<u64>) -> anyhow::Result<Replay>;
    fn list(&mut self, user: &str, query: ListQuery) -> anyhow::Result<(Counts, Vec<Entry>)>;
    /// Applies a change; `true` when anything changed.
    fn change(&mut self, user: &str, change: &Change) -> anyhow::Result<(bool, Counts)>;
    /// Drops entries created before `cutoff_ms`; returns how many.
    fn expire(&mut self, cutoff_ms: i64) -> anyhow::Result<usize>;
}

/// The default store: one SQLite file.
pub struct SqliteStore {
    db: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox_users (
    user_id TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    -- the highest seq retention dropped: a `since` below it has a gap
    dropped_through INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox_entries (
    user_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    read INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS inbox_entries_id ON inbox_entries (user_id, id);
CREATE INDEX IF NOT EXISTS inbox_entries_created ON inbox_entries (created_at);
";

impl SqliteStore {
    /// Opens or creates the store at `path`, creating missing folders. Any
    /// failure (unwritable, not a database, corrupt) is an error.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
        }
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let check: String = db.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            anyhow::bail!("the store failed its integrity check: {check}");
        }
        db.execute_batch(SCHEMA)?;
        Ok(Self { db })
    }

    fn counts(db: &Connection, user: &str) -> rusqlite::Result<Counts> {
        db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(read = 0), 0) FROM inbox_entries WHERE user_id = ?1",
            params![user],
            |r| {
                Ok(Counts {
                    total: r.get::<_, i64>(0)? as u64,
                    unread: r.get::<_, i64>(1)? as u64,
                })
            },
        )
    }

    fn ids_clause(ids: &[String]) -> String {
        vec!["?"; ids.len()].join(",")
    }
}

fn entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        seq: row.get::<_, i64>(0)? as u64,
        id: row.get(1)?,
        event: row.get(2)?,
        payload: row.get(3)?,
        created_at_ms: row.get(4)?,
        read: row.get::<_, i64>(5)? != 0,
    })
}

impl InboxStore for SqliteStore {
    fn append(
        &mut self,
        batch: &[NewEntry],
        now_ms: i64,
        max_per_user: usize,
    ) -> anyhow::Result<Vec<Option<u64>>> {
        let tx = self.db.transaction()?;
        let mut seqs = Vec::with_capacity(batch.len());
        let mut touched: Vec<&str> = Vec::new();
        {
            let mut exists =
                tx.prepare_cached("SELECT 1 FROM inbox_entries WHERE user_id = ?1 AND id = ?2")?;
            let mut next = tx.prepare_cached(
                "INSERT INTO inbox_users (user_id, next_seq) VALUES (?1, 2)
                 ON CONFLICT (user_id) DO UPDATE SET next_seq = next_seq + 1
                 RETURNING next_seq - 1",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO inbox_entries (user_id, seq, id, event, payload, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in batch {
                if exists.exists(params![e.user, e.id])? {
                    seqs.push(None);
                    continue;
                }
                let seq: i64 = next.query_row(params![e.user], |r| r.get(0))?;
                insert.execute(params![e.user, seq, e.id, e.event, e.payload, now_ms])?;
                seqs.push(Some(seq as u64));
                if !touched.contains(&e.user.as_str()) {
                    touched.push(&e.user);
                }
            }
            let mut trim = tx.prepare_cached(
                "SELECT seq FROM inbox_entries WHERE user_id = ?1
                 ORDER BY seq DESC LIMIT 1 OFFSET ?2",
            )?;
            for user in touched {
                // The newest entry past the limit: it and everything older go.
                let cut: Option<i64> = trim
                    .query_row(params![user, max_per_user as i64], |r| r.get(0))
                    .optional()?;
                if let Some(cut) = cut {
                    tx.execute(
                        "DELETE FROM inbox_entries WHERE user_id = ?1 AND seq <= ?2",
                        params![user, cut],
                    )?;
                    tx.execute(
                        "UPDATE inbox_users SET dropped_through = MAX(dropped_through, ?2)
                         WHERE user_id = ?1",
                        params![user, cut],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(seqs)
    }

    fn replay(&mut self, user: &str, since: Option<u64>) -> anyhow::Result<Replay> {
        let tx = self.db.transaction()?;
        let counts = Self::counts(&tx, user)?;
        let Some(since) = since else {
            return Ok(Replay {
                counts,
                gap_oldest: None,
                entries: Vec::new(),
            });
        };
        let entries = {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, id, event, payload, created_at, read FROM inbox_entries
                 WHERE user_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![user, since as i64], entry)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let (next_seq, dropped_through): (i64, i64) = tx
            .query_row(
                "SELECT next_seq, dropped_through FROM inbox_users WHERE user_id = ?1",
                params![user],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((1, 0));
        let gap_oldest = (dropped_through as u64 > since)
            .then(|| entries.first().map(|e| e.seq).unwrap_or(next_seq as u64));
        Ok(Replay {
            counts,
            gap_oldest,
            entries,
        })
    }

    fn list(&mut self, user: &str, query: ListQuery) -> anyhow::Result<(Counts, Vec<Entry>)> {
        let counts = Self::counts(&self.db, user)?;
        let mut stmt = self.db.prepare_cached(
            "SELECT seq, id, event, payload, created_at, read FROM inbox_entries
             WHERE user_id = ?1 AND seq < ?2 AND (?3 = 0 OR read = 0)
             ORDER BY seq DESC LIMIT ?4",
        )?;
        let before = query
            .before
            .map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        let rows = stmt.query_map(
            params![user, before, query.unread_only as i64, query.limit as i64],
            entry,
        )?;
        let entries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((counts, entries))
    }

    fn change(&mut self, user: &str, change: &Change) -> anyhow::Result<(bool, Counts)> {
        let tx = self.db.transaction()?;
        let changed = match change {
            Change::MarkRead(ids) if ids.is_empty() => 0,
            Change::MarkRead(ids) => {
                let sql = format!(
                    "UPDATE inbox_entries SET read = 1 WHERE user_id = ? AND read = 0 AND id IN ({})",
                    Self::ids_clause(ids)
                );
                let mut values: Vec<&dyn rusqlite::ToSql> = vec![&user];
                values.extend(ids.iter().map(|id| id as &dyn rusqlite::ToSql));
                tx.execute(&sql, values.as_slice())?
            }
            Change::MarkReadUpTo(seq) => tx.execute(
                "UPDATE inbox_entries SET read = 1 WHERE user_id = ?1 AND read = 0 AND seq <= ?2",
                params![user, (*seq).min(i64::MAX as u64) as i64],
            )?,
            Change::MarkAllRead => tx.execute(
                "UPDATE inbox_entries SET read = 1 WHERE user_id = ?1 AND read = 0",
                params![user],
            )?,
            Change::Remove(ids) if ids.is_empty() => 0,
            Change::Remove(ids) => {
                let sql = format!(
                    "DELETE FROM inbox_entries WHERE user_id = ? AND id IN ({})",
                    Self::ids_clause(ids)
                );
                let mut values: Vec<&dyn rusqlite::ToSql> = vec![&user];
                values.extend(ids.iter().map(|id| id as &dyn rusqlite::ToSql));
                tx.execute(&sql, values.as_slice())?
            }
            Change::RemoveAll => tx.execute(
                "DELETE FROM inbox_entries WHERE user_id = ?1",
                params![user],
            )?,
        };
        let counts = Self::counts(&tx, user)?;
        tx.commit()?;
        Ok((changed > 0, counts))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (SqliteStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("nb-inbox-{}", uuid::Uuid::now_v7().simple()));
        let path = dir.join("nested").join("inbox.db");
        (SqliteStore::open(&path).unwrap(), dir)
    }

    fn new(user: &str, id: &str) -> NewEntry {
        NewEntry {
            user: user.into(),
            id: id.into(),
            event: "notification".into(),
            payload: format!(r#"{{"id":"{id}"}}"#),
        }
    }

    #[test]
    fn seqs_are_per_user_and_redeliveries_are_recognised() {
        let (mut s, dir) = store();
        let seqs = s
            .append(
                &[new("a", "1"), new("b", "1"), new("a", "2"), new("a", "1")],
                0,
                100,
            )
            .unwrap();
        assert_eq!(seqs, vec![Some(1), Some(1), Some(2), None]);
        assert_eq!(
            s.append(&[new("a", "2"), new("a", "3")], 0, 100).unwrap(),
            vec![None, Some(3)]
        );
        let replay = s.replay("a", Some(1)).unwrap();
        assert_eq!(
            replay.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            replay.counts,
            Counts {
                total: 3,
                unread: 3
            }
        );
        assert_eq!(replay.gap_oldest, None);
        // A removed entry is stored again when redelivered, with a new seq.
        s.change("a", &Change::Remove(vec!["1".into()])).unwrap();
        assert_eq!(s.append(&[new("a", "1")], 0, 100).unwrap(), vec![Some(4)]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn retention_makes_gaps_but_removals_do_not() {
        let (mut s, dir) = store();
        for i in 1..=5 {
            s.append(&[new("u", &i.to_string())], 0, 3).unwrap();
        }
        // Held: 3, 4, 5. Since 0 and 1 lost entries to retention.
        let r = s.replay("u", Some(1)).unwrap();
        assert_eq!(r.gap_oldest, Some(3));
        assert_eq!(r.entries.len(), 3);
        assert_eq!(s.replay("u", Some(2)).unwrap().gap_oldest, None);
        // The user removes 3: since 2 still has no gap.
        s.change("u", &Change::Remove(vec!["3".into()])).unwrap();
        assert_eq!(s.replay("u", Some(2)).unwrap().gap_oldest, None);
        // Beyond the last seq: nothing, no gap.
        let r = s.replay("u", Some(99)).unwrap();
        assert!(r.entries.is_empty() && r.gap_oldest.is_none());
        // Everything expired: the gap points at the next seq.
        assert_eq!(s.expire(1).unwrap(), 2);
        assert_eq!(s.replay("u", Some(2)).unwrap().gap_oldest, Some(6));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn read_state_changes_touch_only_that_user() {
        let (mut s, dir) = store();
        s.append(
            &[new("a", "x"), new("a", "y"), new("a", "z"), new("b", "x")],
            0,
            100,
        )
        .unwrap();
        assert_eq!(
            s.change("b", &Change::MarkRead(vec!["y".into(), "nope".into()]))
                .unwrap(),
            (
                false,
                Counts {
                    total: 1,
                    unread: 1
                }
            )
        );
        assert_eq!(
            s.change("a", &Change::MarkRead(vec!["x".into()])).unwrap(),
            (
                true,
                Counts {
                    total: 3,
                    unread: 2
                }
            )
        );
        assert!(
            !s.change("a", &Change::MarkRead(vec!["x".into()]))
                .unwrap()
                .0
        );
        assert_eq!(s.change("a", &Change::MarkReadUpTo(2)).unwrap().1.unread, 1);
        let (counts, unread) = s
            .list(
                "a",
                ListQuery {
                    unread_only: true,
                    before: None,
                    limit: 10,
                },
            )
            .unwrap();
        assert_eq!(
            (counts.total, unread.len(), unread[0].id.as_str()),
            (3, 1, "z")
        );
        let (_, page) = s
            .list(
                "a",
                ListQuery {
                    unread_only: false,
                    before: Some(3),
                    limit: 1,
                },
            )
            .unwrap();
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.change("a", &Change::MarkAllRead).unwrap().1.unread, 0);
        assert_eq!(
            s.change("a", &Change::RemoveAll).unwrap(),
            (true, Counts::default())
        );
        assert_eq!(s.replay("b", None).unwrap().counts.total, 1);
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
