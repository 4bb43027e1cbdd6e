//! One-time WebSocket tickets: a browser trades its JWT for a short-lived,
//! single-use ticket over the side port (`POST /api/ws-ticket`, with the
//! token in a header), then connects with `?ticket=K`, so no token ends up
//! in a URL, a proxy log or the browser's history.
//!
//! A ticket stands for the identity its token proved (user, channels,
//! expiry). It is 128 random bits, works once, and only for
//! `auth.ticket_ttl`. Tickets live in this process; outstanding ones are
//! bounded, so a caller with a valid token cannot grow the map without limit.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::identity::Identity;

/// The most tickets outstanding at once; past it (after dropping expired
/// ones) new tickets are refused until some are used or expire.
pub const MAX_OUTSTANDING: usize = 100_000;

/// Why a ticket could not be issued or redeemed; the text is the 401/503
/// detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketError {
    /// Used already, expired, or never issued: all look alike to a client.
    Unknown,
    /// [`MAX_OUTSTANDING`] tickets wait to be used.
    TooMany,
}

impl std::fmt::Display for TicketError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TicketError::Unknown => f.write_str("ticket unknown, expired or already used"),
            TicketError::TooMany => write!(
                f,
                "{MAX_OUTSTANDING} tickets are waiting to be used; try again shortly"
            ),
        }
    }
}

/// The outstanding tickets of this instance.
#[derive(Debug)]
pub struct Tickets {
    ttl: Duration,
    outstanding: Mutex<HashMap<String, (Identity, Instant)>>,
}

impl Tickets {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            outstanding: Mutex::new(HashMap::new()),
        }
    }

    /// How long a ticket stays valid (`auth.ticket_ttl`).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new ticket for `identity`.
    pub fn issue(&self, identity: Identity) -> Result<String, TicketError> {
        self.issue_at(identity, Instant::now())
    }

    /// [`Self::issue`] at `now` (the tests' clock).
    fn issue_at(&self, identity: Identity, now: Instant) -> Result<String, TicketError> {
        let mut outstanding = self.outstanding.lock().expect("tickets lock");
        if outstanding.len() >= MAX_OUTSTANDING {
            outstanding.retain(|_, (_, expires)| *expires > now);
            if outstanding.len() >= MAX_OUTSTANDING {
                return Err(TicketError::TooMany);
            }
        }
        let ticket = uuid::Uuid::new_v4().simple().to_string();
        outstanding.insert(ticket.clone(), (identity, now + self.ttl));
        Ok(ticket)
    }

    /// The identity `ticket` stands for, once: the ticket is gone after.
    pub fn redeem(&self, ticket: &str) -> Result<Identity, TicketError> {
        let taken = self
            .outstanding
            .lock()
            .expect("tickets lock")
            .remove(ticket);
        match taken {
            Some((identity, expires)) if expires > Instant::now() => Ok(identity),
            _ => Err(TicketError::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{auth::ChannelGrant, message::UserId};

    fn identity(user: &str) -> Identity {
        Identity {
            user: UserId::new(user).unwrap(),
            channels: ChannelGrant::Listed(["news".to_string()].into()),
            expires_at: None,
        }
    }

    #[test]
    fn a_ticket_works_once() {
        let tickets = Tickets::new(Duration::from_secs(30));
        let ticket = tickets.issue(identity("1")).unwrap();
        assert_eq!(ticket.len(), 32);
        let redeemed = tickets.redeem(&ticket).unwrap();
        assert_eq!(redeemed.user.as_str(), "1");
        assert!(redeemed.channels.allows("news"));
        assert_eq!(tickets.redeem(&ticket).unwrap_err(), TicketError::Unknown);
        assert_eq!(tickets.redeem("made-up").unwrap_err(), TicketError::Unknown);
    }

    #[test]
    fn an_expired_ticket_is_unknown() {
        let tickets = Tickets::new(Duration::from_millis(1));
        let ticket = tickets.issue(identity("1")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(tickets.redeem(&ticket).unwrap_err(), TicketError::Unknown);
    }

    #[test]
    fn outstanding_tickets_are_bounded_and_expired_ones_make_room() {
        // One clock for the whole test: none expires while the map fills,
        // however slow the machine (it used to be real time, and a loaded
        // machine took over the 2 s ttl to fill it).
        let tickets = Tickets::new(Duration::from_secs(2));
        let start = Instant::now();
        for _ in 0..MAX_OUTSTANDING {
            tickets.issue_at(identity("1"), start).unwrap();
        }
        assert_eq!(
            tickets.issue_at(identity("1"), start).unwrap_err(),
            TicketError::TooMany
        );
        let later = start + Duration::from_millis(2100);
        assert!(tickets.issue_at(identity("1"), later).is_ok());
    }
}
