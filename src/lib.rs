//! notify-bridge delivers notifications from RabbitMQ to the WebSockets of
//! the users they are addressed to.
//!
//! Follow one message from the broker to a browser:
//!
//! ```text
//! AMQP delivery ─▶ amqp::consumer ─▶ message::decode ─▶ [stage]
//!              ─▶ router (one task) ─▶ session queue ─▶ ws::session ─▶ socket
//! ```
//!
//! What is where:
//!
//! - [`config`]: figment layers (defaults, TOML, environment) to a typed,
//!   validated [`config::Config`].
//! - [`message`]: the notification on the wire, decoded and validated once,
//!   its frame serialized once.
//! - [`amqp`]: topology, the consume loop with reconnects, ordered acks.
//! - [`router`]: the one task that knows who is connected and fans out.
//! - [`ws`]: the WebSocket server: handshake and auth, limits, sessions.
//! - [`auth`]: JWT verification and minting, one-time tickets.
//! - [`frames`]: the protocol's frames other than `notification`.
//! - [`cluster`]: several instances on one broker and one PostgreSQL.
//! - [`inbox`]: the per-user store of notifications (when enabled), read
//!   for replay on reconnect; [`stage`]: the commit stage between the
//!   consumer and the router.
//! - [`http`]: the side port: REST send (republished with publisher
//!   confirms), admin, health, readiness, metrics, OpenAPI.
//! - [`receipts`]: delivery receipts (what became of each message), sent
//!   through `amqp::receipt_publisher` before the ack.
//! - [`metrics`], [`readiness`]: shared state operators read.
//! - [`memory`]: hands freed heap pages back after a crowd disconnects.
//! - [`runtime`]: the tokio runtime and its worker count.
//! - [`shutdown`]: the signal every task watches.
//! - [`tls`]: wss and https, certificates re-read on SIGHUP.
//!
//! [`run`] (in `daemon`) starts it all and returns the bound addresses, so
//! tests can bind port 0.

pub mod amqp;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod connection_id;
mod daemon;
pub mod error;
pub mod frames;
pub mod http;
pub mod inbox;
pub mod log_limit;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod outbound;
pub mod query;
pub mod readiness;
pub mod receipts;
pub mod router;
pub mod runtime;
pub mod shutdown;
pub mod stage;
pub mod tls;
pub mod ws;

pub use daemon::{run, Running, TaskEnded};
