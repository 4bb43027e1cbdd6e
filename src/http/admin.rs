//! Admin routes: list this instance's connections, and disconnect one.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Uri},
    Json,
};
use serde_json::{json, Value};

use super::{ApiError, HttpState};
use crate::{message::UserId, router::ConnectionId, ws::handshake::parse_query};

/// `GET /api/connections[?user_id=U]`.
pub async fn list(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    state.keys.check_admin(&headers)?;
    let query = parse_query(uri.query().unwrap_or(""));
    let user = match query.iter().find(|(k, _)| k == "user_id") {
        None => None,
        Some((_, value)) => Some(UserId::new(value).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "`user_id` must not be empty",
            )
        })?),
    };
    let connections = state.router.list(user).await;
    Ok(Json(json!({ "connections": connections })))
}

/// `DELETE /api/connections/{id}`: closes that connection with 1008.
pub async fn disconnect(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.keys.check_admin(&headers)?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no open connection {id}"),
        )
    };
    let parsed: ConnectionId = id.parse().map_err(|_| not_found())?;
    if state.router.disconnect(parsed).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}
