//! Deciding, from the HTTP upgrade request alone, who a client is and what
//! it may join: path, query, headers, subprotocol, origin, channels. The
//! result is an [`Admission`] or an [`ApiError`] that becomes a plain HTTP
//! response with the contract's JSON body.

use std::time::SystemTime;

use percent_encoding::percent_decode_str;
use tokio_tungstenite::tungstenite::http::{self, HeaderMap};

use crate::{
    auth::{tickets::TicketError, Authenticator, ChannelGrant, Identity},
    config::{AuthMode, WebSocketConfig},
    error::ApiError,
    message::UserId,
    metrics::Limit,
    query,
};

/// The longest channel name, in bytes (CONTRACT.md: 1–255).
pub const MAX_CHANNEL_NAME_BYTES: usize = 255;

/// The subprotocol that carries a token: `Sec-WebSocket-Protocol: bearer, T`.
pub const BEARER_PROTOCOL: &str = "bearer";

/// What the handshake settled about a client.
#[derive(Debug)]
pub struct Admission {
    pub user: UserId,
    /// Channels joined at connect (`?channel=`), already authorised; the
    /// session keeps it as the list of channels it holds.
    pub channels: Vec<String>,
    pub grant: ChannelGrant,
    pub expires_at: Option<SystemTime>,
    /// Whether to answer `Sec-WebSocket-Protocol: bearer`.
    pub bearer_protocol: bool,
    /// `?since=N`: replay inbox entries with `seq > N` first.
    pub since: Option<u64>,
}

/// Everything the handshake decision depends on besides the request.
pub struct HandshakePolicy<'a> {
    settings: &'a WebSocketConfig,
    auth: &'a Authenticator,
}

impl<'a> HandshakePolicy<'a> {
    /// The policy of a listener: its settings (public channel patterns
    /// compiled at load) and its token verifier.
    pub fn new(settings: &'a WebSocketConfig, auth: &'a Authenticator) -> Self {
        Self { settings, auth }
    }

    /// Decides on one upgrade request.
    pub fn admit(&self, uri: &http::Uri, headers: &HeaderMap) -> Result<Admission, ApiError> {
        self.admit_redeemed(uri, headers, None)
    }

    /// Like [`HandshakePolicy::admit`], with the request's `?ticket=`
    /// already redeemed elsewhere (the cluster's shared store, which is
    /// async): that outcome stands for the ticket.
    pub fn admit_redeemed(
        &self,
        uri: &http::Uri,
        headers: &HeaderMap,
        redeemed: Option<Result<Identity, TicketError>>,
    ) -> Result<Admission, ApiError> {
        let path_user = self.path_user(uri.path())?;
        let query = query::parse(uri.query().unwrap_or(""));
        let since = since_of(&query)?;
        self.check_origin(headers)?;
        let offered_bearer = protocol_token(headers);
        let bearer_protocol = offered_bearer.is_some();
        let identity = match self.auth.mode() {
            AuthMode::Jwt => {
                let identity =
                    self.jwt_identity(&query, headers, offered_bearer.as_deref(), redeemed)?;
                self.check_claim(&identity.channels)?;
                same_user_as_path(&identity, path_user.as_ref())?;
                identity
            }
            AuthMode::None => anonymous_identity(&query, path_user)?,
        };
        let channels = self.requested_channels(&identity, &query)?;
        Ok(Admission {
            user: identity.user,
            channels,
            grant: identity.channels,
            expires_at: identity.expires_at,
            bearer_protocol,
            since,
        })
    }

    /// A browser's `Origin` must be allowed (clients that send none pass).
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match header(headers, "origin") {
            Some(origin) if !origin_allowed(&self.settings.allowed_origins, origin) => {
                Err(ApiError::forbidden(format!(
                    "origin {origin} is not in websocket.allowed_origins"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The `?channel=` names, each checked against the grant and the
    /// limits, in order, without repeats.
    fn requested_channels(
        &self,
        identity: &Identity,
        query: &[(String, String)],
    ) -> Result<Vec<String>, ApiError> {
        let mut channels: Vec<String> = Vec::new();
        for (_, value) in query.iter().filter(|(key, _)| key == "channel") {
            self.check_join(&identity.channels, value, &channels)?;
            if !channels.contains(value) {
                channels.push(value.clone());
            }
        }
        Ok(channels)
    }

    /// Who a client is in `auth.mode = "jwt"`, from the first of: the
    /// `Authorization` header, `?token=`, the bearer subprotocol, a one-time
    /// `?ticket=` (which stands for the token it was issued for), and the
    /// `auth.cookie_name` cookie.
    fn jwt_identity(
        &self,
        query: &[(String, String)],
        headers: &HeaderMap,
        offered_bearer: Option<&str>,
        redeemed: Option<Result<Identity, TicketError>>,
    ) -> Result<Identity, ApiError> {
        let token = crate::auth::bearer_token(headers)
            .or_else(|| query::value(query, "token"))
            .or(offered_bearer.filter(|t| !t.is_empty()));
        if let Some(token) = token {
            return self.auth.verify(token).map_err(ApiError::unauthorized);
        }
        if let Some(ticket) = query::value(query, "ticket") {
            let identity = redeemed
                .unwrap_or_else(|| self.auth.tickets().redeem(ticket))
                .map_err(|e| ApiError::unauthorized(e.to_string()))?;
            if identity
                .expires_at
                .is_some_and(|at| at <= SystemTime::now())
            {
                return Err(ApiError::unauthorized("token expired"));
            }
            return Ok(identity);
        }
        let cookie = self
            .auth
            .cookie_name()
            .and_then(|name| cookie_token(headers, name))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "no token: send Authorization: Bearer T, ?token=T, \
                     Sec-WebSocket-Protocol: bearer, T, or ?ticket=K",
                )
            })?;
        self.auth.verify(&cookie).map_err(ApiError::unauthorized)
    }

    /// The one rule for joining a channel, at connect (`?channel=`) and in
    /// `subscribe` alike: a name of 1–255 bytes (400), allowed by the token
    /// or a public pattern (403), and room under
    /// `websocket.max_channels_per_connection` beside the channels already
    /// `held` (403; joining a held channel again needs no room).
    pub fn check_join(
        &self,
        grant: &ChannelGrant,
        channel: &str,
        held: &[String],
    ) -> Result<(), ApiError> {
        if channel.is_empty() {
            return Err(ApiError::bad_request("`channel` must not be empty"));
        }
        if channel.len() > MAX_CHANNEL_NAME_BYTES {
            return Err(ApiError::bad_request(format!(
                "a channel name is at most {MAX_CHANNEL_NAME_BYTES} bytes, this one is {}",
                channel.len()
            ))
            .for_limit(Limit::ChannelName));
        }
        if !self.may_join(grant, channel) {
            return Err(ApiError::forbidden(format!(
                "channel {channel} is not allowed"
            )));
        }
        let max = self.settings.max_channels_per_connection;
        if held.len() >= max && !held.iter().any(|c| c == channel) {
            return Err(ApiError::forbidden(format!(
                "a connection holds at most {max} channels (websocket.max_channels_per_connection)"
            ))
            .for_limit(Limit::MaxChannels));
        }
        Ok(())
    }

    /// A token's `channels` claim obeys the same limits as joined channels:
    /// at most `websocket.max_channels_per_connection` names of 1–255 bytes,
    /// so one token cannot make a connection hold an unbounded grant.
    fn check_claim(&self, grant: &ChannelGrant) -> Result<(), ApiError> {
        let ChannelGrant::Listed(claimed) = grant else {
            return Ok(());
        };
        let max = self.settings.max_channels_per_connection;
        if claimed.len() > max {
            return Err(ApiError::forbidden(format!(
                "the token's `channels` claim lists {} channels, more than \
                 websocket.max_channels_per_connection ({max})",
                claimed.len()
            ))
            .for_limit(Limit::MaxChannels));
        }
        if claimed
            .iter()
            .any(|c| c.is_empty() || c.len() > MAX_CHANNEL_NAME_BYTES)
        {
            return Err(ApiError::forbidden(format!(
                "the token's `channels` claim holds a name outside 1 to \
                 {MAX_CHANNEL_NAME_BYTES} bytes"
            ))
            .for_limit(Limit::ChannelName));
        }
        Ok(())
    }

    /// A channel may be joined if the token lists it or it matches one of
    /// `websocket.public_channels`.
    pub fn may_join(&self, grant: &ChannelGrant, channel: &str) -> bool {
        grant.allows(channel)
            || self
                .settings
                .public_channels
                .iter()
                .any(|pattern| pattern.matches(channel))
    }

    /// `None` for the endpoint itself; the last non-empty segment for a
    /// path below it (older clients: `/ws/1`, `/ws/notifications/1/`).
    fn path_user(&self, path: &str) -> Result<Option<UserId>, ApiError> {
        let base = self.settings.path.trim_end_matches('/');
        let path = path.trim_end_matches('/');
        if path == base {
            return Ok(None);
        }
        let below = path
            .strip_prefix(base)
            .filter(|rest| rest.starts_with('/'))
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no WebSocket endpoint here; connect to {}",
                    self.settings.path
                ))
            })?;
        let last = below.rsplit('/').find(|s| !s.is_empty());
        // Percent escapes only: a `+` in a path is a plus, not a space.
        let last = last.map(|segment| percent_decode_str(segment).decode_utf8_lossy());
        Ok(last.as_deref().and_then(UserId::new))
    }
}

/// A path segment as it may appear in a refusal (and so in the debug log):
/// an older client that puts its token in the path (`/ws/<token>`) must not
/// get it written to the log, so anything longer than a user id plausibly
/// is, or shaped like a JWT, is not repeated.
fn shown(segment: &str) -> &str {
    if segment.len() > 64 || segment.matches('.').count() >= 2 {
        "[not shown: looks like a token]"
    } else {
        segment
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The value of cookie `name` in the request's `Cookie` headers, when it
/// is there and not empty.
fn cookie_token(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name && !c.value().is_empty())
        .map(|c| c.value().to_string())
}

/// `?since=`, when given: a non-negative integer.
fn since_of(query: &[(String, String)]) -> Result<Option<u64>, ApiError> {
    match query.iter().find(|(k, _)| k == "since") {
        None => Ok(None),
        Some((_, v)) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!("`since` must be a non-negative integer, not {v:?}"))
        }),
    }
}

/// A token's user must be the one the path names, if it names one.
fn same_user_as_path(identity: &Identity, path_user: Option<&UserId>) -> Result<(), ApiError> {
    match path_user {
        Some(path_user) if *path_user != identity.user => Err(ApiError::forbidden(format!(
            "the path names user {}, the token user {}",
            shown(path_user.as_str()),
            identity.user
        ))),
        _ => Ok(()),
    }
}

/// Who a client is in `auth.mode = "none"`: `?user_id=` or the path
/// (which must agree when both are given), with every channel allowed.
fn anonymous_identity(
    query: &[(String, String)],
    path_user: Option<UserId>,
) -> Result<Identity, ApiError> {
    let query_user = query::user_id(query);
    if let (Some(q), Some(p)) = (&query_user, &path_user) {
        if q != p {
            return Err(ApiError::forbidden(format!(
                "the path names user {p}, ?user_id names user {q}"
            )));
        }
    }
    let user = query_user.or(path_user).ok_or_else(|| {
        ApiError::unauthorized("auth.mode is \"none\": give ?user_id=U or connect to /ws/U")
    })?;
    Ok(Identity {
        user,
        channels: ChannelGrant::All,
        expires_at: None,
    })
}

/// The token of `Sec-WebSocket-Protocol: bearer, T`, when offered.
fn protocol_token(headers: &HeaderMap) -> Option<String> {
    let offered: Vec<&str> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let at = offered.iter().position(|p| *p == BEARER_PROTOCOL)?;
    Some(
        offered
            .get(at + 1)
            .map(|t| t.to_string())
            .unwrap_or_default(),
    )
}

fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    allowed.is_empty()
        || allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthConfig;
    use http::StatusCode;

    fn settings() -> WebSocketConfig {
        WebSocketConfig {
            allowed_origins: vec!["https://app.example".into()],
            public_channels: vec!["public:*".into()],
            ..WebSocketConfig::default()
        }
    }

    fn auth(mode: AuthMode) -> Authenticator {
        Authenticator::from_config(&AuthConfig {
            mode,
            jwt_secret: Some("handshake-secret-0123".into()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn token(user: &str, channels: &[&str]) -> String {
        let cfg = AuthConfig {
            jwt_secret: Some("handshake-secret-0123".into()),
            ..AuthConfig::default()
        };
        let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        crate::auth::mint(&cfg, user, &channels, std::time::Duration::from_secs(60)).unwrap()
    }

    fn admit(mode: AuthMode, uri: &str, headers: &[(&str, &str)]) -> Result<Admission, ApiError> {
        let settings = settings();
        let auth = auth(mode);
        let policy = HandshakePolicy::new(&settings, &auth);
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        policy.admit(&uri.parse().unwrap(), &map)
    }

    #[test]
    fn three_token_transports() {
        let t = token("1", &[]);
        assert_eq!(
            admit(AuthMode::Jwt, &format!("/ws?token={t}"), &[])
                .unwrap()
                .user
                .as_str(),
            "1"
        );
        let auth_header = format!("Bearer {t}");
        assert_eq!(
            admit(AuthMode::Jwt, "/ws", &[("authorization", &auth_header)])
                .unwrap()
                .user
                .as_str(),
            "1"
        );
        let proto = format!("bearer, {t}");
        let a = admit(AuthMode::Jwt, "/ws", &[("sec-websocket-protocol", &proto)]).unwrap();
        assert!(a.bearer_protocol);
        assert_eq!(a.user.as_str(), "1");
    }

    #[test]
    fn refusals_have_the_contract_statuses() {
        assert_eq!(admit(AuthMode::Jwt, "/ws", &[]).unwrap_err().status, 401);
        assert_eq!(
            admit(AuthMode::Jwt, "/ws?token=nonsense", &[])
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            admit(AuthMode::Jwt, "/elsewhere", &[]).unwrap_err().status,
            404
        );
        assert_eq!(admit(AuthMode::Jwt, "/wsx", &[]).unwrap_err().status, 404);
        let t = token("1", &[]);
        let e = admit(
            AuthMode::Jwt,
            &format!("/ws?token={t}"),
            &[("origin", "https://evil.example")],
        )
        .unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (403, "forbidden"));
        assert!(admit(
            AuthMode::Jwt,
            &format!("/ws?token={t}"),
            &[("origin", "https://app.example")]
        )
        .is_ok());
        let e = admit(AuthMode::Jwt, &format!("/ws?token={t}&channel=secret"), &[]).unwrap_err();
        assert_eq!(e.status, 403);
    }

    #[test]
    fn compatibility_paths_must_name_the_token_user() {
        let t = token("7", &[]);
        assert!(admit(AuthMode::Jwt, &format!("/ws/7?token={t}"), &[]).is_ok());
        assert!(admit(
            AuthMode::Jwt,
            &format!("/ws/notifications/7/?token={t}"),
            &[]
        )
        .is_ok());
        assert_eq!(
            admit(AuthMode::Jwt, &format!("/ws/8?token={t}"), &[])
                .unwrap_err()
                .status,
            403
        );
        assert!(admit(AuthMode::Jwt, &format!("/ws/?token={t}"), &[]).is_ok());
        // A token in the path is never repeated in the refusal.
        let e = admit(AuthMode::Jwt, &format!("/ws/{t}?token={t}"), &[]).unwrap_err();
        assert_eq!(e.status, 403);
        assert!(!e.detail.contains(&t), "{}", e.detail);
        assert!(!e.detail.contains(t.split('.').nth(2).unwrap()));
    }

    #[test]
    fn channels_from_claim_and_public_patterns() {
        let t = token("1", &["team-a"]);
        let a = admit(
            AuthMode::Jwt,
            &format!("/ws?token={t}&channel=team-a&channel=public:news"),
            &[],
        )
        .unwrap();
        assert_eq!(a.channels, vec!["team-a", "public:news"]);
    }

    #[test]
    fn none_mode_takes_the_user_from_the_url() {
        assert_eq!(
            admit(AuthMode::None, "/ws?user_id=5", &[])
                .unwrap()
                .user
                .as_str(),
            "5"
        );
        assert_eq!(
            admit(AuthMode::None, "/ws/6", &[]).unwrap().user.as_str(),
            "6"
        );
        assert_eq!(admit(AuthMode::None, "/ws", &[]).unwrap_err().status, 401);
        assert!(admit(AuthMode::None, "/ws?user_id=5&channel=anything", &[]).is_ok());
        assert!(admit(AuthMode::None, "/ws/5?user_id=5", &[]).is_ok());
        assert_eq!(
            admit(AuthMode::None, "/ws/6?user_id=5", &[])
                .unwrap_err()
                .status,
            403
        );
    }

    #[test]
    fn a_plus_in_the_path_is_a_plus() {
        // `+` means a space only in a query string (form encoding), never in
        // a path: `/ws/a+b` is user `a+b`, `/ws/a%20b` user `a b`.
        let user = |uri: &str| admit(AuthMode::None, uri, &[]).unwrap().user;
        assert_eq!(user("/ws/a+b").as_str(), "a+b");
        assert_eq!(user("/ws/a%2Bb").as_str(), "a+b");
        assert_eq!(user("/ws/a%20b").as_str(), "a b");
        assert_eq!(user("/ws?user_id=a+b").as_str(), "a b");
        // `?user_id=` is read as everywhere (query::user_id): the first not blank.
        assert_eq!(user("/ws?user_id=%20&user_id=5").as_str(), "5");
        let t = token("a+b", &[]);
        assert!(admit(AuthMode::Jwt, &format!("/ws/a+b?token={t}"), &[]).is_ok());
    }

    #[test]
    fn since_must_be_a_non_negative_integer() {
        let t = token("1", &[]);
        assert_eq!(
            admit(AuthMode::Jwt, &format!("/ws?token={t}&since=5"), &[])
                .unwrap()
                .since,
            Some(5)
        );
        assert_eq!(
            admit(AuthMode::Jwt, &format!("/ws?token={t}"), &[])
                .unwrap()
                .since,
            None
        );
        for bad in ["-1", "x", "", "1.5"] {
            let e = admit(AuthMode::Jwt, &format!("/ws?token={t}&since={bad}"), &[]).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (400, "bad_request"), "{bad}");
        }
    }

    #[test]
    fn public_patterns_are_star_and_question_mark_globs() {
        let t = token("1", &[]);
        let joins = |pattern: &str, channel: &str| {
            let settings = WebSocketConfig {
                public_channels: vec![pattern.into()],
                ..WebSocketConfig::default()
            };
            let auth = auth(AuthMode::Jwt);
            let uri = format!("/ws?token={t}&channel={}", urlencode(channel));
            HandshakePolicy::new(&settings, &auth)
                .admit(&uri.parse().unwrap(), &HeaderMap::new())
                .is_ok()
        };
        assert!(joins("public:*", "public:news"));
        assert!(joins("a?c", "abc") && !joins("a?c", "ac") && !joins("a?c", "abbc"));
        assert!(!joins("public:*", "private:x"));
        assert!(joins("*", "*b") && joins("*", "a/b"));
        assert!(joins("public:*", "public:*x"));
        assert!(!joins("public:*", "private:*"));
        // `[`, `{` and `\` are plain characters, not glob syntax.
        assert!(joins("[ab]", "[ab]") && !joins("[ab]", "a"));
        assert!(joins("{a,b}", "{a,b}") && !joins("{a,b}", "a"));
        assert!(joins("a\\*", "a\\x"));
        assert!(!joins("Public:*", "public:x"));
    }

    fn urlencode(text: &str) -> String {
        form_urlencoded::byte_serialize(text.as_bytes()).collect()
    }

    #[test]
    fn channel_names_are_1_to_255_bytes() {
        let t = token("1", &[]);
        let ok = format!("public:{}", "n".repeat(255 - 7));
        let a = admit(AuthMode::Jwt, &format!("/ws?token={t}&channel={ok}"), &[]).unwrap();
        assert_eq!(a.channels, vec![ok.clone()]);
        let long = format!("{ok}n");
        let e = admit(AuthMode::Jwt, &format!("/ws?token={t}&channel={long}"), &[]).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "bad_request"));
        assert_eq!(e.limit, Some(Limit::ChannelName));
        assert!(e.detail.contains("255"), "{}", e.detail);
        // The name is not echoed: it could be 64 KiB.
        assert!(!e.detail.contains(&long));
    }

    #[test]
    fn a_connection_joins_at_most_max_channels_per_connection() {
        let t = token("1", &[]);
        let query =
            |n: usize| -> String { (0..n).map(|i| format!("&channel=public:{i}")).collect() };
        let a = admit(AuthMode::Jwt, &format!("/ws?token={t}{}", query(128)), &[]).unwrap();
        assert_eq!(a.channels.len(), 128);
        // The same channel twice takes one place.
        let again = format!("/ws?token={t}{}&channel=public:0", query(128));
        assert_eq!(
            admit(AuthMode::Jwt, &again, &[]).unwrap().channels.len(),
            128
        );
        let e = admit(AuthMode::Jwt, &format!("/ws?token={t}{}", query(129)), &[]).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::FORBIDDEN, "forbidden"));
        assert_eq!(e.limit, Some(Limit::MaxChannels));
        assert!(e.detail.contains("websocket.max_channels_per_connection"));
    }

    #[test]
    fn a_token_claim_obeys_the_channel_limits() {
        let many: Vec<String> = (0..129).map(|i| format!("team-{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let e = admit(
            AuthMode::Jwt,
            &format!("/ws?token={}", token("1", &many)),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.status, e.limit),
            (StatusCode::FORBIDDEN, Some(Limit::MaxChannels))
        );
        assert!(admit(
            AuthMode::Jwt,
            &format!("/ws?token={}", token("1", &many[..128])),
            &[]
        )
        .is_ok());
        let long = "x".repeat(256);
        let e = admit(
            AuthMode::Jwt,
            &format!("/ws?token={}", token("1", &[&long])),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.status, e.limit),
            (StatusCode::FORBIDDEN, Some(Limit::ChannelName))
        );
    }

    #[test]
    fn a_cookie_carries_the_token_only_when_configured_and_nothing_else_is_given() {
        let settings = settings();
        let auth = Authenticator::from_config(&AuthConfig {
            jwt_secret: Some("handshake-secret-0123".into()),
            cookie_name: "nb_token".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        let policy = HandshakePolicy::new(&settings, &auth);
        let admit_with = |uri: &str, cookie: &str| {
            let mut map = HeaderMap::new();
            map.append("cookie", cookie.parse().unwrap());
            policy.admit(&uri.parse().unwrap(), &map)
        };
        let one = token("1", &[]);
        let cookie = format!("theme=dark; nb_token={one}; other=x");
        assert_eq!(admit_with("/ws", &cookie).unwrap().user.as_str(), "1");
        // A token given another way wins over the cookie.
        let two = token("2", &[]);
        let by_query = admit_with(&format!("/ws?token={two}"), &cookie).unwrap();
        assert_eq!(by_query.user.as_str(), "2");
        // Another cookie name, an empty value or a bad token: 401.
        let e = admit_with("/ws", &format!("token={one}")).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(admit_with("/ws", "nb_token=").is_err());
        assert!(admit_with("/ws", "nb_token=garbage").is_err());
        // Without auth.cookie_name the cookie is never read.
        let e = admit(AuthMode::Jwt, "/ws", &[("cookie", &cookie)]).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    }
}
