//! The HTTP side port: the REST send endpoint (republished onto the
//! exchange), admin routes, health, readiness, metrics and OpenAPI. axum gives routing, extractors and
//! 404/405 handling that would otherwise be hand-written; every error is
//! the contract's `{"error": CODE, "detail": TEXT}`. The listener is
//! `side_port` (connection cap, head timer, body deadline from `deadline`,
//! graceful shutdown).

mod activity;
mod admin;
mod deadline;
pub mod demo;
mod extract;
mod health;
mod inbox;
mod keys;
mod openapi;
mod send;
mod side_port;
mod ticket;

use std::sync::Arc;

use axum::{
    extract::MatchedPath,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::post,
    Router as Routes,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi as _;
use utoipa_axum::{router::OpenApiRouter, routes};

pub use crate::error::ApiError;
pub use keys::ApiKeys;
pub use side_port::SidePortLimits;

use crate::{
    amqp::publisher::Publisher, auth::Authenticator, inbox::Inbox, metrics::Metrics,
    readiness::Readiness, router::Router,
};

/// What the HTTP handlers share.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub router: Router,
    pub publisher: Publisher,
    pub keys: ApiKeys,
    /// `amqp.max_message_bytes` (the send endpoint's body limit) and
    /// `amqp.max_recipients`, as the consumer applies them.
    pub limits: crate::message::DecodeLimits,
    pub demo: demo::DemoSettings,
    /// Verifies users' own tokens for the inbox routes.
    pub auth: Arc<Authenticator>,
    pub inbox: Option<Inbox>,
    /// In cluster mode: admin routes and counts act on every instance.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Every route but the trailing-slash alias, each from its handler's
/// `#[utoipa::path]`: this one list is both the router and the paths of
/// `/openapi.json`, so neither can have a route the other lacks. One
/// `routes!` per path: given handlers of two paths, utoipa-axum 0.2
/// mounted every handler's method on both (0.3 is used now; one per path
/// is right either way).
fn documented_routes() -> OpenApiRouter<Arc<HttpState>> {
    OpenApiRouter::with_openapi(openapi::Base::openapi())
        .routes(routes!(send::send))
        .routes(routes!(ticket::issue))
        .routes(routes!(admin::list))
        .routes(routes!(admin::disconnect))
        .routes(routes!(inbox::list_mine, inbox::change_mine))
        .routes(routes!(inbox::list_for_user))
        .routes(routes!(openapi::openapi))
        .routes(routes!(demo::page))
        .routes(routes!(demo::script))
        .routes(routes!(demo::style))
        .routes(routes!(demo::dev_token))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics))
}

/// The route table of the side port.
pub fn routes(state: Arc<HttpState>) -> Routes {
    let (routes, _) = documented_routes()
        // Named in sendNotification's description rather than a path of its own.
        .route("/api/notifications/send/", post(send::send))
        .split_for_parts();
    routes
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(())
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The span every handler runs in: the method and the route as declared
/// (`/api/users/{user}/notifications`), never the raw path or query, which
/// may carry a token or be as long as a hostile client makes it.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    tracing::info_span!("request", method = %request.method(), route = %route)
}

/// Serves until shutdown, within `limits` (CONTRACT.md, "Limits on hostile
/// input"): the connection cap, the head timer and the body's deadline are
/// the listener's (`side_port`, `deadline`). With `tls`, over https.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    limits: SidePortLimits,
    tls: Option<Arc<crate::tls::ListenerTls>>,
    shutdown: CancellationToken,
) {
    let metrics = state.metrics.clone();
    side_port::serve(listener, routes(state), limits, metrics, tls, shutdown).await;
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", summary = "Prometheus metrics (text format 0.0.4)",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain")))]
async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<HttpState>>,
) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
