//! Connection ids: a number inside the process (the router's map key), a
//! name outside it. A single instance names connection 7 `c-7`; in cluster
//! mode the name carries the instance, `c-<instance>-7`, so an admin call or
//! a `connection_id` target on any instance finds the one that holds it.

use std::sync::Arc;

/// Numeric connection id, unique within one process's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// Logs show the single-instance form; people and clients see
/// [`ConnectionNames::name`].
impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c-{}", self.0)
    }
}

/// How this instance names its connections and recognises its own names.
#[derive(Debug, Clone, Default)]
pub struct ConnectionNames {
    instance: Option<Arc<str>>,
}

impl ConnectionNames {
    /// `instance` is `Some` in cluster mode.
    pub fn new(instance: Option<&str>) -> Self {
        Self {
            instance: instance.map(Arc::from),
        }
    }

    /// The instance's id in cluster mode.
    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// The id as the welcome frame and the admin API show it.
    pub fn name(&self, id: ConnectionId) -> String {
        match &self.instance {
            Some(instance) => format!("c-{instance}-{}", id.0),
            None => format!("c-{}", id.0),
        }
    }

    /// The id of one of this instance's connections; `None` for a
    /// malformed name or another instance's.
    pub fn parse(&self, name: &str) -> Option<ConnectionId> {
        let (instance, n) = split(name)?;
        (instance == self.instance.as_deref()).then_some(ConnectionId(n))
    }
}

/// The instance part of a cluster connection name (`c-<instance>-<n>`), to
/// route a call to the instance that holds it.
pub fn instance_of(name: &str) -> Option<&str> {
    split(name).and_then(|(instance, _)| instance)
}

fn split(name: &str) -> Option<(Option<&str>, u64)> {
    let rest = name.strip_prefix("c-")?;
    let (instance, n) = match rest.rsplit_once('-') {
        Some((instance, n)) if !instance.is_empty() => (Some(instance), n),
        Some(_) => return None,
        None => (None, rest),
    };
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((instance, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_other_instances_are_not_ours() {
        let single = ConnectionNames::new(None);
        assert_eq!(single.name(ConnectionId(42)), "c-42");
        assert_eq!(single.parse("c-42"), Some(ConnectionId(42)));
        for bad in ["42", "c-", "c-x", "c--4", "c-+4", "c-a-4"] {
            assert_eq!(single.parse(bad), None, "{bad}");
        }
        let a = ConnectionNames::new(Some("host-a.1"));
        assert_eq!(a.name(ConnectionId(7)), "c-host-a.1-7");
        assert_eq!(a.parse("c-host-a.1-7"), Some(ConnectionId(7)));
        assert_eq!(a.parse("c-host-b-7"), None);
        assert_eq!(a.parse("c-7"), None);
        assert_eq!(instance_of("c-host-a.1-7"), Some("host-a.1"));
        assert_eq!(instance_of("c-7"), None);
    }
}
