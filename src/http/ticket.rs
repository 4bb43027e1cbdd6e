//! `POST /api/ws-ticket`: trade the user's JWT (in a header, where it stays
//! out of URLs and logs) for a one-time ticket to put in the WebSocket URL
//! (`?ticket=K`). See `crate::auth::tickets`.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, Json};
use serde_json::{json, Value};

use super::{extract::UserToken, ApiError, HttpState};
use crate::{auth::tickets::TicketError, config::AuthMode};

/// `201 {"ticket": K, "expires_in": SECONDS}` for a valid token.
pub async fn issue(
    State(state): State<Arc<HttpState>>,
    token: Result<UserToken, ApiError>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if state.auth.mode() == AuthMode::None {
        return Err(ApiError::not_found(
            "tickets stand for tokens: they exist only in auth.mode = \"jwt\"",
        ));
    }
    let UserToken(identity) = token?;
    let (issued, ttl) = match &state.cluster {
        None => {
            let tickets = state.auth.tickets();
            (tickets.issue(identity), tickets.ttl())
        }
        Some(cluster) => {
            let issued = cluster.tickets.issue(&identity).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot store a ticket");
                ApiError::unavailable("tickets cannot be stored; try again")
            })?;
            (issued, cluster.tickets.ttl())
        }
    };
    let ticket = issued.map_err(|e| match e {
        TicketError::TooMany => ApiError::unavailable(e.to_string()),
        TicketError::Unknown => ApiError::unauthorized(e.to_string()),
    })?;
    Ok((
        StatusCode::CREATED,
        // Whole seconds, rounded up: a client never reads 0 for a ticket
        // that still works.
        Json(json!({"ticket": ticket, "expires_in": ttl.as_secs_f64().ceil() as u64})),
    ))
}
