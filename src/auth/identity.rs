//! Who a connection is once a token or ticket was verified: the identity
//! that auth proves, tickets stand for, and sessions carry.

use std::{collections::HashSet, time::SystemTime};

use crate::message::UserId;

/// A verified client identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    /// The channels this connection may join beyond the public ones.
    pub channels: ChannelGrant,
    /// When the token stops being valid; the connection is closed then.
    /// `None` without an `exp`, or when `exp` lies beyond any time this
    /// machine can represent (it never comes).
    pub expires_at: Option<SystemTime>,
}

/// Which channels a connection may join.
#[derive(Debug, Clone)]
pub enum ChannelGrant {
    /// Development mode: every channel.
    All,
    /// The token's `channels` claim.
    Listed(HashSet<String>),
}

impl ChannelGrant {
    /// Whether a `subscribe` to `channel` is within this grant.
    pub fn allows(&self, channel: &str) -> bool {
        match self {
            ChannelGrant::All => true,
            ChannelGrant::Listed(set) => set.contains(channel),
        }
    }
}
