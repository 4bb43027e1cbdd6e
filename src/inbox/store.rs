//! The inbox store's interface: small enough that a server database can be
//! added behind it later. Writes (`InboxStore`) run on one thread in order;
//! reads (`InboxReader`) run on connections of their own beside it, so a
//! long replay never delays a commit.
//!
//! The default implementation is one SQLite file ([`super::sqlite`]).

/// One message to store for several users; its payload is kept once,
/// however many users it is for.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub event: String,
    pub payload: String,
    /// Distinct user ids.
    pub users: Vec<String>,
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

impl Entry {
    /// What the entry weighs against a page's byte bound.
    pub fn bytes(&self) -> usize {
        self.payload.len() + self.id.len() + self.event.len()
    }
}

/// The whole inbox's counts, whatever filter a listing used. Equal counts
/// are equal whatever their version: the version orders, it is not a value.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counts {
    pub total: u64,
    pub unread: u64,
    /// Moved on by every read-state change (PostgreSQL; 0 in SQLite, whose
    /// one writer already orders them): counts frames from several
    /// instances are ordered by it. Not part of any body.
    #[serde(skip)]
    pub version: u64,
}

impl PartialEq for Counts {
    fn eq(&self, other: &Self) -> bool {
        (self.total, self.unread) == (other.total, other.unread)
    }
}

impl Eq for Counts {}

/// How much one read may hold: a page ends at `entries` entries or before
/// passing `bytes`, and always has at least one entry when any is left, so
/// one user's replay or listing never holds a whole inbox in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBound {
    pub entries: usize,
    pub bytes: usize,
}

impl PageBound {
    /// 64 entries or 1 MiB.
    pub const DEFAULT: PageBound = PageBound {
        entries: 64,
        bytes: 1 << 20,
    };
}

/// A seq from outside (a u64, up to 2^64-1) as both stores hold it (a
/// signed 64-bit integer): seqs never pass `i64::MAX`, so clamping keeps
/// every comparison true to the u64.
pub fn clamp_seq(seq: u64) -> i64 {
    seq.min(i64::MAX as u64) as i64
}

impl ListQuery {
    /// The bounds of one page of this listing, as both stores query it:
    /// `seq < before` (clamped), at most `limit` rows and never more than
    /// `page` allows, and the page bound with that row count.
    pub fn page_bounds(&self, page: PageBound) -> (i64, i64, PageBound) {
        let before = self.before.map_or(i64::MAX, clamp_seq);
        let limit = self.limit.min(page.entries.max(1));
        let page = PageBound {
            entries: limit,
            ..page
        };
        (before, limit as i64, page)
    }
}

/// The start of what a reconnecting client with `?since=N` gets; the rest
/// comes in pages of entries with `after < seq <= through`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub counts: Counts,
    /// `Some(oldest)` when retention dropped entries after `since`.
    pub gap_oldest: Option<u64>,
    /// The last seq assigned when the replay was read: the replay ends
    /// there, and anything later arrives live.
    pub through: u64,
    /// The first page of entries with `since < seq <= through`, in order
    /// (empty without `since`).
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

/// An entry a change turned from unread to read: what its `read` receipt
/// names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEntry {
    pub id: String,
    pub seq: u64,
}

/// What a change did, for callers that send `read` receipts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Changed {
    /// `true` when anything changed.
    pub changed: bool,
    pub counts: Counts,
    /// The entries that were unread until this change (only when asked
    /// for, and never for a removal), in no particular order.
    pub newly_read: Vec<ReadEntry>,
}

/// The writes the inbox needs from a store. They run on the store's own
/// thread, in order, so they may block.
pub trait InboxStore: Send + 'static {
    /// Stores a batch atomically; for each message, for each of its users
    /// in order, the new `seq`, or `None` when that user's inbox already
    /// holds the id (a redelivery). A message no user needs stores no
    /// payload. Applies the count retention to the users it touched.
    fn append(
        &mut self,
        batch: &[NewMessage],
        now_ms: i64,
        max_per_user: usize,
    ) -> anyhow::Result<Vec<Vec<Option<u64>>>>;
    /// Applies a change; with `report_reads`, also which entries it turned
    /// from unread to read (SQL `RETURNING`), for their `read` receipts.
    fn change_reporting(
        &mut self,
        user: &str,
        change: &Change,
        report_reads: bool,
    ) -> anyhow::Result<Changed>;
    /// Applies a change; `true` when anything changed.
    fn change(&mut self, user: &str, change: &Change) -> anyhow::Result<(bool, Counts)> {
        self.change_reporting(user, change, false)
            .map(|c| (c.changed, c.counts))
    }
    /// Drops entries created before `cutoff_ms`; returns how many.
    fn expire(&mut self, cutoff_ms: i64) -> anyhow::Result<usize>;
    /// A reader on a connection of its own that sees every committed write.
    fn reader(&self) -> anyhow::Result<Box<dyn InboxReader>>;
}

/// The reads: each call sees one consistent, committed state and returns
/// at most one page. They may block; callers run them off the runtime.
pub trait InboxReader: Send + 'static {
    /// Counts, gap, `through` and the first page after `since`.
    fn replay(&mut self, user: &str, since: Option<u64>, page: PageBound)
        -> anyhow::Result<Replay>;
    /// The next page of a replay: `after < seq <= through`, in order.
    fn replay_page(
        &mut self,
        user: &str,
        after: u64,
        through: u64,
        page: PageBound,
    ) -> anyhow::Result<Vec<Entry>>;
    /// Counts and the first page of a listing, newest first (at most
    /// `query.limit` entries).
    fn list(
        &mut self,
        user: &str,
        query: ListQuery,
        page: PageBound,
    ) -> anyhow::Result<(Counts, Vec<Entry>)>;
    /// A later page of a listing: the caller moves `before` to the last
    /// seq it got and lowers `limit` to what is left.
    fn list_page(
        &mut self,
        user: &str,
        query: ListQuery,
        page: PageBound,
    ) -> anyhow::Result<Vec<Entry>>;
}
