//! What a side-port connection did since its last answer, so that the head
//! timer's two cases can be told apart: hyper reports a head that did not
//! arrive in time and a keep-alive connection that idled too long as the
//! same error, but only the first is hostile input (counted, logged), the
//! second is a browser keeping a connection for later.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared by a connection's socket ([`Watched`]) and its service.
#[derive(Debug, Default)]
pub struct Activity {
    /// At least one request was answered.
    answered: AtomicBool,
    /// Bytes arrived after the last answer (or since the start).
    unanswered_bytes: AtomicBool,
}

impl Activity {
    /// A request was answered: what arrived so far was part of it.
    pub fn answered(&self) {
        self.answered.store(true, Ordering::Release);
        self.unanswered_bytes.store(false, Ordering::Release);
    }

    /// Whether a head timeout now would close a keep-alive connection that
    /// merely idled: it has answered a request, and nothing came after.
    pub fn idle_keep_alive(&self) -> bool {
        self.answered.load(Ordering::Acquire) && !self.unanswered_bytes.load(Ordering::Acquire)
    }
}

/// A socket that notes in its [`Activity`] when bytes arrive; otherwise the
/// socket itself.
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity
                .unanswered_bytes
                .store(true, Ordering::Release);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_after_an_answer_with_nothing_since() {
        let activity = Activity::default();
        assert!(!activity.idle_keep_alive(), "a fresh connection");
        activity.unanswered_bytes.store(true, Ordering::Release);
        assert!(!activity.idle_keep_alive(), "half a first head");
        activity.answered();
        assert!(activity.idle_keep_alive(), "answered, nothing since");
        activity.unanswered_bytes.store(true, Ordering::Release);
        assert!(!activity.idle_keep_alive(), "half a second head");
    }
}
