//! The request body's deadline: once a request head has arrived, its body
//! must arrive within `http.request_timeout` (CONTRACT.md, "Limits on hostile
//! input"). hyper times the head (`header_read_timeout`, see
//! [`super::side_port`]) but not the body, and tower-http's body timeout
//! restarts with every frame, so a body trickled a byte at a time would
//! never expire; this one is a single deadline for the whole body. A body
//! that misses it ends in an error for the handler reading it, and the
//! answer becomes `408` with `Connection: close`.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::{Body as _, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tracing::warn;

use super::{
    log_limit::{LogLimit, LOG_INTERVAL},
    ApiError,
};
use crate::metrics::{Limit, Metrics};

/// What the middleware needs: the time a body may take, and where a miss is
/// counted and logged.
pub struct BodyDeadline {
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
    log: LogLimit,
}

impl BodyDeadline {
    /// A deadline of `timeout` per body, misses counted in `metrics`.
    pub fn new(timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            timeout,
            metrics,
            log: LogLimit::new(LOG_INTERVAL),
        }
    }
}

/// The axum middleware: wraps a request's body in its deadline, and answers
/// 408 if the handler's read of it ran out of time. A request without a body
/// passes untouched (no timer).
pub async fn enforce(
    State(deadline): State<Arc<BodyDeadline>>,
    request: Request,
    next: Next,
) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let sleep = Box::pin(tokio::time::sleep_until(Instant::now() + deadline.timeout));
    let flag = expired.clone();
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            sleep,
            expired: flag,
        })
    });
    let response = next.run(request).await;
    if !expired.load(Ordering::Acquire) {
        return response;
    }
    deadline.metrics.refused(Limit::HttpRequestTimeout);
    if let Some(unlogged) = deadline.log.event() {
        warn!(
            limit = Limit::HttpRequestTimeout.label(),
            timeout = ?deadline.timeout,
            unlogged_since_last = unlogged,
            "side port: a request body did not arrive within http.request_timeout; answered 408 and closed"
        );
    }
    timed_out(deadline.timeout)
}

/// The 408; `Connection: close` makes hyper close the connection after it,
/// instead of waiting for the rest of a body that is not coming.
fn timed_out(timeout: Duration) -> Response {
    let detail = format!(
        "the request body did not arrive within http.request_timeout = {}",
        humantime::format_duration(timeout)
    );
    let mut response =
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", detail).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Why the body ended early, as the body's error.
#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive within http.request_timeout")
    }
}

impl std::error::Error for BodyTimedOut {}

/// A body that fails once its deadline has passed; until then it is the
/// inner body, frame for frame.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.expired.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
