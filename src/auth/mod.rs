//! Who a WebSocket client is: JWT verification (HS256 with a shared secret,
//! RS256/ES256 with a public key file) and minting for the `token` command.
//!
//! Each key only verifies its own algorithm family, so an RSA public key can
//! never be used as an HMAC secret (algorithm confusion), and `alg: none` is
//! never accepted.

use std::{
    collections::HashSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header,
    Validation,
};
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::http;

use crate::{
    config::{AuthConfig, AuthMode, ConfigError},
    message::UserId,
};

mod identity;
pub mod tickets;

pub use identity::{ChannelGrant, Identity};
use tickets::Tickets;

/// The most clock skew tolerated on `exp` and `nbf` (the contract allows up
/// to 60 s).
pub const LEEWAY_SECS: u64 = 30;

/// Verifies tokens with the configured keys.
pub struct Authenticator {
    mode: AuthMode,
    user_claim: String,
    /// `auth.cookie_name`, when cookie authentication is on.
    cookie_name: Option<String>,
    /// One-time tickets issued for verified tokens (`POST /api/ws-ticket`).
    tickets: Tickets,
    hmac: Option<(DecodingKey, Validation)>,
    public: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("user_claim", &self.user_claim)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the verifier; a key file that cannot be read or parsed is a
    /// configuration error naming `auth.jwt_public_key_file`.
    pub fn from_config(config: &AuthConfig) -> Result<Self, ConfigError> {
        let hmac = config.jwt_secret.as_ref().map(|secret| {
            let mut v = validation(config, AlgorithmFamily::Hmac);
            v.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
            (DecodingKey::from_secret(secret.as_bytes()), v)
        });
        let public = match &config.jwt_public_key_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::key(
                        "auth.jwt_public_key_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    let mut v = validation(config, AlgorithmFamily::Rsa);
                    v.algorithms = vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
                    Some((key, v))
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    let mut v = validation(config, AlgorithmFamily::Ec);
                    v.algorithms = vec![Algorithm::ES256, Algorithm::ES384];
                    Some((key, v))
                } else {
                    return Err(ConfigError::key(
                        "auth.jwt_public_key_file",
                        format!(
                            "{} is not an RSA or EC public key in PEM form",
                            path.display()
                        ),
                    ));
                }
            }
        };
        Ok(Self {
            mode: config.mode,
            user_claim: config.user_claim.clone(),
            cookie_name: Some(config.cookie_name.clone()).filter(|name| !name.is_empty()),
            tickets: Tickets::new(config.ticket_ttl),
            hmac,
            public,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The one-time tickets that stand for tokens this instance verified.
    pub fn tickets(&self) -> &Tickets {
        &self.tickets
    }

    /// The cookie that may carry a token (`auth.cookie_name`), if any.
    pub fn cookie_name(&self) -> Option<&str> {
        self.cookie_name.as_deref()
    }

    /// Verifies a token and extracts the user and channel grant.
    pub fn verify(&self, token: &str) -> Result<Identity, String> {
        let header = decode_header(token).map_err(|_| "malformed token".to_string())?;
        let (key, validation) = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.hmac.as_ref(),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::ES256
            | Algorithm::ES384 => self.public.as_ref(),
            _ => None,
        }
        .ok_or_else(|| format!("token algorithm {:?} is not accepted", header.alg))?;
        let data = decode::<Map<String, Value>>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => "token expired".to_string(),
                ErrorKind::InvalidSignature => "bad token signature".to_string(),
                ErrorKind::InvalidAudience => "token audience not accepted".to_string(),
                ErrorKind::InvalidIssuer => "token issuer not accepted".to_string(),
                ErrorKind::MissingRequiredClaim(claim) => {
                    format!("token lacks the `{claim}` claim")
                }
                ErrorKind::InvalidAlgorithm => "token algorithm not accepted".to_string(),
                ErrorKind::ImmatureSignature => "token not valid yet".to_string(),
                _ => "invalid token".to_string(),
            }
        })?;
        let claims = data.claims;
        let user = claims
            .get(&self.user_claim)
            .and_then(UserId::from_json)
            .ok_or_else(|| {
                format!(
                    "token claim `{}` must be an integer or a non-empty string",
                    self.user_claim
                )
            })?;
        let channels = match claims.get("channels") {
            None | Some(Value::Null) => HashSet::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|c| c.as_str().map(String::from))
                .collect::<Option<HashSet<_>>>()
                .ok_or("token claim `channels` must be an array of strings")?,
            Some(_) => return Err("token claim `channels` must be an array of strings".into()),
        };
        // jsonwebtoken has checked `exp` already; past what a `SystemTime`
        // holds (about 2^63 s) it is a far-future time, not a panic that
        // drops the handshake.
        let expires_at = claims
            .get("exp")
            .and_then(numeric_date)
            .and_then(|exp| UNIX_EPOCH.checked_add(Duration::from_secs(exp)));
        Ok(Identity {
            user,
            channels: ChannelGrant::Listed(channels),
            expires_at,
        })
    }
}

/// The token of an `Authorization: Bearer T` header (the scheme in any
/// case), for the handshake and the side port's user routes alike.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    credentials(headers, &["bearer"])
}

/// The credentials of an `Authorization: SCHEME CREDENTIALS` header whose
/// scheme is one of `schemes` (in any case), trimmed and not empty: the
/// one parser behind users' tokens and the side port's keys.
pub fn credentials<'h>(headers: &'h http::HeaderMap, schemes: &[&str]) -> Option<&'h str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, given) = value.trim().split_once(' ')?;
    let known = schemes.iter().any(|s| scheme.eq_ignore_ascii_case(s));
    (known && !given.trim().is_empty()).then(|| given.trim())
}

/// A JWT NumericDate as jsonwebtoken reads it when it validates `exp`: an
/// integer, or a finite non-negative number rounded to whole seconds (the
/// token-claims fuzzer found `"exp": 1e10` accepted there but read as "no
/// expiry" here, so such a session was never closed at `exp`).
pub fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        let secs = value.as_f64()?;
        (secs.is_finite() && secs >= 0.0 && secs < u64::MAX as f64).then(|| secs.round() as u64)
    })
}

fn validation(config: &AuthConfig, family: AlgorithmFamily) -> Validation {
    let mut v = Validation::new_for_family(family);
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    // Off by default in jsonwebtoken: a token whose `nbf` lies ahead (past
    // the leeway) is not valid yet.
    v.validate_nbf = true;
    // jsonwebtoken checks `aud` and `iss` only when the token has them: a
    // configured audience or issuer must also make the claim required, or
    // a token without it (minted for another service, say) would pass.
    let mut required = vec!["exp"];
    match &config.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = &config.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

/// Mints an HS256 token for `user`, as the `token` command and the demo page do.
pub fn mint(
    config: &AuthConfig,
    user: &str,
    channels: &[String],
    ttl: Duration,
) -> anyhow::Result<String> {
    let secret = config.jwt_secret.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "auth.jwt_secret is not set: tokens can only be minted with a shared secret \
             (set NOTIFY_BRIDGE_AUTH__JWT_SECRET or auth.jwt_secret)"
        )
    })?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut claims = Map::new();
    claims.insert(config.user_claim.clone(), Value::String(user.to_string()));
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl.as_secs().max(1)).into());
    if !channels.is_empty() {
        claims.insert("channels".into(), channels.to_vec().into());
    }
    if let Some(aud) = &config.audience {
        claims.insert("aud".into(), Value::String(aud.clone()));
    }
    if let Some(iss) = &config.issuer {
        claims.insert("iss".into(), Value::String(iss.clone()));
    }
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_authorization_parser() {
        let header = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        let both = ["bearer", "token"];
        assert_eq!(bearer_token(&header("Bearer T")), Some("T"));
        assert_eq!(bearer_token(&header(" bEaReR   T ")), Some("T"));
        assert_eq!(bearer_token(&header("Token T")), None);
        assert_eq!(bearer_token(&header("Bearer ")), None);
        assert_eq!(bearer_token(&header("BearerT")), None);
        assert_eq!(bearer_token(&http::HeaderMap::new()), None);
        assert_eq!(credentials(&header("Token K"), &both), Some("K"));
        assert_eq!(credentials(&header("bearer K L"), &both), Some("K L"));
        assert_eq!(credentials(&header("Basic K"), &both), None);
    }

    fn config() -> AuthConfig {
        AuthConfig {
            jwt_secret: Some("test-secret-0123456789".into()),
            ..AuthConfig::default()
        }
    }

    fn b64(bytes: &[u8]) -> String {
        use std::fmt::Write;
        // Minimal base64url without padding, enough for hand-made test tokens.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                let _ = write!(out, "{}", T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn minted_tokens_verify() {
        let auth = Authenticator::from_config(&config()).unwrap();
        let token = mint(&config(), "42", &["news".into()], Duration::from_secs(60)).unwrap();
        let id = auth.verify(&token).unwrap();
        assert_eq!(id.user.as_str(), "42");
        assert!(id.channels.allows("news"));
        assert!(!id.channels.allows("other"));
        assert!(id.expires_at.unwrap() > SystemTime::now());
    }

    #[test]
    fn wrong_secret_and_expired_tokens_are_refused() {
        let auth = Authenticator::from_config(&config()).unwrap();
        let other = AuthConfig {
            jwt_secret: Some("another-secret-0123456".into()),
            ..AuthConfig::default()
        };
        let token = mint(&other, "1", &[], Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&token).unwrap_err().contains("signature"));

        let mut claims = Map::new();
        claims.insert("sub".into(), "1".into());
        claims.insert("exp".into(), 1_000u64.into());
        let expired = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"test-secret-0123456789"),
        )
        .unwrap();
        assert!(auth.verify(&expired).unwrap_err().contains("expired"));
    }

    #[test]
    fn missing_exp_and_alg_none_are_refused() {
        let auth = Authenticator::from_config(&config()).unwrap();
        let mut claims = Map::new();
        claims.insert("sub".into(), "1".into());
        let no_exp = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"test-secret-0123456789"),
        )
        .unwrap();
        assert!(auth.verify(&no_exp).unwrap_err().contains("exp"));

        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(br#"{"sub":"1","exp":9999999999}"#)
        );
        assert!(auth.verify(&none).is_err());
        assert!(auth.verify("garbage").is_err());
    }

    #[test]
    fn a_configured_audience_and_issuer_are_required() {
        let cfg = AuthConfig {
            audience: Some("notify".into()),
            issuer: Some("https://login.example".into()),
            ..config()
        };
        let auth = Authenticator::from_config(&cfg).unwrap();
        let sign = |claims: Value| {
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"test-secret-0123456789"),
            )
            .unwrap()
        };
        let exp = 9_999_999_999u64;
        let iss = "https://login.example";
        let ok = sign(serde_json::json!({"sub": "1", "exp": exp, "aud": "notify", "iss": iss}));
        assert_eq!(auth.verify(&ok).unwrap().user.as_str(), "1");
        let no_aud = sign(serde_json::json!({"sub": "1", "exp": exp, "iss": iss}));
        assert!(auth.verify(&no_aud).unwrap_err().contains("`aud`"));
        let no_iss = sign(serde_json::json!({"sub": "1", "exp": exp, "aud": "notify"}));
        assert!(auth.verify(&no_iss).unwrap_err().contains("`iss`"));
        // Minted tokens carry both.
        let minted = mint(&cfg, "2", &[], Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&minted).unwrap().user.as_str(), "2");
    }

    #[test]
    fn integer_sub_and_custom_claim() {
        let cfg = AuthConfig {
            user_claim: "uid".into(),
            ..config()
        };
        let auth = Authenticator::from_config(&cfg).unwrap();
        let mut claims = Map::new();
        claims.insert("uid".into(), 7.into());
        claims.insert("exp".into(), 9_999_999_999u64.into());
        let token = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"test-secret-0123456789"),
        )
        .unwrap();
        assert_eq!(auth.verify(&token).unwrap().user.as_str(), "7");
    }

    fn signed(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"test-secret-0123456789"),
        )
        .unwrap()
    }

    #[test]
    fn nbf_is_honoured_with_the_leeway() {
        let auth = Authenticator::from_config(&config()).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let exp = now + 3600;
        let ahead = signed(serde_json::json!({"sub": "1", "exp": exp, "nbf": now + 86_400}));
        assert!(auth.verify(&ahead).unwrap_err().contains("not valid yet"));
        let within_leeway = signed(serde_json::json!({"sub": "1", "exp": exp, "nbf": now + 10}));
        assert!(auth.verify(&within_leeway).is_ok());
        let past = signed(serde_json::json!({"sub": "1", "exp": exp, "nbf": now - 10}));
        assert!(auth.verify(&past).is_ok());
        let far = signed(serde_json::json!({"sub": "1", "exp": exp, "nbf": u64::MAX}));
        assert!(auth.verify(&far).unwrap_err().contains("not valid yet"));
    }

    #[test]
    fn an_exp_beyond_any_representable_time_is_far_future_or_refused() {
        let auth = Authenticator::from_config(&config()).unwrap();
        for exp in [1u64 << 63, (1u64 << 63) + 5, u64::MAX] {
            let token = signed(serde_json::json!({"sub": "1", "exp": exp}));
            let id = auth.verify(&token).unwrap();
            // Either a time the session can wait for, or none at all.
            if let Some(at) = id.expires_at {
                assert!(at > SystemTime::now() + Duration::from_secs(86_400 * 365 * 1000));
            }
        }
        // A number with a fraction counts as whole seconds, as jsonwebtoken
        // validated it: the session closes at that time.
        let soon = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 100;
        let token = signed(serde_json::json!({"sub": "1", "exp": soon as f64 + 0.4}));
        let at = auth.verify(&token).unwrap().expires_at;
        assert_eq!(at, Some(UNIX_EPOCH + Duration::from_secs(soon)));
        // Not a usable number at all: refused, never a panic.
        for exp in [
            serde_json::json!(1e30),
            serde_json::json!(-1),
            serde_json::json!("soon"),
        ] {
            let token = signed(serde_json::json!({"sub": "1", "exp": exp}));
            assert!(auth.verify(&token).is_err(), "{exp}");
        }
    }
}
