//! Configuration: built-in defaults, then a TOML file, then
//! `NOTIFY_BRIDGE_SECTION__KEY` environment variables, merged by figment into
//! one typed, validated [`Config`].
//!
//! Every error names the key in dotted form and where its value came from, so
//! an operator can fix a bad deployment without reading the source.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/notify-bridge.toml";

/// The prefix of every environment variable the bridge reads.
pub const ENV_PREFIX: &str = "NOTIFY_BRIDGE_";

/// The whole, validated configuration of one bridge instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub websocket: WebSocketConfig,
    pub http: HttpConfig,
    pub inbox: InboxConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub receipts: ReceiptsConfig,
    pub cluster: ClusterConfig,
    /// How long a SIGTERM may take from "stop accepting" to exit.
    #[serde(with = "duration_text")]
    pub shutdown_timeout: Duration,
}

/// Where the bridge consumes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: String,
    pub exchange: String,
    /// Used only when the bridge has to create the exchange.
    pub exchange_type: String,
    pub routing_key: String,
    /// This instance's queue; empty means `notify-bridge.<hostname>`.
    pub queue: String,
    pub prefetch: u16,
    pub max_message_bytes: usize,
    /// The most distinct users one message may name (`user_ids`): a bound
    /// on what one publisher can make the bridge do for one message.
    pub max_recipients: usize,
    #[serde(with = "duration_text")]
    pub reconnect_max_backoff: Duration,
    /// The CA (PEM) an `amqps://` broker must be signed by; unset, the
    /// system roots are trusted. For brokers behind a private CA.
    #[serde(deserialize_with = "optional_path")]
    pub tls_ca_file: Option<PathBuf>,
}

/// The browser-facing WebSocket listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    pub listen: SocketAddr,
    pub path: String,
    #[serde(deserialize_with = "string_list")]
    pub allowed_origins: Vec<String>,
    /// Compiled as they load: matching a `subscribe` costs no parsing.
    #[serde(deserialize_with = "pattern_list")]
    pub public_channels: Vec<ChannelPattern>,
    /// Outbound queue per connection, in messages; full means close 1013.
    pub send_queue: usize,
    /// Outbound queue per connection, in bytes of frame text: 1,024 frames
    /// of 1 MiB would otherwise pin a GiB for one slow reader. Past it the
    /// connection is closed 1013, like a full `send_queue`.
    pub send_queue_bytes: usize,
    /// The most channels one connection may hold, from `?channel=`, the
    /// token's `channels` claim and `subscribe` frames alike.
    pub max_channels_per_connection: usize,
    pub max_message_bytes: usize,
    #[serde(with = "duration_text")]
    pub ping_interval: Duration,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    /// A client that has not finished its HTTP upgrade by then is dropped.
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    /// The certificate chain (PEM) the listener presents; with
    /// `tls_key_file` it speaks wss, for platforms that want the service
    /// itself to terminate TLS. Re-read on SIGHUP.
    #[serde(deserialize_with = "optional_path")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`.
    #[serde(deserialize_with = "optional_path")]
    pub tls_key_file: Option<PathBuf>,
}

/// One of `websocket.public_channels`: `*` matches any run of characters,
/// `?` exactly one, everything else itself (no escapes, no classes), as
/// `wildmatch` has it. Compiled once, when the config is loaded or built;
/// it reads and prints as the text it was written as.
#[derive(Debug, Clone)]
pub struct ChannelPattern {
    text: String,
    compiled: wildmatch::WildMatch,
}

impl ChannelPattern {
    /// Whether `channel` matches the whole pattern.
    pub fn matches(&self, channel: &str) -> bool {
        self.compiled.matches(channel)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<T: Into<String>> From<T> for ChannelPattern {
    fn from(text: T) -> Self {
        let text = text.into();
        let compiled = wildmatch::WildMatch::new(&text);
        Self { text, compiled }
    }
}

impl PartialEq for ChannelPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Serialize for ChannelPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// The HTTP side port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    #[serde(deserialize_with = "string_list")]
    pub api_keys: Vec<String>,
    #[serde(deserialize_with = "string_list")]
    pub admin_keys: Vec<String>,
    /// Lets the send endpoint accept calls without a key (development only).
    pub allow_anonymous: bool,
    /// Serves a token-minting endpoint for the demo page (development only).
    pub dev_tokens: bool,
    /// A request head must arrive within this time, and its body within the
    /// same time again; a connection that is slower is closed, so idle or
    /// half-sent requests cannot pile up.
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// The most connections open on the side port at once; past it new
    /// ones are refused at accept, so it cannot take the file descriptors
    /// the WebSocket listener needs.
    pub max_connections: usize,
    /// The certificate chain (PEM) of the side port; with `tls_key_file` it
    /// speaks https (API keys and tokens cross it). Re-read on SIGHUP.
    #[serde(deserialize_with = "optional_path")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`.
    #[serde(deserialize_with = "optional_path")]
    pub tls_key_file: Option<PathBuf>,
}

/// The per-user inbox (stored notifications).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    pub enabled: bool,
    /// Which store keeps the inbox: one SQLite file (one instance, no
    /// server to run) or a PostgreSQL database (shared by instances).
    pub store: InboxStoreKind,
    pub path: PathBuf,
    /// The PostgreSQL connection string (URL or `key=value` form) when
    /// `store = "postgres"`; it may hold a password, so check-config masks it.
    #[serde(deserialize_with = "optional_text")]
    pub postgres_url: Option<String>,
    pub max_per_user: usize,
    #[serde(with = "duration_text")]
    pub ttl: Duration,
}

/// Delivery receipts (CONTRACT.md, "Delivery receipts"): so a publisher
/// can fall back to e-mail or push when a user was offline. Off by default;
/// a message with an AMQP `reply_to` gets receipts either way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiptsConfig {
    pub enabled: bool,
    /// The routing key receipts are published with on `amqp.exchange`.
    pub routing_key: String,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            routing_key: "notifications.result".into(),
        }
    }
}

/// Cluster mode: several instances share one broker and one PostgreSQL
/// inbox, each message stored once and delivered live only to the
/// instances that hold its recipients (docs/cluster.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub enabled: bool,
    /// Prefixes everything the cluster declares on the broker and keys its
    /// rows in the database: two clusters on one broker never mix.
    pub name: String,
    /// Empty: the hostname plus a random suffix per start (see
    /// [`ClusterConfig::resolved_instance_id`]).
    pub instance_id: String,
}

impl ClusterConfig {
    /// This start's instance id: the configured one, or the hostname plus
    /// a random suffix, so a restarted process never inherits the presence
    /// rows or live queue of its previous life by accident.
    pub fn resolved_instance_id(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        let host: String = hostname()
            .chars()
            .map(|c| if is_name_char(c) { c } else { '_' })
            .take(40)
            .collect();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}-{}", &suffix[..8])
    }
}

/// What a cluster name or instance id may hold: they become queue names,
/// routing keys and parts of connection ids.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn valid_name(text: &str, max: usize) -> bool {
    !text.is_empty() && text.len() <= max && text.chars().all(is_name_char)
}

/// The inbox's storage engine: SQLite stays the default so that one
/// instance still needs no database server.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum InboxStoreKind {
    #[default]
    Sqlite,
    Postgres,
}

/// How WebSocket clients prove who they are.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Signed JWTs (the default).
    Jwt,
    /// The user id is taken from the URL: local development only.
    None,
}

/// JWT verification settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    #[serde(
        deserialize_with = "optional_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwt_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_file: Option<PathBuf>,
    pub user_claim: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The cookie the handshake reads the JWT from when no other token is
    /// given (empty: off), for apps that set an HttpOnly cookie on their own
    /// domain. Needs a non-empty `websocket.allowed_origins`.
    pub cookie_name: String,
    /// How long a one-time ticket from `POST /api/ws-ticket` stays valid.
    #[serde(with = "duration_text")]
    pub ticket_ttl: Duration,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `notify_bridge=debug,lapin=warn`, …
    pub level: String,
    pub format: LogFormat,
}

/// Human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp: AmqpConfig::default(),
            websocket: WebSocketConfig::default(),
            http: HttpConfig::default(),
            inbox: InboxConfig::default(),
            auth: AuthConfig::default(),
            log: LogConfig::default(),
            receipts: ReceiptsConfig::default(),
            cluster: ClusterConfig {
                enabled: false,
                name: "notify-bridge".into(),
                instance_id: String::new(),
            },
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "notifications_exchange".into(),
            exchange_type: "direct".into(),
            routing_key: "notifications.send".into(),
            queue: String::new(),
            prefetch: 200,
            max_message_bytes: 1_048_576,
            max_recipients: 100_000,
            reconnect_max_backoff: Duration::from_secs(30),
            tls_ca_file: None,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            path: "/ws".into(),
            allowed_origins: Vec::new(),
            public_channels: Vec::new(),
            send_queue: 1024,
            send_queue_bytes: 4_194_304,
            max_channels_per_connection: 128,
            max_message_bytes: 65_536,
            ping_interval: Duration::from_secs(25),
            max_connections: 100_000,
            max_connections_per_user: 100,
            handshake_timeout: Duration::from_secs(10),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            allow_anonymous: false,
            dev_tokens: false,
            request_timeout: Duration::from_secs(10),
            max_connections: 1024,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            store: InboxStoreKind::Sqlite,
            path: PathBuf::from("data/inbox.db"),
            postgres_url: None,
            max_per_user: 1000,
            ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Jwt,
            jwt_secret: None,
            jwt_public_key_file: None,
            user_claim: "sub".into(),
            audience: None,
            issuer: None,
            cookie_name: String::new(),
            ticket_ttl: Duration::from_secs(30),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl AmqpConfig {
    /// The queue this instance consumes: one per instance, so every instance
    /// sees every message and delivers to its own clients.
    pub fn queue_name(&self) -> String {
        if self.queue.is_empty() {
            format!("notify-bridge.{}", hostname())
        } else {
            self.queue.clone()
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A configuration that cannot be used; `main` exits with code 2 on it.
#[derive(Debug)]
pub struct ConfigError {
    problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// A single problem about one key, for checks made outside this module
    /// (the inbox store, the JWT key file) that must still name the key.
    pub fn key(key: &str, detail: impl fmt::Display) -> Self {
        Self {
            problems: vec![format!("{key}: {detail}")],
        }
    }
}

/// One check of [`Config::validate`]: whether it holds, the key, and
/// what the key must be otherwise.
type Rule = (bool, &'static str, &'static str);

const AT_LEAST_1: &str = "must be at least 1";
const LONGER_THAN_0: &str = "must be longer than 0s";

impl Config {
    /// Loads defaults, then `path` (or the default file if present), then the
    /// environment, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(Self::figment(path)?)
    }

    /// Loads defaults, then `text` as the TOML file, and validates the
    /// result, exactly as [`Config::load`] does but without reading a file or
    /// the environment. It exists for the config-loader fuzz target
    /// (`fuzz/fuzz_targets/config_toml.rs`) and for tests, which must not
    /// depend on the files and `NOTIFY_BRIDGE_*` variables of the machine.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    /// The one pipeline every loader ends in: extract, then validate.
    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|err| ConfigError {
            problems: err
                .into_iter()
                .map(|e| describe_figment_error(&e))
                .collect(),
        })?;
        config.validate(&figment)?;
        Ok(config)
    }

    fn figment(path: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError {
                        problems: vec![format!("--config {}: no such file", path.display())],
                    });
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if default.is_file() {
                    figment = figment.merge(Toml::file_exact(default));
                }
            }
        }
        Ok(figment.merge(env_provider()))
    }

    /// Checks that figment cannot express as types; every problem is listed,
    /// not only the first, each naming where its value came from.
    fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let rules = [
            self.amqp_rules(),
            self.websocket_rules(),
            self.other_rules(),
        ];
        let mut problems: Vec<String> = rules
            .iter()
            .flatten()
            .filter(|(ok, _, _)| !ok)
            .map(|(_, key, detail)| format!("{key}: {detail} (from {})", source_of(figment, key)))
            .collect();
        problems.extend(self.tls_problems(figment));
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.push(format!(
                "log.level: {:?} is not a valid filter such as \"info\" or \"notify_bridge=debug\" (from {})",
                self.log.level,
                source_of(figment, "log.level")
            ));
        }
        problems.extend(self.postgres_problem(figment));
        problems.extend(self.cluster_problems(figment));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    fn amqp_rules(&self) -> Vec<Rule> {
        let a = &self.amqp;
        vec![
            (!a.url.is_empty(), "amqp.url", "must not be empty"),
            (
                a.url.starts_with("amqp://") || a.url.starts_with("amqps://"),
                "amqp.url",
                "must start with amqp:// or amqps://",
            ),
            (!a.exchange.is_empty(), "amqp.exchange", "must not be empty"),
            (
                matches!(
                    a.exchange_type.as_str(),
                    "direct" | "fanout" | "topic" | "headers"
                ),
                "amqp.exchange_type",
                "must be one of direct, fanout, topic, headers",
            ),
            (a.prefetch > 0, "amqp.prefetch", AT_LEAST_1),
            (
                a.max_message_bytes > 0,
                "amqp.max_message_bytes",
                AT_LEAST_1,
            ),
            (a.max_recipients > 0, "amqp.max_recipients", AT_LEAST_1),
            (
                !a.reconnect_max_backoff.is_zero(),
                "amqp.reconnect_max_backoff",
                LONGER_THAN_0,
            ),
        ]
    }

    fn websocket_rules(&self) -> Vec<Rule> {
        let w = &self.websocket;
        vec![
            (
                w.path.starts_with('/'),
                "websocket.path",
                "must start with '/'",
            ),
            (w.send_queue > 0, "websocket.send_queue", AT_LEAST_1),
            (
                w.send_queue_bytes > 0,
                "websocket.send_queue_bytes",
                AT_LEAST_1,
            ),
            (
                w.max_channels_per_connection > 0,
                "websocket.max_channels_per_connection",
                AT_LEAST_1,
            ),
            (
                w.max_message_bytes >= 16,
                "websocket.max_message_bytes",
                "must be at least 16",
            ),
            (
                !w.ping_interval.is_zero(),
                "websocket.ping_interval",
                LONGER_THAN_0,
            ),
            (
                w.max_connections > 0,
                "websocket.max_connections",
                AT_LEAST_1,
            ),
            (
                w.max_connections_per_user > 0,
                "websocket.max_connections_per_user",
                AT_LEAST_1,
            ),
            (
                !w.handshake_timeout.is_zero(),
                "websocket.handshake_timeout",
                LONGER_THAN_0,
            ),
        ]
    }

    /// The http, inbox, receipts, auth and top-level rules, in that order.
    fn other_rules(&self) -> Vec<Rule> {
        let auth = &self.auth;
        vec![
            (
                !self.http.request_timeout.is_zero(),
                "http.request_timeout",
                LONGER_THAN_0,
            ),
            (
                self.http.max_connections > 0,
                "http.max_connections",
                AT_LEAST_1,
            ),
            (
                self.inbox.max_per_user > 0,
                "inbox.max_per_user",
                AT_LEAST_1,
            ),
            (!self.inbox.ttl.is_zero(), "inbox.ttl", LONGER_THAN_0),
            (
                !self.receipts.routing_key.is_empty(),
                "receipts.routing_key",
                "must not be empty",
            ),
            (
                !auth.user_claim.is_empty(),
                "auth.user_claim",
                "must not be empty",
            ),
            (
                auth.mode != AuthMode::Jwt
                    || auth.jwt_secret.is_some()
                    || auth.jwt_public_key_file.is_some(),
                "auth.jwt_secret",
                "auth.mode = \"jwt\" needs auth.jwt_secret or auth.jwt_public_key_file \
                 (or set auth.mode = \"none\" for local development)",
            ),
            (!auth.ticket_ttl.is_zero(), "auth.ticket_ttl", LONGER_THAN_0),
            // Any site's page makes the browser send the cookie: only the
            // origin check keeps other sites out.
            (
                auth.cookie_name.is_empty() || !self.websocket.allowed_origins.is_empty(),
                "auth.cookie_name",
                "cookie authentication needs a non-empty websocket.allowed_origins: a browser \
                 sends the cookie from any site's page, and only the origin check refuses them",
            ),
            (
                !self.shutdown_timeout.is_zero(),
                "shutdown_timeout",
                LONGER_THAN_0,
            ),
        ]
    }

    /// A certificate without its key, or the other way round.
    fn tls_problems(&self, figment: &Figment) -> Vec<String> {
        let (w, h) = (&self.websocket, &self.http);
        let pairs = [
            (
                (&w.tls_cert_file, "websocket.tls_cert_file"),
                (&w.tls_key_file, "websocket.tls_key_file"),
            ),
            (
                (&h.tls_cert_file, "http.tls_cert_file"),
                (&h.tls_key_file, "http.tls_key_file"),
            ),
        ];
        pairs
            .into_iter()
            .flat_map(|(cert, key)| half_a_pair(figment, cert, key))
            .collect()
    }

    /// `inbox.store = "postgres"` needs a parseable `inbox.postgres_url`.
    fn postgres_problem(&self, figment: &Figment) -> Option<String> {
        if self.inbox.store != InboxStoreKind::Postgres {
            return None;
        }
        // Missing, the key has no source of its own: name the one that
        // asked for it.
        match &self.inbox.postgres_url {
            None => Some(format!(
                "inbox.postgres_url: is required when inbox.store = \"postgres\" \
                 (inbox.store from {})",
                source_of(figment, "inbox.store")
            )),
            Some(url) => url.parse::<tokio_postgres::Config>().err().map(|e| {
                format!(
                    "inbox.postgres_url: is not a PostgreSQL connection string ({e}) (from {})",
                    source_of(figment, "inbox.postgres_url")
                )
            }),
        }
    }

    /// Cluster mode needs the shared store, and names that can become
    /// queue names, routing keys and connection ids.
    fn cluster_problems(&self, figment: &Figment) -> Vec<String> {
        let c = &self.cluster;
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, detail: &str| {
            if !ok {
                problems.push(format!(
                    "{key}: {detail} (from {})",
                    source_of(figment, key)
                ));
            }
        };
        check(
            valid_name(&c.name, 100),
            "cluster.name",
            "must be 1-100 characters of A-Z a-z 0-9 _ . -",
        );
        check(
            c.instance_id.is_empty() || valid_name(&c.instance_id, 64),
            "cluster.instance_id",
            "must be empty or 1-64 characters of A-Z a-z 0-9 _ . -",
        );
        check(
            !c.enabled || (self.inbox.enabled && self.inbox.store == InboxStoreKind::Postgres),
            "cluster.enabled",
            "needs the shared inbox: inbox.enabled = true and inbox.store = \"postgres\"",
        );
        problems
    }

    /// The effective configuration as TOML, secrets masked, for `check-config`.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        const MASK: &str = "********";
        if shown.auth.jwt_secret.is_some() {
            shown.auth.jwt_secret = Some(MASK.into());
        }
        for key in shown
            .http
            .api_keys
            .iter_mut()
            .chain(shown.http.admin_keys.iter_mut())
        {
            *key = MASK.into();
        }
        shown.amqp.url = mask_url_password(&shown.amqp.url);
        shown.inbox.postgres_url = shown.inbox.postgres_url.as_deref().map(mask_pg_password);
        if shown.amqp.queue.is_empty() {
            shown.amqp.queue = shown.amqp.queue_name();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// The sections a `NOTIFY_BRIDGE_*` variable may address; other variables
/// with the prefix (a test harness's, say) are not configuration.
const TOP_LEVEL_KEYS: [&str; 9] = [
    "amqp",
    "websocket",
    "http",
    "inbox",
    "auth",
    "log",
    "receipts",
    "cluster",
    "shutdown_timeout",
];

fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX).split("__").filter(|key| {
        let key = key.as_str().to_ascii_lowercase().replace("__", ".");
        let top = key.split('.').next().unwrap_or_default();
        TOP_LEVEL_KEYS.contains(&top)
    })
}

/// A certificate without its key, or a key without its certificate: the
/// missing one is named, with the source of the one that is set.
fn half_a_pair(
    figment: &Figment,
    (cert, cert_key): (&Option<PathBuf>, &str),
    (key, key_key): (&Option<PathBuf>, &str),
) -> Option<String> {
    let (missing, set) = match (cert, key) {
        (Some(_), None) => (key_key, cert_key),
        (None, Some(_)) => (cert_key, key_key),
        _ => return None,
    };
    Some(format!(
        "{missing}: is required when {set} is set: TLS needs both the certificate and its key \
         ({set} from {})",
        source_of(figment, set)
    ))
}

/// What `check-config` shows instead of a password.
const MASK: &str = "********";

/// `amqp.url` with its password replaced by [`MASK`], because
/// `check-config` output is pasted into tickets and chats. The URL is read
/// with the `url` crate, the parser the AMQP client (`amq-protocol-uri`)
/// connects with, so what is masked is exactly what would be sent as the
/// password, `@` in it included (the userinfo ends at the last `@`). A URL
/// that parser rejects, or reads as having no password although it has an
/// `@`, is masked from the first `:` after the scheme to the last `@`:
/// too much hidden is harmless here, a secret shown is not.
fn mask_url_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            if parsed.set_password(Some(MASK)).is_ok() {
                return parsed.to_string();
            }
            mask_through_last_at(url)
        }
        _ => mask_through_last_at(url),
    }
}

/// `inbox.postgres_url` with its password masked: the URL form as
/// [`mask_url_password`] does (plus a `password=` query parameter), the
/// `key=value` form by its `password` value.
fn mask_pg_password(conn: &str) -> String {
    if conn.contains("://") {
        let masked = mask_url_password(conn);
        return match url::Url::parse(&masked) {
            Ok(mut parsed) if parsed.query_pairs().any(|(k, _)| k == "password") => {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" {
                            MASK.into()
                        } else {
                            v.into()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
                parsed.to_string()
            }
            _ => masked,
        };
    }
    mask_kv_password(conn)
}

/// The `key=value` form read as libpq does (spaces around `=`, values in
/// single quotes with backslash escapes), the `password` value replaced.
fn mask_kv_password(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut chars = conn.chars().peekable();
    loop {
        while let Some(c) = chars.next_if(|c| c.is_whitespace()) {
            out.push(c);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        out.push_str(&key);
        while let Some(c) = chars.next_if(|c| c.is_whitespace() || *c == '=') {
            out.push(c);
        }
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            value.push('\'');
            while let Some(c) = chars.next() {
                value.push(c);
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        out.push_str(if key == "password" { MASK } else { &value });
        if chars.peek().is_none() {
            return out;
        }
    }
}

/// The conservative mask of [`mask_url_password`]:
/// `scheme://user:********@` then what follows the last `@`.
fn mask_through_last_at(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:{MASK}{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// "environment variable NOTIFY_BRIDGE_X__Y", "config/x.toml", or "default".
fn source_of(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(meta) => describe_metadata(meta, key),
        None => "default".into(),
    }
}

fn describe_metadata(meta: &figment::Metadata, key: &str) -> String {
    if let Some(source) = &meta.source {
        return format!("{} ({source})", meta.name);
    }
    if meta.name.contains("environment") {
        let native = format!(
            "{ENV_PREFIX}{}",
            key.to_ascii_uppercase().replace('.', "__")
        );
        return format!("environment variable {native}");
    }
    meta.name.to_string()
}

fn describe_figment_error(err: &figment::Error) -> String {
    let key = if err.path.is_empty() {
        "(top level)".to_string()
    } else {
        err.path.join(".")
    };
    let source = match &err.metadata {
        Some(meta) => describe_metadata(meta, &key),
        None => "default".into(),
    };
    format!("{key}: {} (from {source})", err.kind)
}

/// Durations as `"25s"`, `"1h 30m"`, `"30d"`; a bare integer means seconds.
mod duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Seconds(u64),
            Text(String),
        }
        match Text::deserialize(d)? {
            Text::Seconds(s) => Ok(Duration::from_secs(s)),
            Text::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a duration like \"25s\", \"5m\" or \"30d\" ({e})"
                ))
            }),
        }
    }
}

/// A list from TOML (`["a","b"]`), or from one environment string, either
/// as a TOML array (`'["a","b"]'`, already parsed by figment) or
/// comma-separated (`a,b`).
fn pattern_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChannelPattern>, D::Error> {
    Ok(string_list(d)?
        .into_iter()
        .map(ChannelPattern::from)
        .collect())
}

fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Text(String),
        Int(i64),
    }
    impl Item {
        fn into_string(self) -> String {
            match self {
                Item::Text(s) => s,
                Item::Int(i) => i.to_string(),
            }
        }
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Many(Vec<Item>),
        One(Item),
    }
    Ok(match List::deserialize(d)? {
        List::Many(items) => items.into_iter().map(Item::into_string).collect(),
        List::One(item) => item
            .into_string()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// A secret that an environment variable may spell as digits only.
fn optional_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Text(String),
        Int(i64),
    }
    Ok(match Option::<Text>::deserialize(d)? {
        Some(Text::Text(s)) if s.is_empty() => None,
        Some(Text::Text(s)) => Some(s),
        Some(Text::Int(i)) => Some(i.to_string()),
        None => None,
    })
}

/// A file path where an empty string (an environment variable set to
/// nothing, the example file's `""`) means unset.
fn optional_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    Ok(optional_text(d)?.map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text)
    }

    const SECRET: &str = "auth.jwt_secret = \"0123456789abcdef0123\"\n";

    #[test]
    fn receipts_are_off_by_default_and_need_a_routing_key() {
        let c = load_toml(SECRET).unwrap();
        assert!(!c.receipts.enabled);
        assert_eq!(c.receipts.routing_key, "notifications.result");
        let on = load_toml(&format!(
            "{SECRET}[receipts]\nenabled = true\nrouting_key = \"results\"\n"
        ))
        .unwrap();
        assert!(on.receipts.enabled);
        assert_eq!(on.receipts.routing_key, "results");
        let empty = load_toml(&format!("{SECRET}[receipts]\nrouting_key = \"\"\n")).unwrap_err();
        assert!(
            empty.to_string().contains("receipts.routing_key"),
            "{empty}"
        );
        let unknown = load_toml(&format!("{SECRET}[receipts]\nenable = true\n")).unwrap_err();
        assert!(unknown.to_string().contains("receipts"), "{unknown}");
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = load_toml(SECRET).unwrap();
        assert_eq!(c.amqp.prefetch, 200);
        assert_eq!(c.amqp.max_message_bytes, 1_048_576);
        assert_eq!(c.websocket.max_message_bytes, 65_536);
        assert_eq!(c.websocket.send_queue, 1024);
        assert_eq!(c.websocket.ping_interval, Duration::from_secs(25));
        assert_eq!(c.amqp.reconnect_max_backoff, Duration::from_secs(30));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.inbox.ttl, Duration::from_secs(30 * 86400));
        assert!(c.amqp.queue_name().starts_with("notify-bridge."));
        // "Limits on hostile input".
        assert_eq!(c.amqp.max_recipients, 100_000);
        assert_eq!(c.websocket.max_channels_per_connection, 128);
        assert_eq!(c.websocket.send_queue_bytes, 4_194_304);
        assert_eq!(c.http.request_timeout, Duration::from_secs(10));
        assert_eq!(c.http.max_connections, 1024);
    }

    #[test]
    fn bad_value_names_the_dotted_key() {
        let err = load_toml(&format!("{SECRET}[websocket]\nsend_queue = \"lots\"\n")).unwrap_err();
        assert!(err.to_string().contains("websocket.send_queue"), "{err}");
        let err = load_toml(&format!("{SECRET}[websocket]\nsend_queue = 0\n")).unwrap_err();
        assert!(err.to_string().contains("websocket.send_queue"), "{err}");
        let err =
            load_toml(&format!("{SECRET}[websocket]\nping_interval = \"soon\"\n")).unwrap_err();
        assert!(err.to_string().contains("websocket.ping_interval"), "{err}");
    }

    #[test]
    fn cookie_auth_needs_an_origin_allow_list() {
        let e = load_toml(&format!("{SECRET}auth.cookie_name = \"nb_token\"\n")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("auth.cookie_name"), "{text}");
        assert!(text.contains("websocket.allowed_origins"), "{text}");
        let ok = format!(
            "{SECRET}auth.cookie_name = \"nb_token\"\n[websocket]\nallowed_origins = [\"https://app.example\"]\n"
        );
        assert_eq!(load_toml(&ok).unwrap().auth.cookie_name, "nb_token");
    }

    #[test]
    fn tls_needs_both_files_of_a_pair() {
        let c = load_toml(SECRET).unwrap();
        assert_eq!(
            (&c.websocket.tls_cert_file, &c.http.tls_key_file),
            (&None, &None)
        );
        assert_eq!(c.amqp.tls_ca_file, None);
        for (toml, missing) in [
            (
                "[websocket]\ntls_cert_file = \"c.pem\"\n",
                "websocket.tls_key_file",
            ),
            (
                "[websocket]\ntls_key_file = \"k.pem\"\n",
                "websocket.tls_cert_file",
            ),
            ("[http]\ntls_cert_file = \"c.pem\"\n", "http.tls_key_file"),
            ("[http]\ntls_key_file = \"k.pem\"\n", "http.tls_cert_file"),
        ] {
            let err = load_toml(&format!("{SECRET}{toml}")).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid configuration:\n  - {missing}:")),
                "{err}"
            );
        }
        // An empty value is unset, as an emptied environment variable is.
        let c = load_toml(&format!(
            "{SECRET}[websocket]\ntls_cert_file = \"\"\ntls_key_file = \"\"\n[amqp]\ntls_ca_file = \"\"\n"
        ))
        .unwrap();
        assert_eq!(c.websocket.tls_cert_file, None);
        assert_eq!(c.amqp.tls_ca_file, None);
        let c = load_toml(&format!(
            "{SECRET}[http]\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n"
        ))
        .unwrap();
        assert_eq!(c.http.tls_key_file, Some(PathBuf::from("k.pem")));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = load_toml(&format!("{SECRET}[websocket]\nsend_queeu = 5\n")).unwrap_err();
        assert!(err.to_string().contains("send_queeu"), "{err}");
    }

    #[test]
    fn jwt_mode_needs_a_key() {
        let err = load_toml("").unwrap_err();
        assert!(err.to_string().contains("auth.jwt_secret"), "{err}");
        assert!(load_toml("auth.mode = \"none\"\n").is_ok());
    }

    #[test]
    fn lists_accept_arrays_and_commas() {
        let c = load_toml(&format!("{SECRET}[http]\napi_keys = \"k1, k2\"\n")).unwrap();
        assert_eq!(c.http.api_keys, vec!["k1", "k2"]);
        let c = load_toml(&format!("{SECRET}[http]\napi_keys = [\"k1\", 22]\n")).unwrap();
        assert_eq!(c.http.api_keys, vec!["k1", "22"]);
    }

    #[test]
    fn masked_output_hides_secrets() {
        let c = load_toml(&format!(
            "{SECRET}[http]\napi_keys = [\"apikey-visible\"]\n[amqp]\nurl = \"amqp://u:hunter2@h:5672/%2f\"\n"
        ))
        .unwrap();
        let shown = c.to_masked_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("apikey-visible"), "{shown}");
        assert!(!shown.contains("0123456789abcdef0123"), "{shown}");
        assert!(shown.contains("amqp://u:********@h:5672/%2f"), "{shown}");
        // The masked output is itself a loadable config.
        let again: Config = toml::from_str(&shown).unwrap();
        assert_eq!(again.websocket, c.websocket);
    }

    #[test]
    fn cluster_mode_needs_the_postgres_inbox_and_names_fit_for_the_broker() {
        let alone = load_toml(&format!("{SECRET}[cluster]\nenabled = true\n"))
            .expect_err("cluster mode without the shared store");
        assert!(alone.to_string().contains("cluster.enabled"), "{alone}");
        let pg =
            "[inbox]\nenabled = true\nstore = \"postgres\"\npostgres_url = \"postgres://h/db\"\n";
        let ok = load_toml(&format!(
            "{SECRET}{pg}[cluster]\nenabled = true\ninstance_id = \"a-1.x\"\n"
        ))
        .unwrap();
        assert_eq!(ok.cluster.resolved_instance_id(), "a-1.x");
        for bad in [
            "name = \"has space\"",
            "name = \"\"",
            "instance_id = \"a/b\"",
        ] {
            let err = load_toml(&format!("{SECRET}{pg}[cluster]\nenabled = true\n{bad}\n"))
                .expect_err(bad);
            assert!(err.to_string().contains("cluster."), "{bad}: {err}");
        }
        // The default id: the hostname and a suffix that differs per start.
        let defaults = ClusterConfig {
            instance_id: String::new(),
            ..ok.cluster
        };
        assert_ne!(
            defaults.resolved_instance_id(),
            defaults.resolved_instance_id()
        );
        assert!(defaults.resolved_instance_id().chars().all(is_name_char));
    }

    #[test]
    fn the_postgres_store_needs_a_valid_url_and_check_config_masks_it() {
        let c = load_toml(SECRET).unwrap();
        assert_eq!(
            (c.inbox.store, c.inbox.postgres_url.as_deref()),
            (InboxStoreKind::Sqlite, None)
        );
        let missing = load_toml(&format!("{SECRET}[inbox]\nstore = \"postgres\"\n"))
            .expect_err("store = postgres needs a URL");
        assert!(
            missing.to_string().contains("inbox.postgres_url"),
            "{missing}"
        );
        // A missing key has no source: the message names inbox.store's.
        assert!(
            missing.to_string().contains("inbox.store from"),
            "{missing}"
        );
        let bad = load_toml(&format!(
            "{SECRET}[inbox]\nstore = \"postgres\"\npostgres_url = \"postgres://h:notaport/db\"\n"
        ))
        .expect_err("a URL tokio-postgres cannot read is refused");
        assert!(bad.to_string().contains("inbox.postgres_url"), "{bad}");
        let unknown = load_toml(&format!("{SECRET}[inbox]\nstore = \"mysql\"\n"));
        assert!(unknown.is_err());
        let c = load_toml(&format!(
            "{SECRET}[inbox]\nstore = \"postgres\"\npostgres_url = \"postgres://nb:s3cret@db:5432/nb\"\n"
        ))
        .unwrap();
        assert_eq!(c.inbox.store, InboxStoreKind::Postgres);
        let shown = c.to_masked_toml();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://nb:********@db:5432/nb"),
            "{shown}"
        );
        let kv = load_toml(&format!(
            "{SECRET}[inbox]\nstore = \"postgres\"\npostgres_url = \"host=db user=nb password=s3cret dbname=nb\"\n"
        ))
        .unwrap();
        let shown = kv.to_masked_toml();
        assert!(!shown.contains("s3cret"), "{shown}");
        for (input, shown) in [
            (
                "host=db password = 'a b\\' c' user=nb",
                "host=db password = ******** user=nb",
            ),
            ("password=x", "password=********"),
            ("user=nb", "user=nb"),
        ] {
            assert_eq!(mask_pg_password(input), shown, "masking {input:?}");
        }
    }

    #[test]
    fn mask_url_password_hides_the_whole_password() {
        // (input, what check-config shows)
        let cases = [
            (
                "amqp://u:hunter2@h:5672/%2f",
                "amqp://u:********@h:5672/%2f",
            ),
            // The userinfo ends at the LAST `@`: nothing of `p@ss` shows.
            ("amqp://user:p@ss@host/", "amqp://user:********@host/"),
            (
                "amqps://user:a@b@c@broker.example:5671/vh?heartbeat=10",
                "amqps://user:********@broker.example:5671/vh?heartbeat=10",
            ),
            ("amqp://user:p%40ss@host/", "amqp://user:********@host/"),
            // Not a URL the AMQP client can parse (a `/` in the password):
            // still nothing of the password shows.
            ("amqp://user:pa/ss@host/", "amqp://user:********@host/"),
            ("amqp://user:12/ss@host", "amqp://user:********@host"),
            // Nothing to hide.
            ("amqp://host:5672/%2f", "amqp://host:5672/%2f"),
            ("amqp://user@host/", "amqp://user@host/"),
            ("not a url", "not a url"),
        ];
        for (input, shown) in cases {
            assert_eq!(mask_url_password(input), shown, "masking {input:?}");
        }
    }

    #[test]
    fn from_toml_str_runs_the_load_pipeline_on_text() {
        // Exactly the pipeline of `load`: TOML over defaults, then validation
        // with the key and its source named.
        let c = Config::from_toml_str(&format!("{SECRET}[websocket]\npath = \"/live\"\n")).unwrap();
        assert_eq!(c.websocket.path, "/live");
        assert_eq!(c.auth.jwt_secret.as_deref(), Some("0123456789abcdef0123"));
        let err =
            Config::from_toml_str(&format!("{SECRET}[websocket]\npath = \"live\"\n")).unwrap_err();
        assert!(err.to_string().contains("websocket.path"), "{err}");
        assert!(Config::from_toml_str("not = [toml").is_err());
        // The repository's own files load through it as they are; the
        // example leaves the JWT key to the operator, and nothing else fails.
        let read = |file: &str| {
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap()
        };
        let dev = Config::from_toml_str(&read("config/dev.toml"));
        assert!(dev.is_ok(), "{}", dev.unwrap_err());
        let err = Config::from_toml_str(&read("config/notify-bridge.example.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].starts_with("auth.jwt_secret"), "{err}");
    }
}
