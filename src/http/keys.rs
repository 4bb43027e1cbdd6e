//! API keys for the side port: `Authorization: Bearer K` or `Token K`
//! (the latter is what Django REST framework clients send).

use axum::http::{header, HeaderMap};

use super::ApiError;
use crate::config::HttpConfig;

/// The configured keys.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    api: Vec<String>,
    admin: Vec<String>,
    allow_anonymous: bool,
}

impl ApiKeys {
    pub fn from_config(config: &HttpConfig) -> Self {
        Self {
            api: config.api_keys.clone(),
            admin: config.admin_keys.clone(),
            allow_anonymous: config.allow_anonymous,
        }
    }

    /// For the send endpoint: an API key (or an admin key), or nothing at
    /// all when `http.allow_anonymous` is set.
    pub fn check_sender(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.allow_anonymous {
            return Ok(());
        }
        let key = presented(headers)?;
        if self.api.iter().chain(&self.admin).any(|k| same(k, key)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("the API key is not valid"))
        }
    }

    /// For admin routes: an admin key, nothing else.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let key = presented(headers)?;
        if self.admin.iter().any(|k| same(k, key)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("an admin key is required"))
        }
    }

    /// Whether the send endpoint can accept anything at all.
    pub fn sender_possible(&self) -> bool {
        self.allow_anonymous || !self.api.is_empty() || !self.admin.is_empty()
    }
}

/// The key of `Authorization: Bearer KEY` or `Token KEY`.
fn presented(headers: &HeaderMap) -> Result<&str, ApiError> {
    crate::auth::credentials(headers, &["bearer", "token"]).ok_or_else(|| {
        ApiError::unauthorized(if headers.contains_key(header::AUTHORIZATION) {
            "Authorization must be `Bearer KEY` or `Token KEY`"
        } else {
            "send Authorization: Bearer KEY (or Token KEY)"
        })
    })
}

/// Compares in time independent of where the strings differ.
fn same(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn bearer_and_token_schemes() {
        let keys = ApiKeys {
            api: vec!["k1".into()],
            admin: vec!["adm".into()],
            allow_anonymous: false,
        };
        assert!(keys.check_sender(&headers("Bearer k1")).is_ok());
        assert!(keys.check_sender(&headers("Token k1")).is_ok());
        assert!(keys.check_sender(&headers("Bearer adm")).is_ok());
        assert!(keys.check_sender(&headers("Bearer k2")).is_err());
        assert!(keys.check_sender(&headers("Basic k1")).is_err());
        assert!(keys.check_sender(&HeaderMap::new()).is_err());
        assert!(keys.check_admin(&headers("Bearer k1")).is_err());
        assert!(keys.check_admin(&headers("Token adm")).is_ok());
        assert!(!same("abc", "abcd") && !same("abcd", "abc") && same("abc", "abc"));
    }
}
