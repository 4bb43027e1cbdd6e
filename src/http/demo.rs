//! The demo page (`GET /`) and its development-only token endpoint
//! (`GET /api/dev/token`, served only with `http.dev_tokens = true`).

use std::sync::Arc;

use axum::{
    extract::State,
    http::{StatusCode, Uri},
    response::Html,
    Json,
};
use serde_json::{json, Value};

use super::{ApiError, HttpState};
use crate::{config::AuthMode, ws::handshake::parse_query};

/// What the page needs to know to reach the WebSocket listener.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// The bound WebSocket address; a wildcard IP means "the host the page
    /// was loaded from".
    pub ws_addr: std::net::SocketAddr,
    pub ws_path: String,
    pub auth_mode: AuthMode,
    pub dev_tokens: bool,
    /// For minting development tokens.
    pub auth: crate::config::AuthConfig,
}

/// `GET /`: the demo page (placeholder until the real page lands).
pub async fn page(State(state): State<Arc<HttpState>>) -> Html<String> {
    let settings = page_settings(&state.demo);
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>notify-bridge</title></head>\
         <body><script id=\"settings\" type=\"application/json\">{}</script></body></html>",
        settings.to_string().replace('<', "\\u003c")
    ))
}

/// The settings the page reads from its embedded JSON.
pub fn page_settings(demo: &DemoSettings) -> Value {
    let host = (!demo.ws_addr.ip().is_unspecified()).then(|| demo.ws_addr.ip().to_string());
    json!({
        "ws_host": host,
        "ws_port": demo.ws_addr.port(),
        "ws_path": demo.ws_path,
        "auth_mode": match demo.auth_mode { AuthMode::Jwt => "jwt", AuthMode::None => "none" },
        "dev_tokens": demo.dev_tokens,
    })
}

/// `GET /api/dev/token?user_id=U[&channel=C]...`: a one-hour token, only
/// when `http.dev_tokens = true` (404 otherwise, as if it did not exist).
pub async fn dev_token(
    State(state): State<Arc<HttpState>>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let demo = &state.demo;
    if !demo.dev_tokens {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "development tokens are off (http.dev_tokens = false)",
        ));
    }
    let query = parse_query(uri.query().unwrap_or(""));
    let user = query
        .iter()
        .find(|(k, v)| k == "user_id" && !v.trim().is_empty())
        .map(|(_, v)| v.trim().to_string())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "give ?user_id=U"))?;
    let channels: Vec<String> = query
        .iter()
        .filter(|(k, v)| k == "channel" && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect();
    let token = crate::auth::mint(
        &demo.auth,
        &user,
        &channels,
        std::time::Duration::from_secs(3600),
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(
        json!({ "token": token, "user_id": user, "expires_in": 3600 }),
    ))
}
