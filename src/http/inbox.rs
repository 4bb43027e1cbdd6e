//! The inbox over HTTP: a user lists and changes their own notifications
//! with their JWT; admins read any user's. Every route answers 404 while
//! the inbox is disabled.

use std::sync::Arc;

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::header,
    response::Response,
    Json,
};
use futures_util::StreamExt;
use serde::{de::Error as _, Deserialize, Deserializer};
use serde_json::{json, value::RawValue, Value};

use utoipa::{IntoParams, ToSchema};

use super::{
    extract::{AdminKey, Caller, EnabledInbox, JsonBody, Query},
    openapi::schemas::{Error, InboxCounts, InboxListing},
    ApiError, HttpState,
};
use crate::{
    inbox::{Change, Counts, Entry, Inbox, ListQuery},
    message::UserId,
};

/// The most entries one listing returns.
pub const MAX_LIMIT: usize = 500;
const DEFAULT_LIMIT: usize = 50;

fn unavailable(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %e, "inbox request failed");
    ApiError::unavailable("the inbox store is unavailable")
}

/// `?unread=true&before=N&limit=50`, each checked with its own message.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only unread entries
    #[serde(default, deserialize_with = "unread")]
    unread: bool,
    /// Only entries with seq < before (paging)
    #[serde(default, deserialize_with = "before")]
    #[param(value_type = u64, minimum = 0)]
    before: Option<u64>,
    #[serde(default, deserialize_with = "limit")]
    #[param(value_type = u64, minimum = 1, maximum = 500, default = 50)]
    limit: Option<usize>,
}

/// One query value through `check`, else a 400 saying `expected`.
fn value<'de, D: Deserializer<'de>, T>(
    d: D,
    check: impl FnOnce(&str) -> Option<T>,
    expected: impl std::fmt::Display,
) -> Result<T, D::Error> {
    check(&String::deserialize(d)?).ok_or_else(|| D::Error::custom(expected))
}

fn unread<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let check = |v: &str| match v {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    };
    value(d, check, "`unread` must be true or false")
}

fn before<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let check = |v: &str| v.parse().ok().map(Some);
    value(d, check, "`before` must be a non-negative integer (a seq)")
}

fn limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let check = |v: &str| {
        v.parse()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .map(Some)
    };
    value(
        d,
        check,
        format!("`limit` must be an integer from 1 to {MAX_LIMIT}"),
    )
}

impl From<ListParams> for ListQuery {
    fn from(p: ListParams) -> Self {
        Self {
            unread_only: p.unread,
            before: p.before,
            limit: p.limit.unwrap_or(DEFAULT_LIMIT),
        }
    }
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
#[utoipa::path(get, path = "/api/me/notifications", operation_id = "listMyNotifications",
    summary = "List your own inbox, newest first (inbox.enabled only; 404 otherwise)",
    security(("userToken" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "Entries newest first; total and unread count the whole inbox", body = inline(InboxListing)),
        (status = 400, description = "Bad unread, before or limit", body = Error),
        (status = 401, description = "No or bad token", body = Error),
        (status = 404, description = "The inbox is disabled", body = Error),
    ))]
pub async fn list_mine(
    EnabledInbox(inbox): EnabledInbox,
    Caller(user): Caller,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    list(&inbox, &user, params.into()).await
}

/// `GET /api/users/{user}/notifications` with an admin key.
#[utoipa::path(get, path = "/api/users/{user}/notifications", operation_id = "listUserNotifications",
    summary = "List any user's inbox (admin)",
    security(("adminKey" = [])),
    params(("user" = String, Path), ListParams),
    responses(
        (status = 200, description = "Entries newest first; total and unread count the whole inbox", body = inline(InboxListing)),
        (status = 400, description = "Bad unread, before or limit", body = Error),
        (status = 401, description = "No admin key", body = Error),
        (status = 404, description = "The inbox is disabled", body = Error),
    ))]
pub async fn list_for_user(
    EnabledInbox(inbox): EnabledInbox,
    _: AdminKey,
    Path(user): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let user =
        UserId::new(&user).ok_or_else(|| ApiError::bad_request("the user id must not be empty"))?;
    list(&inbox, &user, params.into()).await
}

/// One page of `user`'s inbox, as the query string asks. The counts and
/// the first store page are read before answering, so a store that fails
/// answers 503.
async fn list(inbox: &Inbox, user: &UserId, query: ListQuery) -> Result<Response, ApiError> {
    let (counts, first) = inbox
        .list(user.as_str(), query)
        .await
        .map_err(unavailable)?;
    Ok(listing(inbox, user, query, counts, first))
}

/// The body of `PATCH /api/me/notifications`: `{"action": …, "ids": […]}`.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
#[schema(as = InboxChange)]
pub enum ChangeBody {
    MarkRead {
        /// Required for mark_read and remove; unknown ids are ignored
        ids: Vec<String>,
    },
    Remove {
        /// Required for mark_read and remove; unknown ids are ignored
        ids: Vec<String>,
    },
    MarkAllRead,
    RemoveAll,
}

impl From<ChangeBody> for Change {
    fn from(body: ChangeBody) -> Self {
        match body {
            ChangeBody::MarkRead { ids } => Change::MarkRead(ids),
            ChangeBody::Remove { ids } => Change::Remove(ids),
            ChangeBody::MarkAllRead => Change::MarkAllRead,
            ChangeBody::RemoveAll => Change::RemoveAll,
        }
    }
}

/// `PATCH /api/me/notifications`: every socket of the user gets the new
/// counts when something changed.
#[utoipa::path(patch, path = "/api/me/notifications", operation_id = "changeMyNotifications",
    summary = "Mark read or remove entries; every socket of the user gets the new counts",
    security(("userToken" = [])),
    request_body(content = ChangeBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The inbox's counts after the change", body = InboxCounts),
        (status = 400, description = "Not JSON, unknown or missing action, or missing ids", body = Error),
        (status = 401, description = "No or bad token", body = Error),
        (status = 404, description = "The inbox is disabled", body = Error),
    ))]
pub async fn change_mine(
    State(state): State<Arc<HttpState>>,
    EnabledInbox(inbox): EnabledInbox,
    Caller(user): Caller,
    JsonBody(change): JsonBody<ChangeBody>,
) -> Result<Json<Value>, ApiError> {
    let (changed, counts) = inbox
        .change(user.as_str(), change.into())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Result<ListQuery, String> {
        let uri: axum::http::Uri = format!("/?{query}").parse().unwrap();
        axum::extract::Query::<ListParams>::try_from_uri(&uri)
            .map(|q| q.0.into())
            .map_err(|e| e.body_text())
    }

    #[test]
    fn list_params_as_before_with_their_own_messages() {
        let q = params("unread=1&before=7&limit=500&other=x").unwrap();
        assert_eq!((q.unread_only, q.before, q.limit), (true, Some(7), 500));
        let q = params("").unwrap();
        assert_eq!((q.unread_only, q.before, q.limit), (false, None, 50));
        assert!(!params("unread=false").unwrap().unread_only);
        for (query, says) in [
            ("limit=0", "`limit` must be an integer from 1 to 500"),
            ("limit=", "`limit`"),
            ("before=-1", "`before` must be a non-negative integer"),
            ("unread=maybe", "`unread` must be true or false"),
            // A parameter given twice is refused rather than the last one
            // silently winning.
            ("limit=5&limit=6", "duplicate field `limit`"),
        ] {
            let detail = params(query).unwrap_err();
            assert!(detail.contains(says), "{query}: {detail}");
        }
    }

    #[tokio::test]
    async fn change_bodies() {
        use axum::extract::FromRequest;
        async fn change(body: &'static str) -> Result<Change, ()> {
            let request = axum::extract::Request::new(Body::from(body));
            JsonBody::<ChangeBody>::from_request(request, &())
                .await
                .map(|JsonBody(body)| body.into())
                .map_err(|refusal| assert_eq!(refusal.status(), 400, "{body}"))
        }
        assert_eq!(
            change(r#"{"action":"mark_read","ids":["a"],"extra":1}"#).await,
            Ok(Change::MarkRead(vec!["a".into()]))
        );
        assert_eq!(
            change(r#"{"ids":5,"action":"mark_all_read"}"#).await,
            Ok(Change::MarkAllRead)
        );
        assert_eq!(
            change(r#"{"action":"remove_all"}"#).await,
            Ok(Change::RemoveAll)
        );
        for bad in [
            "not json",
            r#"{"action":"explode"}"#,
            r#"{"action":"remove"}"#,
            r#"{"action":"remove","ids":[1]}"#,
            r#"{"ids":["a"]}"#,
            r#"["mark_all_read"]"#,
        ] {
            assert!(change(bad).await.is_err(), "{bad}");
        }
    }
}
