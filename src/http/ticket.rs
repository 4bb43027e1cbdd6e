//! `POST /api/ws-ticket`: trade the user's JWT (in a header, where it stays
//! out of URLs and logs) for a one-time ticket to put in the WebSocket URL
//! (`?ticket=K`). See `crate::auth::tickets`.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, Json};
use serde_json::{json, Value};

use super::{
    extract::UserToken,
    openapi::schemas::{Error, Ticket},
    ApiError, HttpState,
};
use crate::{auth::tickets::TicketError, config::AuthMode};

/// `201 {"ticket": K, "expires_in": SECONDS}` for a valid token.
#[utoipa::path(post, path = "/api/ws-ticket", operation_id = "issueWsTicket",
    summary = "Trade your JWT for a one-time WebSocket ticket",
    description = "Connect with ws://HOST/ws?ticket=K within expires_in seconds (auth.ticket_ttl); the ticket works once, for the token's user and channels, so no token stands in a URL. 404 in auth.mode = \"none\".",
    security(("userToken" = [])),
    responses(
        (status = 201, description = "A ticket", body = inline(Ticket)),
        (status = 401, description = "No or bad token", body = Error),
        (status = 404, description = "auth.mode = \"none\": there are no tokens to trade", body = Error),
        (status = 503, description = "Too many tickets waiting to be used", body = Error),
    ))]
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
