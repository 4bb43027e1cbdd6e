//! Reading the upgrade request's head ourselves, in a bounded buffer, so that
//! a hostile or broken client gets a clear HTTP answer instead of a dropped
//! connection: 414 for an overlong request target, 431 for an overlong head
//! or too many header lines, 405 for another method, 400 for anything that
//! is not an HTTP request. tungstenite would read up to 64 KiB and then drop
//! the connection without a word.
//!
//! The scan is linear in the bytes received (a client sending one byte at a
//! time costs one small read each, never a re-parse of the whole buffer),
//! and the buffer grows 2 → 4 → 8 → 16 KiB only as the head does. The time
//! bound (`websocket.handshake_timeout`) is the caller's.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_tungstenite::tungstenite::{
    error::{CapacityError, Error as WsError, ProtocolError},
    handshake::{machine::TryParse, server::Request},
    http::StatusCode,
};

use crate::error::ApiError;

/// The longest request target (path and query, where `?token=` lives)
/// accepted: longer gets 414. A JWT with a long `channels` claim stays far
/// below it; nginx's default line limit is the same 8 KiB.
pub const MAX_REQUEST_TARGET_BYTES: usize = 8 * 1024;

/// The longest request head (request line and every header, up to the empty
/// line) accepted: longer gets 431. Browsers send well under 2 KiB plus
/// their cookies for the host.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The most header lines accepted: more gets 431. Browsers send about 15.
pub const MAX_HEADERS: usize = 100;

/// The first buffer; it doubles only when a head is longer.
const FIRST_BUFFER_BYTES: usize = 2 * 1024;

/// The longest method token looked for before the first space.
const MAX_METHOD_BYTES: usize = 16;

/// `" HTTP/1.1\r"`: what may follow the target on the request line.
const VERSION_SUFFIX_BYTES: usize = 10;

/// A complete request head.
#[derive(Debug)]
pub struct Head {
    /// The parsed request: method GET, HTTP/1.1, its URI and headers.
    pub request: Request,
    /// Bytes received after the head (a client that sent its first frame
    /// without waiting for the 101); handed on to the WebSocket.
    pub tail: Vec<u8>,
}

/// Why there is no head.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed or failed before sending anything: nobody to answer
    /// (port scanners, TCP health checks).
    Gone,
    /// Answer with this, then close.
    Refused(ApiError),
}

impl From<ApiError> for HeadError {
    fn from(refusal: ApiError) -> Self {
        HeadError::Refused(refusal)
    }
}

fn bad_request(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
}

fn uri_too_long() -> ApiError {
    ApiError::new(
        StatusCode::URI_TOO_LONG,
        "too_large",
        format!("the request target is longer than {MAX_REQUEST_TARGET_BYTES} bytes"),
    )
}

fn head_too_large(detail: String) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "too_large",
        detail,
    )
}

/// Where the request line's parts are, learned as bytes arrive.
#[derive(Debug, Default)]
struct Scan {
    /// Where the request target starts (after `METHOD `), once known.
    target_start: Option<usize>,
    /// Whether the request line is complete and was checked.
    line_checked: bool,
    /// Bytes already searched for a line end.
    searched: usize,
}

impl Scan {
    /// Checks what arrived so far; `Some(len)` once the head is complete.
    fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, ApiError> {
        let target_start = match self.target_start {
            Some(at) => at,
            None => match method_end(buf)? {
                Some(at) => {
                    self.target_start = Some(at + 1);
                    self.searched = at + 1;
                    at + 1
                }
                None => return Ok(None),
            },
        };
        let from = self.searched;
        self.searched = buf.len().saturating_sub(2).max(from);
        for i in from..buf.len() {
            if buf[i] != b'\n' {
                continue;
            }
            if !self.line_checked {
                self.line_checked = true;
                check_request_line(&buf[target_start..i])?;
            }
            match (buf.get(i + 1), buf.get(i + 2)) {
                (Some(b'\n'), _) => return Ok(Some(i + 2)),
                (Some(b'\r'), Some(b'\n')) => return Ok(Some(i + 3)),
                _ => {}
            }
        }
        if !self.line_checked
            && buf.len() - target_start > MAX_REQUEST_TARGET_BYTES + VERSION_SUFFIX_BYTES
        {
            return Err(uri_too_long());
        }
        Ok(None)
    }
}

/// The index of the space after the method, `None` while it may still come;
/// a refusal when the bytes cannot be an HTTP request (a TLS hello on the
/// plain port, binary noise).
fn method_end(buf: &[u8]) -> Result<Option<usize>, ApiError> {
    // RFC 9112: a server should ignore empty lines before the request line.
    let start = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buf.len());
    for (i, &b) in buf.iter().enumerate().skip(start) {
        if b == b' ' && i > start {
            return Ok(Some(i));
        }
        if !is_token_char(b) || i - start >= MAX_METHOD_BYTES {
            return Err(bad_request("not an HTTP request"));
        }
    }
    if start > MAX_METHOD_BYTES {
        return Err(bad_request("not an HTTP request"));
    }
    Ok(None)
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `line` is the request line after `METHOD `: `TARGET HTTP/1.1\r`.
fn check_request_line(line: &[u8]) -> Result<(), ApiError> {
    let target_len = line.iter().rposition(|&b| b == b' ').unwrap_or(line.len());
    if target_len > MAX_REQUEST_TARGET_BYTES {
        return Err(uri_too_long());
    }
    Ok(())
}

/// Reads one request head from `stream`, within [`MAX_HEAD_BYTES`],
/// [`MAX_REQUEST_TARGET_BYTES`] and [`MAX_HEADERS`].
pub async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Head, HeadError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut scan = Scan::default();
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(head_too_large(format!(
                    "the request head is longer than {MAX_HEAD_BYTES} bytes"
                ))
                .into());
            }
            let grown = (buf.capacity() * 2).clamp(FIRST_BUFFER_BYTES, MAX_HEAD_BYTES);
            buf.reserve_exact(grown - buf.len());
        }
        // Reads into the spare capacity only, so never past MAX_HEAD_BYTES
        // (give or take what the allocator rounded up to).
        let read = stream.read_buf(&mut buf).await;
        match read {
            Ok(0) | Err(_) if buf.is_empty() => return Err(HeadError::Gone),
            Ok(0) => {
                return Err(bad_request("the request ended before its head was complete").into())
            }
            Err(_) => return Err(HeadError::Gone),
            Ok(_) => {}
        }
        if let Some(end) = scan.advance(&buf)? {
            return parse(buf, end);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(head_too_large(format!(
                "the request head is longer than {MAX_HEAD_BYTES} bytes"
            ))
            .into());
        }
    }
}

fn parse(mut buf: Vec<u8>, end: usize) -> Result<Head, HeadError> {
    let parsed = Request::try_parse(&buf[..end]).map_err(|e| match e {
        WsError::Capacity(CapacityError::TooManyHeaders) => {
            head_too_large(format!("more than {MAX_HEADERS} header lines"))
        }
        WsError::Protocol(ProtocolError::WrongHttpMethod) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "a WebSocket upgrade is a GET request",
        ),
        WsError::Protocol(ProtocolError::WrongHttpVersion) => {
            bad_request("a WebSocket upgrade needs HTTP/1.1")
        }
        // The errors name what is wrong, never the bytes that were sent, so
        // a token in the request never reaches the answer or the log.
        other => bad_request(format!("malformed request head: {other}")),
    })?;
    let Some((len, request)) = parsed else {
        return Err(bad_request("malformed request head").into());
    };
    if request.headers().len() > MAX_HEADERS {
        return Err(head_too_large(format!("more than {MAX_HEADERS} header lines")).into());
    }
    let tail = buf.split_off(len);
    Ok(Head { request, tail })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one read at a time.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut chunk) = self.0.pop_front() {
                let n = chunk.len().min(out.remaining());
                out.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.0.push_front(chunk.split_off(n));
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    async fn read_chunks(chunks: &[&[u8]]) -> Result<Head, HeadError> {
        let mut stream = Chunks(chunks.iter().map(|c| c.to_vec()).collect());
        read(&mut stream).await
    }

    fn status(result: Result<Head, HeadError>) -> u16 {
        match result {
            Err(HeadError::Refused(r)) => r.status.as_u16(),
            Err(HeadError::Gone) => 0,
            Ok(_) => 101,
        }
    }

    const UPGRADE: &str = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                           Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    #[tokio::test]
    async fn a_head_in_one_piece_or_byte_by_byte() {
        let text = format!("GET /ws?token=abc HTTP/1.1\r\n{UPGRADE}\r\n");
        let head = read_chunks(&[text.as_bytes()]).await.unwrap();
        assert_eq!(head.request.uri(), "/ws?token=abc");
        assert!(head.tail.is_empty());
        let bytes: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        let head = read_chunks(&bytes).await.unwrap();
        assert_eq!(head.request.headers().len(), 5);

        let with_tail = format!("\r\nGET /ws HTTP/1.1\r\n{UPGRADE}\r\n\u{81}\u{0}");
        let head = read_chunks(&[with_tail.as_bytes()]).await.unwrap();
        assert_eq!(head.tail, "\u{81}\u{0}".as_bytes());
    }

    #[tokio::test]
    async fn bounds_and_garbage_get_their_status() {
        let long_target = format!("GET /ws?token={} HTTP/1.1\r\n", "a".repeat(9000));
        assert_eq!(status(read_chunks(&[long_target.as_bytes()]).await), 414);
        // Known to be too long before the line even ends.
        let unfinished = format!("GET /{}", "a".repeat(MAX_REQUEST_TARGET_BYTES + 20));
        assert_eq!(status(read_chunks(&[unfinished.as_bytes()]).await), 414);
        let just_fits = format!(
            "GET /{} HTTP/1.1\r\n{UPGRADE}\r\n",
            "a".repeat(MAX_REQUEST_TARGET_BYTES - 1)
        );
        assert_eq!(status(read_chunks(&[just_fits.as_bytes()]).await), 101);

        let big_header = format!(
            "GET /ws HTTP/1.1\r\nCookie: {}\r\n{UPGRADE}\r\n",
            "c".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(status(read_chunks(&[big_header.as_bytes()]).await), 431);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        let many = format!("GET /ws HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status(read_chunks(&[many.as_bytes()]).await), 431);
        let too_many: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
        let too_many = format!("GET /ws HTTP/1.1\r\n{too_many}\r\n");
        assert_eq!(status(read_chunks(&[too_many.as_bytes()]).await), 431);

        assert_eq!(
            status(read_chunks(&[b"POST /ws HTTP/1.1\r\n\r\n"]).await),
            405
        );
        assert_eq!(status(read_chunks(&[b"\x16\x03\x01\x02\x00"]).await), 400);
        assert_eq!(
            status(read_chunks(&[b"GET /ws HTTP/1.1\r\nBad\r\n\r\n"]).await),
            400
        );
        assert_eq!(
            status(read_chunks(&[b"GET /ws HTTP/1.0\r\n\r\n"]).await),
            400
        );
        assert_eq!(status(read_chunks(&[b"GET /ws HT"]).await), 400);
        assert_eq!(status(read_chunks(&[]).await), 0);
    }
}
