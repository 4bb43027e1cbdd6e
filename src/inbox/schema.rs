//! The SQLite store's schema and its versions (`PRAGMA user_version`):
//! a store written by an older bridge is migrated at open, in one
//! transaction, so a crash mid-migration leaves the old store intact.
//!
//! - version 1 (user_version 0, the first release): one row per user and
//!   message, each with its own copy of the payload.
//! - version 2: a message's payload is stored once in `inbox_payloads`;
//!   each user's entry refers to it, and a trigger frees a payload when
//!   the last entry referring to it goes (retention, ttl, removal).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

/// The schema this code reads and writes.
pub const VERSION: i64 = 2;

const V2: &str = "
CREATE TABLE IF NOT EXISTS inbox_users (
    user_id TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    -- the highest seq retention dropped: a `since` below it has a gap
    dropped_through INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE inbox_payloads (
    pid INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE inbox_entries (
    user_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    read INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    payload_ref INTEGER NOT NULL REFERENCES inbox_payloads (pid),
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX inbox_entries_id ON inbox_entries (user_id, id);
CREATE INDEX inbox_entries_created ON inbox_entries (created_at);
CREATE INDEX inbox_entries_payload ON inbox_entries (payload_ref);
CREATE TRIGGER inbox_entries_free_payload AFTER DELETE ON inbox_entries
WHEN NOT EXISTS (SELECT 1 FROM inbox_entries WHERE payload_ref = OLD.payload_ref)
BEGIN
    DELETE FROM inbox_payloads WHERE pid = OLD.payload_ref;
END;
";

/// Version 1 to 2: one payload per (id, event, payload, created_at), which
/// is what one batch wrote for all the users of one message.
const V1_TO_V2: &str = "
DROP INDEX inbox_entries_id;
DROP INDEX inbox_entries_created;
ALTER TABLE inbox_entries RENAME TO inbox_entries_v1;
";

const V1_COPY: &str = "
INSERT INTO inbox_payloads (id, event, payload, created_at)
    SELECT id, event, payload, created_at FROM inbox_entries_v1
    GROUP BY id, created_at, event, payload;
CREATE INDEX inbox_payloads_migration ON inbox_payloads (id, created_at);
INSERT INTO inbox_entries (user_id, seq, id, read, created_at, payload_ref)
    SELECT e.user_id, e.seq, e.id, e.read, e.created_at, p.pid
    FROM inbox_entries_v1 e JOIN inbox_payloads p
      ON p.id = e.id AND p.created_at = e.created_at
     AND p.event = e.event AND p.payload = e.payload;
DROP INDEX inbox_payloads_migration;
DROP TABLE inbox_entries_v1;
";

/// Brings the store at `db` to [`VERSION`]: creates it when empty,
/// migrates an older one, refuses a newer one.
pub fn migrate(db: &mut Connection) -> anyhow::Result<()> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_entries = tx
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inbox_entries'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    match version {
        VERSION => return Ok(()),
        0 if !has_entries => tx.execute_batch(V2)?,
        0 | 1 => {
            tracing::info!("migrating the inbox store from schema 1 to {VERSION}");
            tx.execute_batch(V1_TO_V2)?;
            tx.execute_batch(V2)?;
            tx.execute_batch(V1_COPY)?;
        }
        newer => anyhow::bail!(
            "the store has schema version {newer}, newer than this bridge's {VERSION}"
        ),
    }
    tx.pragma_update(None, "user_version", VERSION)?;
    tx.commit()?;
    Ok(())
}
