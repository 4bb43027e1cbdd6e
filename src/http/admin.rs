//! Admin routes: list the connections (of every instance, in cluster
//! mode), and disconnect one wherever it is.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde_json::{json, Value};

use super::{
    extract::{AdminKey, UserIdParam},
    openapi::schemas::{Connections, Error},
    ApiError, HttpState,
};

/// `GET /api/connections[?user_id=U]`.
#[utoipa::path(get, path = "/api/connections", operation_id = "listConnections",
    summary = "List the open WebSocket connections (of every instance, in cluster mode)",
    security(("adminKey" = [])),
    params(("user_id" = Option<String>, Query, description = "Only this user's connections")),
    responses(
        (status = 200, description = "The connections", body = inline(Connections)),
        (status = 400, description = "Bad query", body = Error),
        (status = 401, description = "No admin key", body = Error),
        (status = 503, description = "Cluster mode: the other instances cannot be asked", body = Error),
    ))]
pub async fn list(
    State(state): State<Arc<HttpState>>,
    _: AdminKey,
    UserIdParam(user): UserIdParam,
) -> Result<Json<Value>, ApiError> {
    let connections = match &state.cluster {
        None => state.router.list(user).await,
        Some(cluster) => crate::cluster::admin::list(cluster, user.as_ref())
            .await
            .map_err(cluster_unavailable)?,
    };
    Ok(Json(json!({ "connections": connections })))
}

/// `DELETE /api/connections/{id}`: closes that connection with 1008.
#[utoipa::path(delete, path = "/api/connections/{id}", operation_id = "closeConnection",
    summary = "Close one connection with WebSocket close code 1008, on whichever instance holds it",
    security(("adminKey" = [])),
    params(("id" = String, Path, example = "c-1")),
    responses(
        (status = 204, description = "Closed"),
        (status = 401, description = "No admin key", body = Error),
        (status = 404, description = "No open connection has that id (in cluster mode: no live instance has it)", body = Error),
        (status = 503, description = "Cluster mode: the instance holding it cannot be asked", body = Error),
    ))]
pub async fn disconnect(
    State(state): State<Arc<HttpState>>,
    _: AdminKey,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let not_found = || ApiError::not_found(format!("no open connection {id}"));
    let found = match &state.cluster {
        Some(cluster) => crate::cluster::admin::disconnect(cluster, &id)
            .await
            .map_err(cluster_unavailable)?,
        None => match state.router.names().parse(&id) {
            Some(parsed) => state.router.disconnect(parsed).await,
            None => false,
        },
    };
    if found {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

fn cluster_unavailable(e: anyhow::Error) -> ApiError {
    tracing::warn!(error = %e, "admin call across the cluster failed");
    ApiError::unavailable("the cluster cannot be reached; try again")
}
