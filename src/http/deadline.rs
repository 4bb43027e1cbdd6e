//! The request body's deadline: once a request head has arrived, its body
//! must arrive within `http.request_timeout` (CONTRACT.md, "Limits on hostile
//! input"). hyper times the head (`header_read_timeout`, see
//! `super::side_port`) but not the body, and tower-http's body timeout
//! restarts with every frame, so a body trickled a byte at a time would
//! never expire; this one is a single deadline for the whole body. A body
//! that misses it ends in an error for the handler reading it, and the
//! answer becomes `408` with `Connection: close`. It is applied in the
//! connection's service (not as an axum middleware, which boxes the route
//! per request: measured +12 µs of CPU per request in a debug build).

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
    body::Bytes,
    http::{header, HeaderValue, Request, StatusCode},
    response::{IntoResponse, Response},
    BoxError,
};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tracing::warn;

use super::ApiError;
use crate::{
    log_limit::{LogLimit, LOG_INTERVAL},
    metrics::{Limit, Metrics},
};

/// The time a body may take, and where a miss is counted and logged.
pub struct BodyDeadline {
    timeout: Duration,
    metrics: Arc<Metrics>,
    log: LogLimit,
}

/// Set once a request's body missed its deadline; checked on its answer.
#[derive(Clone, Default)]
pub struct Expired(Arc<AtomicBool>);

impl BodyDeadline {
    /// A deadline of `timeout` per body, misses counted in `metrics`.
    pub fn new(timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            timeout,
            metrics,
            log: LogLimit::new(LOG_INTERVAL),
        }
    }

    /// Puts `request`'s body under the deadline, from now (its head has just
    /// arrived). A request without a body gets no timer.
    pub fn arm<B: Body + Unpin>(
        &self,
        request: Request<B>,
    ) -> (Request<DeadlineBody<B>>, Option<Expired>) {
        if request.body().is_end_stream() {
            let request = request.map(|inner| DeadlineBody { inner, timer: None });
            return (request, None);
        }
        let expired = Expired::default();
        let sleep = Box::pin(tokio::time::sleep_until(Instant::now() + self.timeout));
        let flag = expired.clone();
        let request = request.map(|inner| DeadlineBody {
            inner,
            timer: Some((sleep, flag)),
        });
        (request, Some(expired))
    }

    /// The answer to a request armed with [`Self::arm`]: as it is, or the 408
    /// if the handler's read of the body ran out of time.
    pub fn answer(&self, expired: Option<Expired>, response: Response) -> Response {
        if !expired.is_some_and(|e| e.0.load(Ordering::Acquire)) {
            return response;
        }
        self.metrics.refused(Limit::HttpRequestTimeout);
        if let Some(unlogged) = self.log.event() {
            warn!(
                limit = Limit::HttpRequestTimeout.label(),
                timeout = ?self.timeout,
                unlogged_since_last = unlogged,
                "side port: a request body did not arrive within http.request_timeout; answered 408 and closed"
            );
        }
        timed_out(self.timeout)
    }
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

/// A body that fails once its deadline has passed; until then, and always
/// for a request armed without a timer, it is the inner body frame for
/// frame.
pub struct DeadlineBody<B> {
    inner: B,
    timer: Option<(Pin<Box<Sleep>>, Expired)>,
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some((_, expired)) = &this.timer {
            if expired.0.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some((sleep, expired)) = &mut this.timer {
            if sleep.as_mut().poll(cx).is_ready() {
                expired.0.store(true, Ordering::Release);
                return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
            }
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
