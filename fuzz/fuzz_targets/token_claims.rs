//! Token verification, `notify_bridge::auth::Authenticator::verify`, on
//! fuzzed claims: the input is the claims' JSON text, signed here with the
//! configured HS256 secret (a fuzzer cannot forge a signature, so this is how
//! it reaches everything after the signature check: `exp`, `nbf`, the user
//! claim and `channels`, with any JSON value or number in them).
//!
//! Beyond "no panic" (an `exp` of 2^63 once panicked and dropped the
//! handshake), the oracle is the contract's rule for times, with the leeway:
//! - an accepted token has a u64 `exp` no earlier than now − leeway, and an
//!   `nbf`, when it is a u64, no later than now + leeway (a token whose
//!   `nbf` lay a day ahead was once accepted);
//! - its `expires_at` is exactly `exp` when a `SystemTime` can hold it, and
//!   `None` (never) only when it cannot;
//! - a token with a plain user, a far `exp` and no other claims is accepted.
//!
//! Found by this target: `"exp": 1e10` was accepted (jsonwebtoken rounds a
//! float NumericDate) but the bridge read it as "no expiry", so the session
//! was never closed at `exp`.
#![no_main]

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use libfuzzer_sys::fuzz_target;
use notify_bridge::{
    auth::{Authenticator, LEEWAY_SECS},
    config::AuthConfig,
};
use serde_json::{Map, Value};

const SECRET: &str = "fuzz-secret-0123456789";

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        Authenticator::from_config(&AuthConfig {
            jwt_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        })
        .expect("valid auth")
    })
}

fn sign(claims: &Map<String, Value>) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("any JSON object signs")
}

/// A JWT NumericDate as jsonwebtoken reads it (written here from its
/// documented rule, not taken from the bridge): an integer, or a finite
/// non-negative number rounded to whole seconds.
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        let secs = value.as_f64()?;
        (secs.is_finite() && secs >= 0.0 && secs < u64::MAX as f64).then(|| secs.round() as u64)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(Value::Object(claims)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let verdict = authenticator().verify(&sign(&claims));

    let exp = claims.get("exp").and_then(numeric_date);
    let nbf = claims.get("nbf").and_then(numeric_date);
    if let Ok(identity) = &verdict {
        let exp = exp.expect("accepted without a NumericDate exp");
        assert!(exp.saturating_add(LEEWAY_SECS) >= now, "expired exp {exp} accepted");
        if let Some(nbf) = nbf {
            assert!(nbf <= now + LEEWAY_SECS, "nbf {nbf} ahead of now {now} accepted");
        }
        let representable = UNIX_EPOCH.checked_add(Duration::from_secs(exp));
        if claims["exp"].is_u64() {
            assert_eq!(identity.expires_at, representable, "expires_at for exp {exp}");
        } else {
            // A float goes through serde_json twice (signing, then
            // verifying), whose float parsing may land one ULP away: equal
            // within a relative 1e-12, or absent only when unrepresentable.
            let got = identity.expires_at.map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
            match (got, representable) {
                (Some(got), Some(_)) => {
                    let diff = got.abs_diff(exp) as f64;
                    assert!(diff <= exp as f64 * 1e-12 + 1.0, "expires_at {got} for exp {exp}");
                }
                (None, None) | (None, Some(_)) if exp > (1u64 << 62) => {}
                (got, want) => panic!("expires_at {got:?} for exp {exp} (want {want:?})"),
            }
        }
    }

    // The plain case must pass: a string user, a future exp, nothing else.
    if claims.len() == 2 {
        let user_ok = claims
            .get("sub")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.trim().is_empty());
        if user_ok && exp.is_some_and(|e| e > now + LEEWAY_SECS) {
            assert!(verdict.is_ok(), "{claims:?} refused: {verdict:?}");
        }
    }
});
