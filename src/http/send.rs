//! `POST /api/notifications/send`: validate with the same decoder the
//! consumer uses, republish onto the exchange with publisher confirms, and
//! answer 202 only once the broker confirmed.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{header, HeaderMap, StatusCode},
    Json,
};
use serde_json::{json, Value};

use super::{
    extract::ApiKey,
    openapi::schemas::{Error, Notification, Queued},
    ApiError, HttpState,
};
use crate::{
    message::{self, DecodeError},
    metrics::Limit,
};

/// Validates, publishes, and answers `202 {"status":"queued","id":…}`.
#[utoipa::path(post, path = "/api/notifications/send", operation_id = "sendNotification",
    summary = "Queue a notification",
    description = "Validated like a broker message, published to the notifications exchange with publisher confirms; 202 only after the broker confirmed. The trailing-slash form /api/notifications/send/ is accepted too.",
    security(("apiKey" = [])),
    request_body(content = Notification, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued: the broker confirmed the message", body = Queued),
        (status = 400, description = "Invalid body (the detail says what is wrong)", body = Error),
        (status = 401, description = "No or bad API key", body = Error),
        (status = 408, description = "The body did not arrive within http.request_timeout (code `timeout`)", body = Error),
        (status = 413, description = "Body larger than amqp.max_message_bytes", body = Error),
        (status = 503, description = "Broker unavailable or no confirm in time: nothing was queued, retry", body = Error),
    ))]
pub async fn send(
    State(state): State<Arc<HttpState>>,
    _: ApiKey,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let limit = state.limits.max_bytes;
    let too_large = |size: Option<usize>| {
        let detail = match size {
            Some(size) => {
                format!("body is {size} bytes, larger than amqp.max_message_bytes = {limit}")
            }
            None => format!("body is larger than amqp.max_message_bytes = {limit}"),
        };
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", detail)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(size) = declared.filter(|&size| size > limit) {
        return Err(too_large(Some(size)));
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(None))?;

    let fallback_id = uuid::Uuid::now_v7().to_string();
    let notification =
        message::decode(&bytes, Some(&fallback_id), &state.limits).map_err(|e| match e {
            DecodeError::TooLarge { size, .. } => too_large(Some(size)),
            DecodeError::TooManyRecipients { .. } => {
                if let Some(unlogged) = state.metrics.refused_to_log(Limit::MaxRecipients) {
                    tracing::warn!(reason = %e, refused_since_last_log = unlogged, "send refused");
                }
                ApiError::bad_request(e.to_string())
            }
            DecodeError::Invalid(reason) => ApiError::bad_request(reason),
        })?;

    state
        .publisher
        .publish(&bytes, &notification.id)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "send refused: broker unavailable");
            ApiError::unavailable(format!("{e}; nothing was queued, retry later"))
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"status": "queued", "id": notification.id})),
    ))
}
