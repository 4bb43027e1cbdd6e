//! Test harness: a real bridge on port 0 against the real broker started by
//! `scripts/rabbitmq` (URL in NOTIFY_BRIDGE_TEST_AMQP_URL), WebSocket
//! clients, and an AMQP publisher with confirms.
//!
//! Every bridge gets its own exchange and queue, so tests running in
//! parallel never see each other's messages.

#![allow(dead_code)]

use std::time::Duration;

pub mod daemon;
pub mod http_client;
pub mod in_process;
pub mod inbox;
pub mod lines;
pub mod log_capture;
pub mod receipts;
pub mod scripts;
pub mod tls;

// Each test binary uses some of these (the glob `use common::*`).
#[allow(unused_imports)]
pub use http_client::{http_get, http_request, HttpReply};

use futures_util::{SinkExt, StreamExt};
use lapin::{
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
    },
    BasicProperties, Connection, ConnectionProperties,
};
use notify_bridge::{
    config::{AuthMode, Config},
    Running,
};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http, Message},
    MaybeTlsStream, WebSocketStream,
};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(10);

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn amqp_url() -> String {
    std::env::var("NOTIFY_BRIDGE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid::Uuid::now_v7().simple())
}

/// A configuration for one isolated test bridge.
pub fn test_config() -> Config {
    let mut config = Config::default();
    let name = unique("test");
    config.amqp.url = amqp_url();
    config.amqp.exchange = format!("{name}.exchange");
    config.amqp.queue = format!("notify-bridge.{name}");
    config.websocket.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.auth.mode = AuthMode::Jwt;
    config.auth.jwt_secret = Some(SECRET.into());
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

pub struct Bridge {
    pub config: Config,
    pub running: Option<Running>,
    pub shutdown: CancellationToken,
}

impl Bridge {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a bridge and waits until it consumes from the broker.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        tweak(&mut config);
        let bridge = Self::start_unready(config).await;
        bridge.wait_ready().await;
        bridge
    }

    /// Starts a bridge without waiting for the broker.
    pub async fn start_unready(config: Config) -> Self {
        let shutdown = CancellationToken::new();
        let running = notify_bridge::run(config.clone(), shutdown.clone())
            .await
            .expect("bridge starts");
        Self {
            config,
            running: Some(running),
            shutdown,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.running().readiness.get().is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "bridge not ready: {:?}",
                self.running().readiness.get()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.running().ws_addr, path_and_query)
    }

    /// Connects as `user` with a token in the query and reads `welcome`.
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_channels(user, &[], &[]).await
    }

    pub async fn connect_channels(&self, user: &str, granted: &[&str], join: &[&str]) -> Client {
        let token = token(user, granted);
        let mut url = self.ws_url(&format!("/ws?token={token}"));
        for channel in join {
            url.push_str(&format!("&channel={channel}"));
        }
        let (mut client, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("handshake accepted");
        let welcome = next_json(&mut client).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }

    /// Connects `user` until accepted: a connection limit is released
    /// asynchronously after a close, so a refusal meanwhile must be a 503.
    pub async fn connect_when_released(&self, user: &str) -> Client {
        let url = self.ws_url(&format!("/ws?token={}", token(user, &[])));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((mut client, _)) => {
                    assert_eq!(next_json(&mut client).await["type"], "welcome");
                    return client;
                }
                Err(e) => {
                    let e = describe_ws_error(e);
                    assert!(e.starts_with("HTTP 503"), "{e}");
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the limit was not released: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// `METHOD path` on this bridge's HTTP port as `user` (a bearer JWT
    /// granting `channels`), the caller every user route is about.
    pub async fn request_as(
        &self,
        user: &str,
        channels: &[&str],
        method: &str,
        path: &str,
        body: &str,
    ) -> HttpReply {
        let auth = format!("Bearer {}", token(user, channels));
        let headers = [("authorization", auth.as_str())];
        http_request(self.running().http_addr, method, path, &headers, body).await
    }

    /// Publishes to this bridge's exchange and waits for the broker's confirm.
    pub async fn publish(&self, publisher: &Publisher, body: &str) {
        publisher
            .publish(&self.config.amqp.exchange, body, BasicProperties::default())
            .await;
    }

    /// Stops the bridge and waits for a clean stop, leaving its queue and
    /// exchange on the broker for a bridge started after it.
    pub async fn stop_keeping_topology(&mut self) {
        self.shutdown.cancel();
        self.running
            .take()
            .expect("a running bridge")
            .wait()
            .await
            .expect("a clean stop");
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(15), running.wait())
                .await
                .expect("bridge stops in time")
                .expect("a clean stop");
        }
        // Leave the shared broker as we found it.
        if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(
                        self.config.amqp.queue.as_str().into(),
                        QueueDeleteOptions::default(),
                    )
                    .await;
                let _ = ch
                    .exchange_delete(
                        self.config.amqp.exchange.as_str().into(),
                        ExchangeDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = conn.close(200, "test done".into()).await;
        }
    }
}

/// The `seq` of every entry of an inbox listing (`GET …/notifications`),
/// in the order listed.
pub fn listed_seqs(listing: &Value) -> Vec<u64> {
    listing["notifications"]
        .as_array()
        .expect("a notifications array")
        .iter()
        .map(|n| n["seq"].as_u64().expect("a seq"))
        .collect()
}

/// An HS256 token for `user`, valid for an hour.
pub fn token(user: &str, channels: &[&str]) -> String {
    let config = test_config();
    let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    notify_bridge::auth::mint(&config.auth, user, &channels, Duration::from_secs(3600)).unwrap()
}

/// A handshake request with extra headers.
pub fn request(url: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    request
}

/// The status and JSON body of a refused handshake.
pub async fn refused(request: http::Request<()>) -> (u16, Value) {
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => panic!("handshake unexpectedly accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).expect("JSON body"))
                .unwrap_or(Value::Null);
            (status, body)
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// The next JSON text frame (skipping pings and pongs), within [`WAIT`].
pub async fn next_json(client: &mut Client) -> Value {
    next_json_within(client, WAIT)
        .await
        .expect("a frame arrives in time")
}

pub async fn next_json_within(client: &mut Client, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let msg = tokio::time::timeout_at(deadline, client.next())
            .await
            .ok()??;
        match msg.expect("websocket read") {
            Message::Text(text) => return Some(serde_json::from_str(&text).expect("JSON frame")),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Asserts that no text frame arrives within `wait`.
pub async fn assert_silent(client: &mut Client, wait: Duration) {
    if let Some(frame) = next_json_within(client, wait).await {
        panic!("unexpected frame {frame}");
    }
}

/// The close code the server sends next (skipping other frames).
pub async fn close_code(client: &mut Client) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, client.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
            Err(_) => panic!("no close frame within {WAIT:?}"),
        }
    }
}

pub async fn send_text(client: &mut Client, text: &str) {
    client.send(Message::Text(text.into())).await.unwrap();
}

/// Sends `{"type": action, "channel": channel}` (`subscribe` or
/// `unsubscribe`) and asserts the reply confirms exactly that change.
pub async fn change_subscription(client: &mut Client, action: &str, channel: &str) {
    let (action_json, channel_json) = (Value::from(action), Value::from(channel));
    send_text(
        client,
        &format!(r#"{{"type":{action_json},"channel":{channel_json}}}"#),
    )
    .await;
    assert_eq!(
        next_json(client).await,
        serde_json::json!({"type": format!("{action}d"), "channel": channel})
    );
}

/// An AMQP publisher with publisher confirms.
pub struct Publisher {
    pub connection: Connection,
    pub channel: lapin::Channel,
}

impl Publisher {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("test publisher connects to the broker");
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            connection,
            channel,
        }
    }

    /// Publishes every body without waiting for each confirm (the broker
    /// keeps their order), then waits for all the confirms.
    pub async fn publish_all(&self, exchange: &str, bodies: impl IntoIterator<Item = String>) {
        for body in bodies {
            // The confirm future is dropped; wait_for_confirms waits for all.
            drop(
                self.channel
                    .basic_publish(
                        exchange.into(),
                        "notifications.send".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish"),
            );
        }
        let returned = self.channel.wait_for_confirms().await.expect("confirms");
        assert!(returned.is_empty(), "returned messages: {returned:?}");
    }

    pub async fn publish(&self, exchange: &str, body: &str, properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                "notifications.send".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker nacked the publish");
    }
}

/// The value of one metric line in the Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Helpers for the handshake, broker-fault and process tests.
// ---------------------------------------------------------------------------

/// The handshake response of an accepted connection.
pub type HandshakeResponse = tokio_tungstenite::tungstenite::handshake::client::Response;

/// Connects with `request`, expects the upgrade to be accepted, and reads
/// the `welcome` frame.
pub async fn accepted(request: http::Request<()>) -> (Client, HandshakeResponse, Value) {
    let (mut client, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake in time")
            .unwrap_or_else(|e| panic!("handshake refused: {}", describe_ws_error(e)));
    let welcome = next_json(&mut client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (client, response, welcome)
}

/// A handshake error with the body of a refused upgrade, for panics.
pub fn describe_ws_error(e: tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => format!(
            "HTTP {} {}",
            response.status(),
            response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token signed with [`SECRET`] carrying exactly `claims`.
pub fn token_with_claims(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Base64url without padding, for hand-made tokens.
pub fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Polls `condition` every 10 ms until it holds; panics with `what` after
/// `within`. Returns how long it took.
pub async fn eventually(
    within: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let started = tokio::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Deletes a queue and an exchange from the shared broker, ignoring errors.
pub async fn delete_topology(queue: &str, exchange: &str) {
    if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
            let _ = ch
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "test done".into()).await;
    }
}

/// Forwards every TCP connection accepted on `listener` to `target`.
pub fn spawn_proxy(
    listener: tokio::net::TcpListener,
    target: std::net::SocketAddr,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut pipes = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            pipes.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// The broker's address, from the test AMQP URL.
pub fn broker_addr() -> std::net::SocketAddr {
    let url = amqp_url();
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(&url)
        .split('/')
        .next()
        .unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5672")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().expect("the test broker's address")
}

/// A loopback port nothing listens on (yet): a broker that is not there.
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// Messages ready in `queue` and its consumers (a passive declare).
pub async fn queue_depth(queue: &str) -> (u32, u32) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to the broker");
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the queue exists");
    let _ = conn.close(200, "depth read".into()).await;
    (q.message_count(), q.consumer_count())
}

/// Asserts a handshake refusal's status and its `{"error","detail"}` body
/// (exactly those two keys, a non-empty detail); returns the detail.
pub async fn assert_refused(request: http::Request<()>, status: u16, code: &str) -> String {
    let (got, body) = refused(request).await;
    assert_eq!(got, status, "{body}");
    let object = body.as_object().expect("a JSON object body");
    assert_eq!(object.len(), 2, "only error and detail: {body}");
    assert_eq!(body["error"], code, "{body}");
    let detail = body["detail"].as_str().expect("detail is a string");
    assert!(!detail.is_empty(), "{body}");
    detail.to_string()
}

/// Declares an exclusive, auto-deleted queue `name` (named by the broker
/// when empty) and consumes it without acks: a test's own view of what the
/// bridge publishes, gone with the test's connection. Its name and consumer.
pub async fn exclusive_watch(
    channel: &lapin::Channel,
    name: &str,
    arguments: lapin::types::FieldTable,
) -> (String, lapin::Consumer) {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(name.into(), options, arguments)
        .await
        .unwrap();
    let name = queue.name().to_string();
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    (name, consumer)
}

/// Asserts that `token` is refused 401 both in `?token=` and as
/// `Authorization: Bearer`; the query refusal's detail.
pub async fn assert_token_refused(bridge: &Bridge, token: &str) -> String {
    let query = request(&bridge.ws_url(&format!("/ws?token={token}")), &[]);
    let detail = assert_refused(query, 401, "unauthorized").await;
    let header = format!("Bearer {token}");
    let by_header = request(&bridge.ws_url("/ws"), &[("authorization", &header)]);
    assert_refused(by_header, 401, "unauthorized").await;
    detail
}

/// Every dead letter from now on, through an exclusive queue of the test's
/// own bound to `notifications_dlx` (a fanout, so `notifications.dead` gets
/// the same copies): exact counts whatever else shares the broker. The
/// channel is returned with the consumer so it stays open.
pub async fn watch_dead_letters(connection: &Connection) -> (lapin::Channel, lapin::Consumer) {
    let channel = connection.create_channel().await.unwrap();
    let (name, consumer) = exclusive_watch(&channel, "", Default::default()).await;
    channel
        .queue_bind(
            name.as_str().into(),
            "notifications_dlx".into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    (channel, consumer)
}
