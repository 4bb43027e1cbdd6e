//! Liveness and readiness for orchestrators and load balancers.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, Json};
use serde_json::{json, Value};

use super::{openapi::schemas::Error, ApiError, HttpState};

/// 200 while the process serves.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz",
    summary = "Liveness: 200 while the process serves",
    responses((status = 200, description = "Alive", body = Object)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 while consuming from the broker, else 503 with the reason.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz",
    summary = "Readiness: 200 while consuming from the broker",
    responses(
        (status = 200, description = "Consuming", body = Object),
        (status = 503, description = "Not consuming; error is not_ready and detail says why", body = Error),
    ))]
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
