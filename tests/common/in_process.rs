//! The side port's routes in-process: `notify_bridge::http::routes` called
//! with `tower::ServiceExt::oneshot` (axum's `testing` example), no socket
//! and no broker. The state is built from a [`Config`] as the daemon builds
//! it; the publisher is lazy (it connects on the first publish), so routes
//! that refuse before publishing never reach for a broker, and one that
//! does publish meets the unreachable broker of [`App::new`] (a 503).
//!
//! What needs the listener itself (head timers, the connection cap, file
//! descriptors, TLS) stays in the socket tests.

use std::sync::Arc;

use axum::body::Body;
use http_body_util::BodyExt;
use notify_bridge::{
    amqp::publisher::Publisher,
    auth::Authenticator,
    config::Config,
    http::{demo::DemoSettings, ApiKeys, HttpState},
    inbox::Inbox,
    message::DecodeLimits,
    metrics::Metrics,
    readiness::Readiness,
    router::Router,
};
use tower::ServiceExt as _;

use super::{free_port, test_config, HttpReply};

/// The side port's state and its route table, without a listener.
pub struct App {
    pub state: Arc<HttpState>,
    pub config: Config,
}

impl App {
    /// The routes of a bridge configured as [`test_config`] and `tweak`,
    /// with an AMQP URL nothing listens on: a request that reaches the
    /// publisher is answered 503, never queued.
    pub async fn new(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        config.amqp.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
        tweak(&mut config);
        let metrics = Arc::new(Metrics::default());
        let (router, _task) = Router::spawn(metrics.clone());
        let inbox = match config.inbox.enabled {
            true => Some(Inbox::open(&config.inbox).await.expect("the inbox opens")),
            false => None,
        };
        let state = Arc::new(HttpState {
            metrics,
            readiness: Arc::new(Readiness::default()),
            router,
            publisher: Publisher::new(config.amqp.clone()),
            keys: ApiKeys::from_config(&config.http),
            limits: DecodeLimits::from_config(&config.amqp),
            demo: DemoSettings {
                ws_addr: "127.0.0.1:8080".parse().unwrap(),
                ws_path: config.websocket.path.clone(),
                auth_mode: config.auth.mode,
                dev_tokens: config.http.dev_tokens,
                inbox: config.inbox.enabled,
                auth: config.auth.clone(),
            },
            auth: Arc::new(Authenticator::from_config(&config.auth).expect("auth config")),
            inbox,
            cluster: None,
        });
        Self { state, config }
    }

    /// One request through the route table; a body gets its
    /// Content-Length, as an HTTP client sends it.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpReply {
        let mut request = axum::http::Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if !body.is_empty() {
            request = request.header("content-length", body.len().to_string());
        }
        let request = request
            .body(Body::from(body.to_string()))
            .unwrap_or_else(|e| panic!("a valid request {method} {path}: {e}"));
        let routes = notify_bridge::http::routes(self.state.clone());
        let response = routes.oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("the body").to_bytes();
        HttpReply::from_parts(&parts, &body)
    }

    /// A GET without headers.
    pub async fn get(&self, path: &str) -> HttpReply {
        self.call("GET", path, &[], "").await
    }
}
