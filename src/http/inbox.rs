//! The inbox over HTTP: a user lists and changes their own notifications
//! with their JWT; admins read any user's. Every route answers 404 while
//! the inbox is disabled.

use std::sync::Arc;

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{header, HeaderMap, Uri},
    response::Response,
    Json,
};
use futures_util::StreamExt;
use serde_json::{json, value::RawValue, Value};

use super::{ApiError, HttpState};
use crate::{
    config::AuthMode,
    inbox::{Change, Counts, Entry, Inbox, ListQuery},
    message::UserId,
    query,
};

/// The most entries one listing returns.
pub const MAX_LIMIT: usize = 500;
const DEFAULT_LIMIT: usize = 50;

fn inbox(state: &HttpState) -> Result<&Inbox, ApiError> {
    state.inbox.as_ref().ok_or_else(|| {
        ApiError::not_found("the inbox is not enabled on this server (inbox.enabled = false)")
    })
}

fn unavailable(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %e, "inbox request failed");
    ApiError::unavailable("the inbox store is unavailable")
}

/// The user a request speaks for: the JWT's user (or, in `auth.mode =
/// "none"`, `?user_id=`).
fn caller(state: &HttpState, headers: &HeaderMap, uri: &Uri) -> Result<UserId, ApiError> {
    if state.auth.mode() == AuthMode::None {
        return query::user_id(&query::parse(uri.query().unwrap_or("")))
            .ok_or_else(|| ApiError::unauthorized("auth.mode is \"none\": give ?user_id=U"));
    }
    let token = crate::auth::bearer_token(headers)
        .ok_or_else(|| ApiError::unauthorized("send your token as Authorization: Bearer T"))?;
    state
        .auth
        .verify(token)
        .map(|identity| identity.user)
        .map_err(ApiError::unauthorized)
}

fn parse_list_query(uri: &Uri) -> Result<ListQuery, ApiError> {
    let mut query = ListQuery {
        unread_only: false,
        before: None,
        limit: DEFAULT_LIMIT,
    };
    for (key, value) in query::parse(uri.query().unwrap_or("")) {
        match key.as_str() {
            "unread" => {
                query.unread_only = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(ApiError::bad_request("`unread` must be true or false")),
                }
            }
            "before" => {
                query.before = Some(value.parse().map_err(|_| {
                    ApiError::bad_request("`before` must be a non-negative integer (a seq)")
                })?)
            }
            "limit" => {
                query.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`limit` must be an integer from 1 to {MAX_LIMIT}"
                        ))
                    })?
            }
            _ => {}
        }
    }
    Ok(query)
}

/// One entry as the listing shows it.
fn entry_json(e: Entry) -> Value {
    let payload = RawValue::from_string(e.payload)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"));
    let created_at =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.created_at_ms.max(0) as u64);
    json!({
        "id": e.id,
        "seq": e.seq,
        "event": e.event,
        "payload": payload,
        "created_at": humantime::format_rfc3339_seconds(created_at).to_string(),
        "read": e.read,
    })
}

/// Where a streamed listing is: the next page starts below `query.before`
/// and holds at most `query.limit` (what is left) entries.
struct Listing {
    inbox: Inbox,
    user: UserId,
    query: ListQuery,
    /// The page read but not yet written (the first comes with the counts).
    page: Option<Vec<Entry>>,
    started: bool,
    done: bool,
}

impl Listing {
    /// The next piece of the body: the opening with the first page, then
    /// one page at a time, then the closing brackets. A page the store
    /// fails to read ends the body early (the client sees a cut response).
    async fn next_piece(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.done {
            return None;
        }
        let page = match self.page.take() {
            Some(page) => page,
            None if self.query.limit == 0 => Vec::new(),
            None => match self.inbox.list_page(self.user.as_str(), self.query).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, user = %self.user, "inbox listing failed");
                    self.done = true;
                    return Some(Err(std::io::Error::other("the inbox store is unavailable")));
                }
            },
        };
        let mut out = Vec::new();
        if page.is_empty() {
            out.extend_from_slice(b"]}");
            self.done = true;
        }
        for entry in page {
            self.query.before = Some(entry.seq);
            self.query.limit -= 1;
            if std::mem::replace(&mut self.started, true) {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, &entry_json(entry)).expect("JSON to a Vec");
        }
        Some(Ok(Bytes::from(out)))
    }
}

/// The response for a listing: `{"total","unread","notifications":[…]}`,
/// streamed page by page, so a `limit=500` listing of 1 MiB entries never
/// holds more than a page.
fn listing(
    inbox: &Inbox,
    user: &UserId,
    query: ListQuery,
    counts: Counts,
    first: Vec<Entry>,
) -> Response {
    let head = format!(
        r#"{{"total":{},"unread":{},"notifications":["#,
        counts.total, counts.unread
    );
    let state = Listing {
        inbox: inbox.clone(),
        user: user.clone(),
        query,
        page: Some(first),
        started: false,
        done: false,
    };
    let pages = futures_util::stream::unfold(state, |mut state| async move {
        state.next_piece().await.map(|piece| (piece, state))
    });
    let head = futures_util::stream::once(async move { Ok(Bytes::from(head)) });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(head.chain(pages)))
        .expect("a valid response")
}

/// `GET /api/me/notifications?unread=true&before=N&limit=50`, newest first.
pub async fn list_mine(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let inbox = inbox(&state)?;
    let user = caller(&state, &headers, &uri)?;
    list(inbox, &user, &uri).await
}

/// `GET /api/users/{user}/notifications` with an admin key.
pub async fn list_for_user(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let inbox = inbox(&state)?;
    state.keys.check_admin(&headers)?;
    let user =
        UserId::new(&user).ok_or_else(|| ApiError::bad_request("the user id must not be empty"))?;
    list(inbox, &user, &uri).await
}

/// One page of `user`'s inbox, as the query string asks. The counts and
/// the first store page are read before answering, so a store that fails
/// answers 503.
async fn list(inbox: &Inbox, user: &UserId, uri: &Uri) -> Result<Response, ApiError> {
    let query = parse_list_query(uri)?;
    let (counts, first) = inbox
        .list(user.as_str(), query)
        .await
        .map_err(unavailable)?;
    Ok(listing(inbox, user, query, counts, first))
}

/// `PATCH /api/me/notifications` with `{"action": …, "ids": […]}`.
pub async fn change_mine(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let inbox = inbox(&state)?;
    let user = caller(&state, &headers, &uri)?;
    let change = parse_change(&body)?;
    let (changed, counts) = inbox
        .change(user.as_str(), change)
        .await
        .map_err(unavailable)?;
    if changed {
        crate::cluster::announce_counts(state.cluster.as_deref(), &state.router, &user, counts)
            .await;
    }
    Ok(Json(
        json!({"total": counts.total, "unread": counts.unread}),
    ))
}

fn parse_change(body: &[u8]) -> Result<Change, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
    let ids = || -> Result<Vec<String>, ApiError> {
        match value.get("ids") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|id| id.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::bad_request("`ids` must be an array of strings")),
            Some(_) => Err(ApiError::bad_request("`ids` must be an array of strings")),
            None => Err(ApiError::bad_request("this action needs `ids`")),
        }
    };
    match value.get("action").and_then(Value::as_str) {
        Some("mark_read") => Ok(Change::MarkRead(ids()?)),
        Some("remove") => Ok(Change::Remove(ids()?)),
        Some("mark_all_read") => Ok(Change::MarkAllRead),
        Some("remove_all") => Ok(Change::RemoveAll),
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown action {other:?}; expected mark_read, remove, mark_all_read or remove_all"
        ))),
        None => Err(ApiError::bad_request("missing `action`")),
    }
}
