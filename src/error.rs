//! The one error answer of the bridge's HTTP surfaces: a refused WebSocket
//! handshake and a failed side-port request are both `{status, code,
//! detail}`, sent as the contract's body `{"error": CODE, "detail": TEXT}`.
//! One type, so the two can never drift apart.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

use crate::metrics::Limit;

/// An error answer; the code is one of the contract's error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// The hostile-input limit this refusal enforces, if any: such
    /// refusals are counted and logged at WARN, ordinary ones at DEBUG.
    pub limit: Option<Limit>,
}

impl ApiError {
    /// Any status with its contract code; the shorthands below cover the
    /// common ones.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            limit: None,
        }
    }

    /// 400 `bad_request`: the request itself is wrong.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    /// 401 `unauthorized`: no or a bad token or key.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    /// 403 `forbidden`: known caller, not allowed.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    /// 404 `not_found`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 503 `unavailable`: try again later.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// Marks the refusal as enforcing `limit`.
    pub fn for_limit(self, limit: Limit) -> Self {
        Self {
            limit: Some(limit),
            ..self
        }
    }

    /// The contract's body, `{"error": CODE, "detail": TEXT}`.
    fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.code, "detail": self.detail})
    }

    /// The error as a complete HTTP/1.1 response, for the WebSocket
    /// listener, which answers refused handshakes itself: the status, the
    /// body with its length (so a client need not wait for the close to
    /// know it has all of it), `Connection: close`, and `Allow: GET` for a
    /// 405.
    pub fn to_http(&self) -> Vec<u8> {
        let body = self.body().to_string();
        let allow = if self.status == StatusCode::METHOD_NOT_ALLOWED {
            "Allow: GET\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n{allow}\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
