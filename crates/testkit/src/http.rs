//! The one HTTP client of the tests and the bench: hyper's HTTP/1.1
//! client connection, so answers (chunked bodies, Content-Length) are
//! framed by a well-kept implementation, not by hand in each caller.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{http, Request};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// One request over `io`, the answer's head and whole body; the
/// connection is dropped after it.
pub async fn exchange<S>(
    io: S,
    request: Request<String>,
) -> hyper::Result<(http::response::Parts, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(connection);
    let answer = async {
        let response = sender
            .send_request(request.map(|b| Full::new(Bytes::from(b))))
            .await?;
        let (parts, body) = response.into_parts();
        Ok((parts, body.collect().await?.to_bytes()))
    }
    .await;
    driver.abort();
    answer
}

/// A GET over a fresh TCP connection: the status and the body as text.
pub async fn get(
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
    let request = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(String::new())?;
    let (parts, body) = exchange(TcpStream::connect(addr).await?, request).await?;
    Ok((
        parts.status.as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}
