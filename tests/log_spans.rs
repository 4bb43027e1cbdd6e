//! What the side port logs carries its spans: a handler's lines name the
//! request (method, declared route), a connection's lines name the peer.
//!
//! A test binary of its own, its tests one at a time: tracing caches per
//! call site whether anyone listens, and a call site first reached on
//! another test's thread (no subscriber there) while this test installs
//! its own can stay cached as unheard; here nothing else runs meanwhile.

mod common;

use std::time::Duration;

use common::{in_process::App, log_capture::CapturedLog, *};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream};

/// One test at a time (see the module comment).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn what_a_handler_logs_names_its_request_by_route_never_by_raw_path() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (log, _capturing) = CapturedLog::start();
    let app = App::new(|c| c.http.api_keys = vec!["key".into()]).await;
    let reply = app
        .call(
            "POST",
            "/api/notifications/send?token=never-logged",
            &[("authorization", "Bearer key")],
            r#"{"user_id":1,"payload":1}"#,
        )
        .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let refused = log
        .line_with("send refused: broker unavailable")
        .expect("the refusal is logged");
    assert!(
        refused.contains("request{method=POST route=/api/notifications/send}"),
        "{refused}"
    );
    assert!(!refused.contains("never-logged"), "{refused}");
}

#[tokio::test]
async fn a_timed_out_head_is_logged_in_its_connection_span_naming_the_peer() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (log, _capturing) = CapturedLog::start();
    let bridge = Bridge::start_with(|c| c.http.request_timeout = Duration::from_secs(1)).await;
    let mut stream = TcpStream::connect(bridge.running().http_addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let peer = stream.local_addr().unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
    assert!(closed.await.is_ok(), "the half-sent head is closed");
    let line = log
        .line_with("did not arrive within http.request_timeout")
        .expect("the timed-out head is logged");
    assert!(
        line.contains(&format!("http_connection{{remote_addr={peer}}}")),
        "{line}"
    );
    bridge.stop().await;
}
