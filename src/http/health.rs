//! Liveness and readiness for orchestrators and load balancers.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, Json};
use serde_json::{json, Value};

use super::{ApiError, HttpState};

/// 200 while the process serves.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 while consuming from the broker, else 503 with the reason.
pub async fn readyz(State(state): State<Arc<HttpState>>) -> Result<Json<Value>, ApiError> {
    match state.readiness.get() {
        Ok(()) => Ok(Json(json!({"status": "ready"}))),
        Err(reason) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            reason,
        )),
    }
}
