//! The demo page (`GET /`, with its script and style sheet under
//! `/assets/`) and its development-only token endpoint (`GET /api/dev/token`,
//! served only with `http.dev_tokens = true`).
//!
//! The page is three files in `assets/`, embedded in the binary: no CDN, no
//! build step. The HTML gets the page settings (where the WebSocket listener
//! is, the auth mode) as JSON in `<script id="settings">`; demo.js reads them.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, HeaderName},
    response::{Html, IntoResponse},
    Json,
};
use serde_json::{json, Value};

use super::{
    extract::Query,
    openapi::schemas::{DevToken, Error},
    ApiError, HttpState,
};
use crate::{config::AuthMode, query};

/// What the page needs to know to reach the WebSocket listener.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// The bound WebSocket address; a wildcard IP means "the host the page
    /// was loaded from".
    pub ws_addr: std::net::SocketAddr,
    pub ws_path: String,
    pub auth_mode: AuthMode,
    pub dev_tokens: bool,
    /// Whether the inbox is on: the page then reconnects with `since`, shows
    /// the unread count and marks notifications read when clicked.
    pub inbox: bool,
    /// For minting development tokens.
    pub auth: crate::config::AuthConfig,
}

const PAGE: &str = include_str!("assets/demo.html");
const SCRIPT: &str = include_str!("assets/demo.js");
const STYLE: &str = include_str!("assets/demo.css");

/// Where the settings JSON goes in `demo.html`.
const SETTINGS_SLOT: &str = "{{SETTINGS}}";

/// Only this page's own script and style sheet, and WebSockets to any host
/// (the listener is on another port): even a payload that slipped into the
/// DOM as HTML could not run script. `no-referrer` keeps `?token=` out of
/// Referer headers.
const PAGE_HEADERS: [(HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
];

/// `GET /`: the demo page, with this bridge's settings embedded.
#[utoipa::path(get, path = "/", operation_id = "demoPage",
    summary = "The demo page (?token=T, or ?user_id=U in auth.mode none, connects at once)",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html")))]
pub async fn page(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    (PAGE_HEADERS, Html(render_page(&page_settings(&state.demo))))
}

/// The page's HTML with `settings` in its JSON slot. `<` is escaped so the
/// JSON can never end the `<script>` element early.
pub fn render_page(settings: &Value) -> String {
    PAGE.replacen(
        SETTINGS_SLOT,
        &settings.to_string().replace('<', "\\u003c"),
        1,
    )
}

/// `GET /assets/demo.js`.
#[utoipa::path(get, path = "/assets/demo.js", operation_id = "demoScript",
    summary = "The demo page's script",
    responses((status = 200, description = "JavaScript", body = String, content_type = "text/javascript")))]
pub async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /assets/demo.css`.
#[utoipa::path(get, path = "/assets/demo.css", operation_id = "demoStyle",
    summary = "The demo page's stylesheet",
    responses((status = 200, description = "CSS", body = String, content_type = "text/css")))]
pub async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Revalidate every time, so an upgraded bridge never runs an old script.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
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
        "inbox": demo.inbox,
    })
}

/// `GET /api/dev/token?user_id=U[&channel=C]...`: a one-hour token, only
/// when `http.dev_tokens = true` (404 otherwise, as if it did not exist).
#[utoipa::path(get, path = "/api/dev/token", operation_id = "devToken",
    summary = "Mint a one-hour token (only with http.dev_tokens = true; 404 otherwise)",
    params(("user_id" = String, Query), ("channel" = Option<String>, Query, description = "Repeatable")),
    responses(
        (status = 200, description = "A token", body = inline(DevToken)),
        (status = 400, description = "No user_id", body = Error),
        (status = 404, description = "Development tokens are off", body = Error),
    ))]
pub async fn dev_token(
    State(state): State<Arc<HttpState>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let demo = &state.demo;
    if !demo.dev_tokens {
        return Err(ApiError::not_found(
            "development tokens are off (http.dev_tokens = false)",
        ));
    }
    let user = query::user_id(&query).ok_or_else(|| ApiError::bad_request("give ?user_id=U"))?;
    let channels: Vec<String> = query
        .iter()
        .filter(|(k, v)| k == "channel" && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect();
    let token = crate::auth::mint(
        &demo.auth,
        user.as_str(),
        &channels,
        std::time::Duration::from_secs(3600),
    )
    .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(
        json!({ "token": token, "user_id": user.as_str(), "expires_in": 3600 }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_cannot_close_the_script_element() {
        let html = render_page(&json!({"ws_path": "</script><script>alert(1)</script>"}));
        assert!(!html.contains(SETTINGS_SLOT));
        assert!(!html.contains("</script><script>alert(1)"), "{html}");
        assert!(html.contains(r#"\u003c/script>\u003cscript>alert(1)"#));
        let start = html
            .find(r#"<script id="settings" type="application/json">"#)
            .unwrap();
        let json_text = html[start..].split_once('>').unwrap().1;
        let json_text = json_text.split_once("</script>").unwrap().0;
        let back: Value = serde_json::from_str(json_text).unwrap();
        assert_eq!(back["ws_path"], "</script><script>alert(1)</script>");
    }

    #[test]
    fn the_page_uses_only_its_own_embedded_assets() {
        assert_eq!(PAGE.matches(SETTINGS_SLOT).count(), 1);
        assert!(PAGE.contains(r#"src="assets/demo.js""#));
        assert!(PAGE.contains(r#"href="assets/demo.css""#));
        for text in [PAGE, SCRIPT, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
        // Data is never put into the page as HTML.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("insertAdjacentHTML"));
    }
}
