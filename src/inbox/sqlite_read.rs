//! Reading the SQLite store on a connection of its own: WAL lets it read
//! the last committed state while the writer commits, and every read
//! stops at a page bound.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Statement};

use super::store::{clamp_seq, Counts, Entry, InboxReader, ListQuery, PageBound, Replay};

/// A read-only connection to the store.
pub struct SqliteReader {
    db: Connection,
}

impl SqliteReader {
    /// Opens a reader on a store the writer has already opened (and
    /// migrated).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let db = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        db.pragma_update(None, "query_only", true)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { db })
    }
}

/// The whole inbox's counts for `user`.
pub fn counts(db: &Connection, user: &str) -> rusqlite::Result<Counts> {
    db.query_row(
        "SELECT COUNT(*), COALESCE(SUM(read = 0), 0) FROM inbox_entries WHERE user_id = ?1",
        params![user],
        |r| {
            Ok(Counts {
                total: r.get::<_, i64>(0)? as u64,
                unread: r.get::<_, i64>(1)? as u64,
                ..Default::default()
            })
        },
    )
}

const COLUMNS: &str = "SELECT e.seq, e.id, p.event, p.payload, e.created_at, e.read
     FROM inbox_entries e JOIN inbox_payloads p ON p.pid = e.payload_ref";

/// Reads rows of `stmt` into a page: at most `page.entries`, and no more
/// once the next would pass `page.bytes` (but at least one).
fn page_of(
    stmt: &mut Statement<'_>,
    params: impl rusqlite::Params,
    page: PageBound,
) -> rusqlite::Result<Vec<Entry>> {
    let mut rows = stmt.query(params)?;
    let mut entries = Vec::new();
    let mut bytes = 0;
    while entries.len() < page.entries.max(1) {
        let Some(row) = rows.next()? else { break };
        let entry = Entry {
            seq: row.get::<_, i64>(0)? as u64,
            id: row.get(1)?,
            event: row.get(2)?,
            payload: row.get(3)?,
            created_at_ms: row.get(4)?,
            read: row.get::<_, i64>(5)? != 0,
        };
        if !entries.is_empty() && bytes + entry.bytes() > page.bytes {
            break;
        }
        bytes += entry.bytes();
        entries.push(entry);
    }
    Ok(entries)
}

/// The user and the limit are `CAST`: with a bare `?` for either beside
/// `ORDER BY`, the bundled SQLite (STAT4) re-compiles the statement every
/// time a value is bound (see `sqlite.rs`, `NEWEST_PAST_LIMIT`); the plan
/// stays the primary-key range, without a sort.
fn replay_query() -> String {
    format!(
        "{COLUMNS} WHERE e.user_id = CAST(?1 AS TEXT) AND e.seq > ?2 AND e.seq <= ?3
         ORDER BY e.seq LIMIT CAST(?4 AS INTEGER)"
    )
}

fn list_query() -> String {
    format!(
        "{COLUMNS} WHERE e.user_id = CAST(?1 AS TEXT) AND e.seq < ?2 AND (?3 = 0 OR e.read = 0)
         ORDER BY e.seq DESC LIMIT CAST(?4 AS INTEGER)"
    )
}

fn replay_page(
    db: &Connection,
    user: &str,
    after: u64,
    through: u64,
    page: PageBound,
) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = db.prepare_cached(&replay_query())?;
    let limit = page.entries.max(1) as i64;
    page_of(
        &mut stmt,
        params![user, clamp_seq(after), clamp_seq(through), limit],
        page,
    )
}

fn list_page(
    db: &Connection,
    user: &str,
    query: ListQuery,
    page: PageBound,
) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = db.prepare_cached(&list_query())?;
    let (before, limit, page) = query.page_bounds(page);
    page_of(
        &mut stmt,
        params![user, before, query.unread_only as i64, limit],
        page,
    )
}

impl InboxReader for SqliteReader {
    fn replay(
        &mut self,
        user: &str,
        since: Option<u64>,
        page: PageBound,
    ) -> anyhow::Result<Replay> {
        // One read transaction: counts, gap, `through` and the first page
        // are of the same committed state.
        let tx = self.db.transaction()?;
        let counts = counts(&tx, user)?;
        let (next_seq, dropped_through): (i64, i64) = tx
            .query_row(
                "SELECT next_seq, dropped_through FROM inbox_users WHERE user_id = ?1",
                params![user],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((1, 0));
        let through = (next_seq as u64).saturating_sub(1);
        let Some(since) = since else {
            return Ok(Replay {
                counts,
                gap_oldest: None,
                through,
                entries: Vec::new(),
            });
        };
        let entries = replay_page(&tx, user, since, through, page)?;
        let gap_oldest = (dropped_through as u64 > since)
            .then(|| entries.first().map_or(next_seq as u64, |e| e.seq));
        Ok(Replay {
            counts,
            gap_oldest,
            through,
            entries,
        })
    }

    fn replay_page(
        &mut self,
        user: &str,
        after: u64,
        through: u64,
        page: PageBound,
    ) -> anyhow::Result<Vec<Entry>> {
        Ok(replay_page(&self.db, user, after, through, page)?)
    }

    fn list(
        &mut self,
        user: &str,
        query: ListQuery,
        page: PageBound,
    ) -> anyhow::Result<(Counts, Vec<Entry>)> {
        let tx = self.db.transaction()?;
        let counts = counts(&tx, user)?;
        let entries = list_page(&tx, user, query, page)?;
        Ok((counts, entries))
    }

    fn list_page(
        &mut self,
        user: &str,
        query: ListQuery,
        page: PageBound,
    ) -> anyhow::Result<Vec<Entry>> {
        Ok(list_page(&self.db, user, query, page)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::{sqlite::SqliteStore, store::InboxStore, store::NewMessage};

    #[test]
    fn replay_and_list_pages_are_compiled_once_for_every_user() {
        let dir = std::env::temp_dir().join(format!("nb-read-{}", uuid::Uuid::now_v7().simple()));
        let path = dir.join("inbox.db");
        let mut store = SqliteStore::open(&path).unwrap();
        let users = ["a", "b", "c", "d"];
        let batch: Vec<NewMessage> = users
            .iter()
            .map(|u| NewMessage {
                users: vec![u.to_string()],
                id: format!("m-{u}"),
                event: "notification".into(),
                payload: "{}".into(),
            })
            .collect();
        store.append(&batch, 0, 100).unwrap();
        let reader = SqliteReader::open(&path).unwrap();
        let page = PageBound {
            entries: 10,
            bytes: usize::MAX,
        };
        let query = ListQuery {
            unread_only: false,
            before: None,
            limit: 10,
        };
        for user in users {
            assert_eq!(replay_page(&reader.db, user, 0, 10, page).unwrap().len(), 1);
            assert_eq!(list_page(&reader.db, user, query, page).unwrap().len(), 1);
        }
        for sql in [replay_query(), list_query()] {
            let stmt = reader.db.prepare_cached(&sql).unwrap();
            let recompiled = stmt.get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(recompiled, 0, "{sql}");
            let plan: Vec<String> = reader
                .db
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(params!["a", 0, 10, 10], |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().any(|step| step.contains("USING PRIMARY KEY")),
                "{plan:?}"
            );
            assert!(
                !plan.iter().any(|step| step.contains("TEMP B-TREE")),
                "{plan:?}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
