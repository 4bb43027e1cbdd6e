//! The browser-facing WebSocket server: accept and limit connections
//! (`server`), decide who a client is and what it may join (`handshake`),
//! then run one task per connection (`session`) speaking the frames of
//! `frames`; what they all share is the [`WsContext`] (`context`).

pub mod context;
pub mod handshake;
pub mod limits;
pub mod request_head;
pub mod server;
pub mod session;
#[cfg(test)]
mod session_tests;

pub use context::WsContext;
pub use server::serve;
