//! Reading the PostgreSQL store: each call runs on a pooled connection,
//! a replay's start in one REPEATABLE READ transaction (counts, gap,
//! `through` and the first page of one snapshot), and rows are streamed so
//! a page stops at its byte bound without fetching more.

use deadpool_postgres::GenericClient;
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::ToSql;

use super::{
    postgres::PgStore,
    store::{clamp_seq, Counts, Entry, ListQuery, PageBound, Replay},
};

const COLUMNS: &str = "SELECT e.seq, e.id, p.event, p.payload, e.created_at, e.read
     FROM inbox_entries e JOIN inbox_payloads p ON p.pid = e.payload_ref";

/// The whole inbox's counts for `user`.
pub async fn counts(db: &impl GenericClient, user: &str) -> Result<Counts, tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE NOT read),
                    (SELECT counts_version FROM inbox_users WHERE user_id = $1)
             FROM inbox_entries WHERE user_id = $1",
            &[&user],
        )
        .await?;
    Ok(Counts {
        total: row.get::<_, i64>(0) as u64,
        unread: row.get::<_, i64>(1) as u64,
        version: row.get::<_, Option<i64>>(2).unwrap_or(0) as u64,
    })
}

/// Streams the rows of `sql` into a page: at most `page.entries`, and no
/// more once the next would pass `page.bytes` (but at least one).
async fn page_of(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    page: PageBound,
) -> Result<Vec<Entry>, tokio_postgres::Error> {
    let stmt = db.prepare_cached(sql).await?;
    let rows = db.query_raw(&stmt, params.iter().copied()).await?;
    pin_mut!(rows);
    let mut entries = Vec::new();
    let mut bytes = 0;
    while entries.len() < page.entries.max(1) {
        let Some(row) = rows.try_next().await? else {
            break;
        };
        let entry = Entry {
            seq: row.get::<_, i64>(0) as u64,
            id: row.get(1),
            event: row.get(2),
            payload: row.get(3),
            created_at_ms: row.get(4),
            read: row.get(5),
        };
        if !entries.is_empty() && bytes + entry.bytes() > page.bytes {
            break;
        }
        bytes += entry.bytes();
        entries.push(entry);
    }
    Ok(entries)
}

async fn replay_page(
    db: &impl GenericClient,
    user: &str,
    after: u64,
    through: u64,
    page: PageBound,
) -> Result<Vec<Entry>, tokio_postgres::Error> {
    let sql = format!(
        "{COLUMNS} WHERE e.user_id = $1 AND e.seq > $2 AND e.seq <= $3 ORDER BY e.seq LIMIT $4"
    );
    let limit = page.entries.max(1) as i64;
    let (after, through) = (clamp_seq(after), clamp_seq(through));
    page_of(db, &sql, &[&user, &after, &through, &limit], page).await
}

async fn list_page(
    db: &impl GenericClient,
    user: &str,
    query: ListQuery,
    page: PageBound,
) -> Result<Vec<Entry>, tokio_postgres::Error> {
    let sql = format!(
        "{COLUMNS} WHERE e.user_id = $1 AND e.seq < $2 AND (NOT $3 OR NOT e.read)
         ORDER BY e.seq DESC LIMIT $4"
    );
    let (before, limit, page) = query.page_bounds(page);
    page_of(
        db,
        &sql,
        &[&user, &before, &query.unread_only, &limit],
        page,
    )
    .await
}

/// A read-only transaction on one REPEATABLE READ snapshot, so counts, gap
/// and the first page of a replay or listing agree with each other.
async fn snapshot(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

impl PgStore {
    /// Counts, gap, `through` and the first page after `since`, of one
    /// snapshot.
    pub async fn replay(
        &self,
        user: &str,
        since: Option<u64>,
        page: PageBound,
    ) -> anyhow::Result<Replay> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let counts = counts(&tx, user).await?;
        let (next_seq, dropped_through): (i64, i64) = tx
            .query_opt(
                "SELECT next_seq, dropped_through FROM inbox_users WHERE user_id = $1",
                &[&user],
            )
            .await?
            .map_or((1, 0), |r| (r.get(0), r.get(1)));
        let through = (next_seq as u64).saturating_sub(1);
        let entries = match since {
            Some(since) => replay_page(&tx, user, since, through, page).await?,
            None => Vec::new(),
        };
        tx.commit().await?;
        let gap_oldest = since
            .filter(|since| dropped_through as u64 > *since)
            .map(|_| entries.first().map_or(next_seq as u64, |e| e.seq));
        Ok(Replay {
            counts,
            gap_oldest,
            through,
            entries,
        })
    }

    /// The next page of a replay: `after < seq <= through`, in order.
    pub async fn replay_page(
        &self,
        user: &str,
        after: u64,
        through: u64,
        page: PageBound,
    ) -> anyhow::Result<Vec<Entry>> {
        let client = self.client().await?;
        Ok(replay_page(&client, user, after, through, page).await?)
    }

    /// Counts and the first page of a listing, newest first.
    pub async fn list(
        &self,
        user: &str,
        query: ListQuery,
        page: PageBound,
    ) -> anyhow::Result<(Counts, Vec<Entry>)> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let counts = counts(&tx, user).await?;
        let entries = list_page(&tx, user, query, page).await?;
        tx.commit().await?;
        Ok((counts, entries))
    }

    /// A later page of a listing (see [`super::InboxReader::list_page`]).
    pub async fn list_page(
        &self,
        user: &str,
        query: ListQuery,
        page: PageBound,
    ) -> anyhow::Result<Vec<Entry>> {
        let client = self.client().await?;
        Ok(list_page(&client, user, query, page).await?)
    }
}
