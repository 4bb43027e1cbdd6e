//! Hostile clients: authentication attacks and handshake abuse (issue 6).
//!
//! Already proven in tests/handshake.rs and not repeated here: `alg: none`
//! (query and header), expired tokens at connect and the 30 s leeway, other
//! secrets, garbage tokens, a missing `exp` (`every_bad_token_is_refused_with_401`);
//! a token for another user on a compatibility path
//! (`compatibility_paths_must_name_the_token_user`); a token that expires
//! mid-connection, closed with 1008
//! (`a_connection_is_closed_with_1008_when_its_token_expires`); the global
//! and per-user limits with one connection.
//!
//! Here: algorithm confusion (an RSA public key used as an HMAC secret),
//! `aud`/`iss`, tokens in the log, oversized request heads and targets,
//! slowloris, floods over the connection limits, sockets that never send,
//! running out of file descriptors, and resident memory under a flood.

mod common;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use common::{daemon::*, *};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite;

fn ws_query(bridge: &Bridge, token: &str) -> tungstenite::http::Request<()> {
    request(&bridge.ws_url(&format!("/ws?token={token}")), &[])
}

// ---------------------------------------------------------------------------
// Authentication attacks
// ---------------------------------------------------------------------------

/// A fresh RSA key pair from `openssl`: (private PEM, public PEM path).
fn rsa_key_pair(dir: &Path) -> (Vec<u8>, std::path::PathBuf) {
    let private = dir.join("rsa-private.pem");
    let public = dir.join("rsa-public.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed (it makes the test key pair)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genrsa",
        "-traditional",
        "-out",
        private.to_str().unwrap(),
        "2048",
    ]);
    run(&[
        "rsa",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(&private).unwrap(), public)
}

fn sign(alg: jsonwebtoken::Algorithm, key: &jsonwebtoken::EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).unwrap()
}

#[tokio::test]
async fn an_rsa_public_key_used_as_an_hmac_secret_is_refused() {
    let dir = TempDir::new();
    let (private_pem, public_path) = rsa_key_pair(dir.path());
    let public_pem = std::fs::read(&public_path).unwrap();
    let claims = json!({"sub": "1", "exp": unix_now() + 3600});
    let rs256 = sign(
        jsonwebtoken::Algorithm::RS256,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private_pem).unwrap(),
        &claims,
    );
    // The attacker knows the public key: HS256 with its bytes as the secret,
    // exactly as the file holds them, and without the final newline.
    let mut confused = vec![];
    for secret in [&public_pem[..], public_pem.trim_ascii_end()] {
        for alg in [
            jsonwebtoken::Algorithm::HS256,
            jsonwebtoken::Algorithm::HS512,
        ] {
            let key = jsonwebtoken::EncodingKey::from_secret(secret);
            confused.push(sign(alg, &key, &claims));
        }
    }
    // An ES256 header over the RSA key's own signature: another family.
    let parts: Vec<&str> = rs256.split('.').collect();
    let es256 = format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"ES256","typ":"JWT"}"#),
        parts[1],
        parts[2]
    );

    for with_secret in [false, true] {
        let bridge = Bridge::start_with(|c| {
            c.auth.jwt_public_key_file = Some(public_path.clone());
            if !with_secret {
                c.auth.jwt_secret = None;
            }
        })
        .await;
        // The key works: a real RS256 token is accepted.
        let (_, _, welcome) = accepted(ws_query(&bridge, &rs256)).await;
        assert_eq!(welcome["user_id"], "1");

        for token in &confused {
            let detail = assert_token_refused(&bridge, token).await;
            if with_secret {
                // Checked against jwt_secret, never against the PEM.
                assert!(detail.contains("signature"), "{detail}");
            } else {
                assert!(detail.contains("not accepted"), "{detail}");
            }
        }
        let detail = assert_refused(ws_query(&bridge, &es256), 401, "unauthorized").await;
        assert!(detail.contains("algorithm"), "{detail}");
        // HS256 signed with the configured secret still works next to the key.
        let hs = ws_query(&bridge, &token("2", &[]));
        if with_secret {
            let (_, _, welcome) = accepted(hs).await;
            assert_eq!(welcome["user_id"], "2");
        } else {
            assert_refused(hs, 401, "unauthorized").await;
        }
        bridge.stop().await;
    }
}

#[tokio::test]
async fn audience_and_issuer_are_enforced_when_configured() {
    const AUD: &str = "notify-bridge";
    const ISS: &str = "https://login.example";
    let bridge = Bridge::start_with(|c| {
        c.auth.audience = Some(AUD.into());
        c.auth.issuer = Some(ISS.into());
    })
    .await;
    let exp = unix_now() + 3600;
    let with = |claims: Value| ws_query(&bridge, &token_with_claims(claims));

    let (_, _, welcome) = accepted(with(
        json!({"sub": "1", "exp": exp, "aud": AUD, "iss": ISS}),
    ))
    .await;
    assert_eq!(welcome["user_id"], "1");
    // An audience list that includes ours.
    let (_, _, _) = accepted(with(
        json!({"sub": "1", "exp": exp, "aud": ["other", AUD], "iss": ISS}),
    ))
    .await;

    let cases = [
        (
            json!({"sub": "1", "exp": exp, "aud": "other", "iss": ISS}),
            "audience",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": ["a", "b"], "iss": ISS}),
            "audience",
        ),
        (
            json!({"sub": "1", "exp": exp, "aud": AUD, "iss": "https://evil.example"}),
            "issuer",
        ),
        // Missing claims must not slip through (jsonwebtoken only checks
        // claims that are present unless told they are required).
        (json!({"sub": "1", "exp": exp, "iss": ISS}), "`aud`"),
        (json!({"sub": "1", "exp": exp, "aud": AUD}), "`iss`"),
    ];
    for (claims, needle) in cases {
        let detail = assert_refused(with(claims.clone()), 401, "unauthorized").await;
        assert!(detail.contains(needle), "{claims}: {detail}");
    }
    // Minted tokens (the `token` command) carry both and are accepted.
    let minted =
        notify_bridge::auth::mint(&bridge.config.auth, "3", &[], Duration::from_secs(60)).unwrap();
    let (_, _, welcome) = accepted(ws_query(&bridge, &minted)).await;
    assert_eq!(welcome["user_id"], "3");
    bridge.stop().await;
}

// ---------------------------------------------------------------------------
// Tokens never appear in the log
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tokens_never_appear_in_the_log() {
    const API_KEY: &str = "api-key-secret-5b1f0a7c9d";
    let daemon = Daemon::start(&[
        // Everything the bridge and its libraries log (lapin stays off
        // unless named, see main.rs).
        ("RUST_LOG", "trace"),
        ("NOTIFY_BRIDGE_HTTP__API_KEYS", API_KEY),
        ("NOTIFY_BRIDGE_INBOX__ENABLED", "true"),
    ])
    .await;
    let ws = |path: &str| format!("ws://{}{path}", daemon.ws_addr);

    let valid = token("1", &[]);
    let expired = token_with_claims(json!({"sub": "1", "exp": unix_now() - 3600}));
    let mut other = test_config().auth;
    other.jwt_secret = Some("some-other-secret-0123456789".into());
    let forged = notify_bridge::auth::mint(&other, "1", &[], Duration::from_secs(3600)).unwrap();
    let garbage = format!("garbage-{}", uuid::Uuid::now_v7().simple());
    let tokens = [&valid, &expired, &forged, &garbage];

    for t in tokens {
        let header = format!("Bearer {t}");
        let protocol = format!("bearer, {t}");
        let requests = [
            request(&ws(&format!("/ws?token={t}")), &[]),
            request(&ws(&format!("/ws/notifications/1/?token={t}")), &[]),
            // The wrong user on a compatibility path: a 403 that names users.
            request(&ws(&format!("/ws/2?token={t}")), &[]),
            // An older client with its token in the path.
            request(&ws(&format!("/ws/{t}?token={t}")), &[]),
            request(
                &ws(&format!("/ws/notifications/{t}/")),
                &[("authorization", &header)],
            ),
            request(&ws("/ws"), &[("authorization", &header)]),
            request(&ws("/ws"), &[("sec-websocket-protocol", &protocol)]),
            request(&ws(&format!("/ws?token={t}&channel=secret")), &[]),
            request(&ws(&format!("/ws?token={t}&since=x")), &[]),
        ];
        for r in requests {
            if let Ok((mut client, _)) = tokio_tungstenite::connect_async(r).await {
                assert_eq!(next_json(&mut client).await["type"], "welcome");
                let _ = futures_util::SinkExt::close(&mut client).await;
            }
        }
        // Refused before any token check: oversized, overlong, not a GET.
        let big = format!(
            "GET /ws?token={t} HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(20_000)
        );
        raw_exchange(daemon.ws_addr, big.as_bytes()).await;
        let long = format!(
            "GET /ws?token={t}&pad={} HTTP/1.1\r\n\r\n",
            "p".repeat(9000)
        );
        raw_exchange(daemon.ws_addr, long.as_bytes()).await;
        let post = format!("POST /ws?token={t} HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n");
        raw_exchange(daemon.ws_addr, post.as_bytes()).await;

        // The side port: the user's JWT where it belongs and where it does not.
        for path in [
            "/api/me/notifications",
            "/api/notifications/send",
            "/api/connections",
        ] {
            let method = if path == "/api/me/notifications" {
                "GET"
            } else {
                "POST"
            };
            let body = if method == "POST" {
                r#"{"user_id":1,"payload":1}"#
            } else {
                ""
            };
            http_request(
                daemon.http_addr,
                method,
                path,
                &[("Authorization", &header)],
                body,
            )
            .await;
            http_request(
                daemon.http_addr,
                "GET",
                &format!("{path}?token={t}"),
                &[("Authorization", &format!("Token {t}"))],
                "",
            )
            .await;
        }
        http_request(daemon.http_addr, "GET", &format!("/?token={t}"), &[], "").await;
    }
    let key_header = format!("Bearer {API_KEY}");
    let sent = http_request(
        daemon.http_addr,
        "POST",
        "/api/notifications/send",
        &[("Authorization", &key_header)],
        r#"{"user_id":1,"payload":1}"#,
    )
    .await;
    assert_eq!(sent.status, 202, "{}", sent.body);

    let log = daemon.terminate().await;
    // The log is there and detailed: refusals were logged at debug level.
    assert!(log.contains("handshake refused"), "{log}");
    assert!(log.contains("status=401"), "{log}");
    assert!(
        log.contains("status=431") && log.contains("status=414"),
        "{log}"
    );
    for t in tokens {
        let mut secrets = vec![t.as_str()];
        // Each part of a JWT identifies it; the signature above all.
        secrets.extend(t.split('.').filter(|part| part.len() >= 16));
        for secret in secrets {
            assert!(
                !log.contains(secret),
                "{secret:?} of token {t} is in the log:\n{}",
                log.lines()
                    .filter(|l| l.contains(secret))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert!(!log.contains(API_KEY), "the API key is in the log");
}

// ---------------------------------------------------------------------------
// Oversized heads and targets
// ---------------------------------------------------------------------------

/// An HTTP answer read off a raw socket.
struct RawReply {
    status: u16,
    head: String,
    body: String,
    elapsed: Duration,
}

impl RawReply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}\r\n\r\n{}", self.head, self.body);
        let body = self.json();
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
        let length = self
            .head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("a Content-Length");
        assert_eq!(length.parse::<usize>().unwrap(), self.body.len());
    }
}

/// Sends `bytes` and a FIN (concurrently with reading, as a real client
/// would) and reads the answer until the server closes (or, for a 101,
/// until the end of its head). Status 0: closed without an answer.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let bytes = bytes.to_vec();
    let writing = tokio::spawn(async move {
        // The server may close before taking everything: not our concern.
        let _ = writer.write_all(&bytes).await;
        // Then the client's FIN: nothing more is coming.
        let _ = writer.shutdown().await;
        writer
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            // An accepted upgrade stays open: its head is the whole answer.
            if raw.starts_with(b"HTTP/1.1 101") && raw.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer and no close within {WAIT:?}");
    let elapsed = started.elapsed();
    drop(writing.await);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawReply {
        status,
        head: head.to_string(),
        body: body.to_string(),
        elapsed,
    }
}

fn upgrade_head(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn oversized_heads_and_targets_get_414_and_431() {
    use notify_bridge::ws::request_head::{MAX_HEADERS, MAX_HEAD_BYTES, MAX_REQUEST_TARGET_BYTES};
    // A long timeout: every answer below must come from the bounds, not it.
    let bridge =
        Bridge::start_with(|c| c.websocket.handshake_timeout = Duration::from_secs(30)).await;
    let addr = bridge.running().ws_addr;
    let t = token("1", &[]);

    // The target: up to the bound is fine, one byte more is 414.
    let base = format!("/ws?token={t}&pad=");
    let fits = format!(
        "{base}{}",
        "a".repeat(MAX_REQUEST_TARGET_BYTES - base.len())
    );
    let reply = raw_exchange(addr, upgrade_head(&fits, "").as_bytes()).await;
    assert_eq!(reply.status, 101, "{}", reply.head);
    let over = format!("{fits}a");
    let reply = raw_exchange(addr, upgrade_head(&over, "").as_bytes()).await;
    reply.assert_error(414, "too_large");
    assert!(reply.json()["detail"].as_str().unwrap().contains("8192"));
    // A request line that never ends is refused as soon as it is too long.
    let endless = format!("GET /ws?pad={}", "a".repeat(100_000));
    raw_exchange(addr, endless.as_bytes())
        .await
        .assert_error(414, "too_large");

    // The head: 16 KiB in all, at most 100 header lines.
    let cookie = |n: usize| format!("Cookie: {}\r\n", "c".repeat(n));
    let head = |extra: &str| upgrade_head(&format!("/ws?token={t}"), extra);
    let room = MAX_HEAD_BYTES - head("").len() - cookie(0).len();
    let reply = raw_exchange(addr, head(&cookie(room)).as_bytes()).await;
    assert_eq!(
        reply.status, 101,
        "exactly {MAX_HEAD_BYTES} bytes: {}",
        reply.head
    );
    let reply = raw_exchange(addr, head(&cookie(room + 1)).as_bytes()).await;
    reply.assert_error(431, "too_large");
    // Far more than the bound, sent while we read: the answer still arrives.
    let reply = raw_exchange(addr, head(&cookie(1 << 20)).as_bytes()).await;
    reply.assert_error(431, "too_large");
    assert!(
        reply.elapsed < Duration::from_secs(3),
        "{:?}",
        reply.elapsed
    );
    let lines = |n: usize| (0..n).map(|i| format!("X-{i}: y\r\n")).collect::<String>();
    // The upgrade itself has 5 header lines.
    let reply = raw_exchange(addr, head(&lines(MAX_HEADERS - 5)).as_bytes()).await;
    assert_eq!(reply.status, 101, "{} headers: {}", MAX_HEADERS, reply.head);
    raw_exchange(addr, head(&lines(MAX_HEADERS - 4)).as_bytes())
        .await
        .assert_error(431, "too_large");
    raw_exchange(addr, head(&lines(1000)).as_bytes())
        .await
        .assert_error(431, "too_large");

    // A real client library sees the status too.
    let huge = "h".repeat(20_000);
    let detail = assert_refused(
        request(
            &bridge.ws_url(&format!("/ws?token={t}")),
            &[("x-huge", &huge)],
        ),
        431,
        "too_large",
    )
    .await;
    assert!(detail.contains("16384"), "{detail}");

    // Not HTTP, not a GET, not an upgrade: clear errors, at once.
    let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    raw_exchange(addr, tls_hello)
        .await
        .assert_error(400, "bad_request");
    let reply = raw_exchange(addr, b"POST /ws HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    reply.assert_error(405, "method_not_allowed");
    assert!(reply.head.contains("Allow: GET"), "{}", reply.head);
    raw_exchange(addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .assert_error(400, "bad_request");
    raw_exchange(addr, b"GET /ws HTTP/1.1\r\nno colon here\r\n\r\n")
        .await
        .assert_error(400, "bad_request");
    raw_exchange(addr, b"GET /ws HTTP/1.0\r\n\r\n")
        .await
        .assert_error(400, "bad_request");
    // Half a request, then the client's FIN.
    raw_exchange(addr, b"GET /ws HTT")
        .await
        .assert_error(400, "bad_request");

    // Nothing else was lost: a normal client connects and gets its message.
    let mut client = bridge.connect("1").await;
    let publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, r#"{"user_id":1,"id":"after","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut client).await["id"], "after");
    bridge.stop().await;
}

// ---------------------------------------------------------------------------
// Slowloris, floods, sockets that never send
// ---------------------------------------------------------------------------

/// Waits until the server closes `stream` (EOF or reset); what it sent.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|_| got)
}

#[tokio::test]
async fn slowloris_handshakes_time_out_while_others_connect() {
    const SLOW: usize = 200;
    let timeout = Duration::from_secs(2);
    let bridge = Bridge::start_with(|c| c.websocket.handshake_timeout = timeout).await;
    let addr = bridge.running().ws_addr;
    let t = token("slow", &[]);

    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let t = t.clone();
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            // A valid request, one byte every 100 ms: it would take minutes.
            let request = upgrade_head(&format!("/ws?token={t}"), "");
            let bytes = request.into_bytes();
            let (mut reader, mut writer) = stream.split();
            let trickle = async {
                for b in &bytes {
                    if writer.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                std::future::pending::<()>().await;
            };
            let mut sink = [0u8; 256];
            let closed = async {
                if let Ok(n) = reader.read(&mut sink).await {
                    assert_eq!(n, 0, "a slow client got an answer");
                }
            };
            tokio::select! {
                _ = trickle => unreachable!(),
                _ = closed => {}
                _ = tokio::time::sleep(Duration::from_secs(8)) => panic!("never closed"),
            }
            started.elapsed()
        }));
    }
    // Meanwhile a normal client connects at once and gets its messages.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut normal = bridge.connect("normal").await;
    let connect_took = started.elapsed();
    let publisher = Publisher::connect().await;
    bridge
        .publish(&publisher, r#"{"user_id":"normal","id":"n1","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut normal).await["id"], "n1");

    let mut closed_after = Vec::new();
    for task in slow {
        closed_after.push(task.await.unwrap());
    }
    closed_after.sort();
    let (first, last) = (closed_after[0], closed_after[SLOW - 1]);
    eprintln!(
        "slowloris: {SLOW} closed after {first:?}..{last:?} (timeout {timeout:?}); \
         a normal client connected in {connect_took:?}"
    );
    assert!(first >= timeout - Duration::from_millis(100), "{first:?}");
    assert!(last <= timeout + Duration::from_millis(1500), "{last:?}");
    assert!(connect_took < Duration::from_secs(1), "{connect_took:?}");
    // The normal client is still served after all of that.
    bridge
        .publish(&publisher, r#"{"user_id":"normal","id":"n2","payload":1}"#)
        .await;
    assert_eq!(next_json(&mut normal).await["id"], "n2");
    bridge.stop().await;
}

#[tokio::test]
async fn a_flood_over_the_limits_gets_503_and_places_come_back() {
    const MAX: usize = 200;
    let bridge = Bridge::start_with(|c| {
        c.websocket.max_connections = MAX;
        c.websocket.max_connections_per_user = 2;
    })
    .await;
    let metrics = bridge.running().metrics.clone();

    // 200 sessions, two per user, opened 50 at a time.
    let mut open = Vec::new();
    for batch in 0..(MAX / 50) {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let url = bridge.ws_url(&format!(
                    "/ws?token={}",
                    token(&format!("u{}", (batch * 50 + i) / 2), &[])
                ));
                tokio::spawn(async move { accepted(request(&url, &[])).await.0 })
            })
            .collect();
        for task in tasks {
            open.push(task.await.unwrap());
        }
        if batch == 0 {
            // A third connection of one user: the per-user limit (checked
            // while there is room under the global one).
            let detail = assert_refused(
                request(
                    &bridge.ws_url(&format!("/ws?token={}", token("u0", &[]))),
                    &[],
                ),
                503,
                "unavailable",
            )
            .await;
            assert!(detail.contains("max_connections_per_user"), "{detail}");
        }
    }
    assert_eq!(metrics.connections.get(), MAX as i64);

    // 300 more, all at once, from new users: the global limit, every one.
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let url = bridge.ws_url(&format!("/ws?token={}", token(&format!("x{i}"), &[])));
            tokio::spawn(async move { refused(request(&url, &[])).await })
        })
        .collect();
    let mut global = 0;
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "unavailable", "{body}");
        global += 1;
    }
    assert_eq!(global, 300);
    assert_eq!(metrics.connections.get(), MAX as i64);

    // 20 leave (half with a close frame, half by dropping TCP): 20 places.
    for (i, mut client) in open.drain(..20).enumerate() {
        if i % 2 == 0 {
            let _ = futures_util::SinkExt::close(&mut client).await;
        }
        drop(client);
    }
    for i in 0..20 {
        open.push(bridge.connect_when_released(&format!("y{i}")).await);
    }
    assert_refused(
        request(
            &bridge.ws_url(&format!("/ws?token={}", token("z", &[]))),
            &[],
        ),
        503,
        "unavailable",
    )
    .await;
    assert_eq!(metrics.connections.get(), MAX as i64);
    drop(open);
    let metrics2 = metrics.clone();
    eventually(Duration::from_secs(5), "every place released", move || {
        metrics2.connections.get() == 0
    })
    .await;
    bridge.stop().await;
}

#[tokio::test]
async fn sockets_that_never_send_are_capped_and_timed_out() {
    use notify_bridge::ws::limits::MIN_PENDING_HANDSHAKES;
    const IDLE: usize = 500;
    let timeout = Duration::from_secs(2);
    // max_connections 200: at most 200 handshakes in progress at once.
    let pending_cap = 200usize.max(MIN_PENDING_HANDSHAKES);
    let bridge = Bridge::start_with(|c| {
        c.websocket.max_connections = 200;
        c.websocket.handshake_timeout = timeout;
    })
    .await;
    let addr = bridge.running().ws_addr;

    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let tasks: Vec<_> = idle
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let got = until_closed(&mut s, Duration::from_secs(8)).await;
                (got.expect("closed in time"), started.elapsed())
            })
        })
        .collect();
    let (mut answered, mut timed_out) = (0, 0);
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let (got, after) = task.await.unwrap();
        if got.is_empty() {
            // Held a handshake place until the timeout, then closed.
            assert!(after >= timeout - Duration::from_millis(100), "{after:?}");
            timed_out += 1;
        } else {
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 503"), "{text}");
            assert!(text.contains(r#""error":"unavailable""#), "{text}");
            answered += 1;
        }
        slowest = slowest.max(after);
    }
    eprintln!(
        "{IDLE} idle sockets: {timed_out} held a place and timed out, {answered} got 503 at once; \
         the last closed after {slowest:?}"
    );
    assert_eq!(timed_out, pending_cap);
    assert_eq!(answered, IDLE - pending_cap);
    assert!(
        slowest <= timeout + Duration::from_millis(1500),
        "{slowest:?}"
    );
    // Their places are free again.
    let (_c, _, _) = accepted(request(
        &bridge.ws_url(&format!("/ws?token={}", token("1", &[]))),
        &[],
    ))
    .await;
    bridge.stop().await;
}

// ---------------------------------------------------------------------------
// The real binary: memory under a flood, running out of file descriptors
// ---------------------------------------------------------------------------

/// Samples the daemon's RSS every 20 ms until told to stop; the peak.
fn sample_peak_rss(
    daemon: &Daemon,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<u64>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let pid = daemon.pid();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            if let Ok(bytes) = testkit::proc::rss_bytes(testkit::proc::Pid::Of(pid)) {
                peak = peak.max(bytes / 1024);
            }
            tokio::select! {
                _ = &mut stopped => return peak,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    (stop, task)
}

#[tokio::test]
async fn memory_stays_bounded_under_a_connection_flood() {
    const MAX: usize = 200;
    const FLOOD: usize = 3000;
    let daemon = Daemon::start(&[
        ("NOTIFY_BRIDGE_WEBSOCKET__MAX_CONNECTIONS", "200"),
        ("NOTIFY_BRIDGE_WEBSOCKET__HANDSHAKE_TIMEOUT", "1s"),
    ])
    .await;
    let addr = daemon.ws_addr;
    // Warm up (first connections allocate the runtime's buffers), then the
    // baseline.
    drop(daemon.connect("warm").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = daemon.rss_kib();
    let baseline_fds = daemon.open_fds();
    let (stop_sampling, peak) = sample_peak_rss(&daemon);

    // Twice: a leak would show as growth from one round to the next, where
    // memory the allocator merely keeps does not.
    let mut after = Vec::new();
    for round in 0..2 {
        // The limit, filled, 50 at a time.
        let mut sessions = Vec::new();
        for batch in 0..(MAX / 50) {
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    let user = format!("s{round}-{batch}-{i}");
                    let url = format!("ws://{addr}/ws?token={}", token(&user, &[]));
                    tokio::spawn(async move { accepted(request(&url, &[])).await.0 })
                })
                .collect();
            for task in tasks {
                sessions.push(task.await.unwrap());
            }
        }
        // The flood: half complete upgrades with valid tokens, half sockets
        // that never send; at most 300 at a time (more overflows the
        // kernel's accept queue of 1,024 on a loaded machine, and then the
        // kernel, not the bridge, keeps idle sockets waiting for seconds).
        let started = Instant::now();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(300));
        let mut tasks = Vec::new();
        for n in 0..FLOOD {
            let slot = in_flight.clone().acquire_owned().await.unwrap();
            let url = format!("ws://{addr}/ws?token={}", token(&format!("f{n}"), &[]));
            tasks.push(tokio::spawn(async move {
                let _slot = slot;
                if n % 2 == 0 {
                    match tokio_tungstenite::connect_async(url).await {
                        Ok(_) => "accepted".to_string(),
                        Err(tungstenite::Error::Http(r)) => {
                            format!("HTTP {}", r.status().as_u16())
                        }
                        // Closed without an answer: the request came later
                        // than the handshake timeout (a loaded machine).
                        Err(tungstenite::Error::Protocol(
                            tungstenite::error::ProtocolError::HandshakeIncomplete,
                        )) => "closed by the timeout".to_string(),
                        Err(e) => format!("error {e}"),
                    }
                } else {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    match until_closed(&mut s, Duration::from_secs(15)).await {
                        Some(got) if got.starts_with(b"HTTP/1.1 503") => "idle: 503".into(),
                        Some(got) if got.is_empty() => "idle: timed out".into(),
                        other => format!("idle: {other:?}"),
                    }
                }
            }));
        }
        let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
        for task in tasks {
            *outcomes.entry(task.await.unwrap()).or_default() += 1;
        }
        let flood_took = started.elapsed();
        drop(sessions);
        // Every socket closed on the daemon's side too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while daemon.open_fds() > baseline_fds + 5 {
            assert!(
                Instant::now() < deadline,
                "{} fds still open",
                daemon.open_fds()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        after.push(daemon.rss_kib());
        eprintln!(
            "round {round}: flood of {FLOOD} over {MAX} sessions in {flood_took:?}: {outcomes:?}; \
             RSS after {} KiB",
            after[round]
        );
        // Nobody over the limit got in; the upgrades got a 503 (or, late,
        // the timeout), every idle socket a 503 or the timeout.
        let count = |k: &str| outcomes.get(k).copied().unwrap_or(0);
        assert_eq!(
            count("HTTP 503") + count("closed by the timeout"),
            FLOOD / 2,
            "{outcomes:?}"
        );
        assert!(count("HTTP 503") >= FLOOD / 4, "{outcomes:?}");
        assert_eq!(
            count("idle: 503") + count("idle: timed out"),
            FLOOD / 2,
            "{outcomes:?}"
        );
    }
    let _ = stop_sampling.send(());
    let peak = peak.await.unwrap();
    eprintln!("RSS baseline {baseline} KiB, peak {peak} KiB, after {after:?} KiB");
    assert!(
        peak < baseline + 16 * 1024,
        "peak {peak} KiB, baseline {baseline} KiB"
    );
    assert!(
        after[0] < baseline + 8 * 1024,
        "after {after:?} KiB, baseline {baseline} KiB"
    );
    assert!(
        after[1] < after[0] + 2 * 1024,
        "grew from round to round: {after:?} KiB"
    );

    // Still serving.
    let mut client = daemon.connect("after").await;
    let publisher = Publisher::connect().await;
    publisher
        .publish(
            &daemon.place.exchange,
            r#"{"user_id":"after","id":"a1","payload":1}"#,
            Default::default(),
        )
        .await;
    assert_eq!(next_json(&mut client).await["id"], "a1");
    drop(client);
    daemon.cleanup().await;
}

#[tokio::test]
async fn the_accept_loop_survives_running_out_of_file_descriptors() {
    let daemon = Daemon::start(&[]).await;
    // The readiness probes' connections are closed by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Room for 30 more descriptors, then EMFILE.
    daemon.limit_open_files(30);

    let mut sessions = Vec::new();
    for i in 0..30 {
        sessions.push(daemon.connect(&format!("s{i}")).await);
    }
    // 20 more: the kernel completes their TCP handshakes, the daemon cannot
    // accept them yet.
    let addr = daemon.ws_addr;
    let waiting: Vec<_> = (0..20)
        .map(|i| {
            let url = format!("ws://{addr}/ws?token={}", token(&format!("w{i}"), &[]));
            tokio::spawn(async move {
                let (mut client, _) = tokio::time::timeout(
                    Duration::from_secs(15),
                    tokio_tungstenite::connect_async(url),
                )
                .await
                .expect("accepted once descriptors are free")
                .expect("handshake");
                assert_eq!(next_json(&mut client).await["type"], "welcome");
                client
            })
        })
        .collect();
    daemon
        .assert_accept_backs_off("accept failed", &waiting)
        .await;

    // Descriptors come back: the waiting clients get in.
    sessions.truncate(5);
    for task in waiting {
        sessions.push(task.await.unwrap());
    }
    assert_eq!(sessions.len(), 25);
    drop(sessions);
    daemon.cleanup().await;
}
