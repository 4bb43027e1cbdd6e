//! The one error type of the side port, rendered as
//! `{"error": CODE, "detail": TEXT}` with a fitting status.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

/// An error answer; the code is one of the contract's error codes.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": self.code, "detail": self.detail})),
        )
            .into_response()
    }
}
