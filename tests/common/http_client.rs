//! The tests' one HTTP client: hyper's HTTP/1.1 client connection over a
//! fresh TCP (or TLS) stream, so requests and answers (chunked bodies,
//! headers, Content-Length) are framed by a well-kept implementation rather
//! than by hand in each test file. Raw TCP stays only where a test needs a
//! malformed, partial or held request (tests/http_limits.rs,
//! tests/hostile.rs, tests/handshake.rs).

use std::net::SocketAddr;

use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::http;

use super::WAIT;

/// An HTTP answer: status, headers (lower-cased names) and body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The answer of a response's head and collected body (over a socket
    /// or from the router in-process, tests/common/in_process.rs).
    pub fn from_parts(parts: &http::response::Parts, body: &[u8]) -> Self {
        Self {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into(),
                    )
                })
                .collect(),
            body: String::from_utf8(body.to_vec()).expect("a UTF-8 body"),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the contract's error shape: this status, this code, a detail.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let body = self.json();
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
}

/// A request to `addr`: `Host` set, `headers` added in order, and `body`
/// (hyper adds its Content-Length, also `0` on an empty POST/PATCH/PUT).
pub fn build(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Request<String> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(body.to_string())
        .unwrap_or_else(|e| panic!("a valid request {method} {path}: {e}"))
}

/// One request over `io` (testkit's hyper client), the answer read whole.
pub async fn exchange<S>(io: S, request: http::Request<String>) -> hyper::Result<HttpReply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (parts, body) = testkit::http::exchange(io, request).await?;
    Ok(HttpReply::from_parts(&parts, &body))
}

/// One request over a fresh TCP connection, within [`WAIT`].
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    let request = build(addr, method, path, headers, body);
    let answer = async {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the side port");
        exchange(stream, request).await
    };
    tokio::time::timeout(WAIT, answer)
        .await
        .expect("HTTP response in time")
        .unwrap_or_else(|e| panic!("HTTP {method} {path} to {addr}: {e}"))
}

/// A GET without headers: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let reply = http_request(addr, "GET", path, &[], "").await;
    (reply.status, reply.body)
}
