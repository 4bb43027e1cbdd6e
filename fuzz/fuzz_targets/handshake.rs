//! The WebSocket handshake decision,
//! `notify_bridge::ws::handshake::HandshakePolicy::admit`, on a fuzzed upgrade
//! request: path, query string, `Authorization`, `Sec-WebSocket-Protocol`,
//! `Origin` and any other headers, under both auth modes (`jwt` with a
//! secret, `none`) and fuzzed `websocket.path`, `allowed_origins` and
//! `public_channels`. The query parser and the compiled public-channel
//! patterns (`parse_query`, `ChannelPattern`) are also checked on their own against plain reference
//! implementations written from their doc comments, and a user taken from
//! the path against the path's own decoding (`%XX` only: `+` is a plus).
//!
//! Input: a text much like the request itself, so seeds are readable and
//! mutations stay meaningful (`\r\n` or `\n` line ends):
//!
//! ```text
//! #mode=jwt path=/ws origins=https://a.example public=public:* user=42 channels=news,chat
//! GET /ws/42?channel=news&since=3 HTTP/1.1
//! Authorization: Bearer $TOKEN
//! Sec-WebSocket-Protocol: bearer, $TOKEN
//! Origin: https://a.example
//! ```
//!
//! The first line, when it starts with `#`, sets the policy: `mode` (`jwt`,
//! the default, or `none`), `path` (`websocket.path`, default `/ws`),
//! `origins` and `public` (comma-separated lists), `max`
//! (`websocket.max_channels_per_connection`), and `user` / `channels`
//! for a token. A fuzzer cannot forge a signed token, so when `user=` is
//! given, a valid HS256 token is minted (`auth::mint`) for that user and
//! channels, and every `$TOKEN` in the request is replaced by it. That lets
//! the fuzzer reach everything after verification, and gives the main check:
//! in `jwt` mode a request is only ever admitted as the minted token's user,
//! with only the channels that token or `public_channels` allow.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;
use notify_bridge::{
    auth::{self, Authenticator},
    config::{AuthConfig, AuthMode, ChannelPattern, WebSocketConfig},
    message::UserId,
    query::parse as parse_query,
    ws::handshake::HandshakePolicy,
};
use std::{borrow::Cow, sync::OnceLock, time::Duration};

const SECRET: &str = "fuzz-secret-0123456789";

fn auth_config(mode: AuthMode) -> AuthConfig {
    AuthConfig {
        mode,
        jwt_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    }
}

fn authenticator(mode: AuthMode) -> &'static Authenticator {
    static JWT: OnceLock<Authenticator> = OnceLock::new();
    static NONE: OnceLock<Authenticator> = OnceLock::new();
    let cell = match mode {
        AuthMode::Jwt => &JWT,
        AuthMode::None => &NONE,
    };
    cell.get_or_init(|| Authenticator::from_config(&auth_config(mode)).expect("valid auth"))
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Every `$TOKEN` in `bytes` replaced by `token`.
fn with_token<'a>(bytes: &'a [u8], token: Option<&str>) -> Cow<'a, [u8]> {
    const MARK: &[u8] = b"$TOKEN";
    let Some(token) = token else {
        return Cow::Borrowed(bytes);
    };
    if !bytes.windows(MARK.len()).any(|w| w == MARK) {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + token.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.starts_with(MARK) {
            out.extend_from_slice(token.as_bytes());
            rest = &rest[MARK.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    Cow::Owned(out)
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .peekable();

    let mut mode = AuthMode::Jwt;
    let mut settings = WebSocketConfig::default();
    let mut user: Option<String> = None;
    let mut channels: Vec<String> = Vec::new();
    if let Some(line) = lines.next_if(|l| l.starts_with(b"#")) {
        for word in String::from_utf8_lossy(&line[1..]).split(' ') {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "mode" if value == "none" => mode = AuthMode::None,
                "path" => settings.path = value.to_string(),
                "origins" => settings.allowed_origins = list(value),
                "public" => {
                    settings.public_channels = list(value).into_iter().map(Into::into).collect()
                }
                "user" => user = Some(value.to_string()),
                "channels" => channels = list(value),
                "max" => {
                    if let Ok(max) = value.parse::<usize>() {
                        settings.max_channels_per_connection = max.clamp(1, 512);
                    }
                }
                _ => {}
            }
        }
    }
    if !settings.path.starts_with('/') {
        return; // refused by config validation: never a running policy
    }
    let token = user.as_ref().and_then(|u| {
        auth::mint(
            &auth_config(AuthMode::Jwt),
            u,
            &channels,
            Duration::from_secs(3600),
        )
        .ok()
    });

    let Some(request_line) = lines.next() else {
        return;
    };
    let request_line = with_token(request_line, token.as_deref());
    let request_line = String::from_utf8_lossy(&request_line);
    let mut words = request_line.split(' ').filter(|w| !w.is_empty());
    let target = match (words.next(), words.next()) {
        (Some(_method), Some(target)) => target,
        (Some(target), None) => target,
        _ => return,
    };
    // What the HTTP parser would refuse never reaches the policy; neither does
    // a target that is not origin-form (`http://host/...`, `*`).
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    if !target.starts_with('/') || uri.path_and_query().map(|pq| pq.as_str()) != Some(target) {
        return;
    }

    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = with_token(&line[colon + 1..], token.as_deref());
        let value = value.trim_ascii_start();
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }

    let policy = HandshakePolicy::new(&settings, authenticator(mode));
    check_helpers(target, &settings.public_channels);

    match policy.admit(&uri, &headers) {
        Err(refusal) => {
            assert!(
                [
                    StatusCode::BAD_REQUEST,
                    StatusCode::UNAUTHORIZED,
                    StatusCode::FORBIDDEN,
                    StatusCode::NOT_FOUND,
                ]
                .contains(&refusal.status),
                "{refusal:?}"
            );
            assert!(
                ["bad_request", "unauthorized", "forbidden", "not_found"].contains(&refusal.code),
                "{refusal:?}"
            );
        }
        Ok(admission) => {
            // The channel limits of CONTRACT.md: at most
            // max_channels_per_connection, names of 1 to 255 bytes, from a
            // claim that obeys the same limits.
            let max = settings.max_channels_per_connection;
            assert!(admission.channels.len() <= max, "{} channels", admission.channels.len());
            if let auth::ChannelGrant::Listed(claim) = &admission.grant {
                assert!(claim.len() <= max, "a claim of {} channels", claim.len());
            }
            for (i, channel) in admission.channels.iter().enumerate() {
                assert!(!channel.is_empty() && channel.len() <= 255, "{channel:?}");
                assert!(!admission.channels[..i].contains(channel), "duplicate");
                assert!(policy.may_join(&admission.grant, channel), "{channel:?}");
            }
            match mode {
                AuthMode::Jwt => {
                    // Nobody but `auth::mint` holds the secret: only its
                    // token can have been accepted, for its user alone.
                    assert!(token.is_some(), "admitted without a valid token");
                    let minted_user = user.as_deref().and_then(UserId::new);
                    assert_eq!(Some(&admission.user), minted_user.as_ref());
                    assert!(admission.expires_at.is_some());
                    for channel in &admission.channels {
                        assert!(
                            channels.contains(channel)
                                || settings
                                    .public_channels
                                    .iter()
                                    .any(|p| reference_glob(p.as_str(), channel)),
                            "{channel:?} was granted neither by the token nor publicly"
                        );
                    }
                }
                AuthMode::None => {
                    assert!(admission.expires_at.is_none());
                    let from_query = reference_parse_query(query_of(target))
                        .into_iter()
                        .any(|(k, v)| k == "user_id" && v.trim() == admission.user.as_str());
                    let from_path = last_segment(target)
                        .is_some_and(|s| reference_decode(s, false).trim() == admission.user.as_str());
                    assert!(from_query || from_path, "user {:?} from neither", admission.user);
                }
            }
        }
    }
});

fn query_of(target: &str) -> &str {
    target.split_once('?').map_or("", |(_, q)| q)
}

/// The last non-empty segment of the target's path, undecoded.
fn last_segment(target: &str) -> Option<&str> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    path.rsplit('/').find(|s| !s.is_empty())
}

/// The helpers against references written from their doc comments.
fn check_helpers(target: &str, patterns: &[ChannelPattern]) {
    let query = query_of(target);
    let pairs = parse_query(query);
    assert_eq!(pairs, reference_parse_query(query), "{query:?}");
    // Any text, every byte `%XX`-encoded, comes back as it was.
    let mut encoded = String::from("v=");
    for byte in target.bytes() {
        encoded.push_str(&format!("%{byte:02X}"));
    }
    assert_eq!(parse_query(&encoded), [("v".to_string(), target.to_string())]);
    for (_, value) in &pairs {
        assert!(ChannelPattern::from("*").matches(value));
        let literal = ChannelPattern::from(value.as_str());
        assert!(literal.matches(value), "{value:?} on itself");
        for pattern in patterns.iter().chain([&literal]) {
            // Kept small: the reference is a quadratic table.
            if pattern.as_str().len() <= 64 && value.len() <= 64 {
                assert_eq!(
                    pattern.matches(value),
                    reference_glob(pattern.as_str(), value),
                    "glob {pattern:?} on {value:?}"
                );
            }
        }
    }
}

/// "`%XX` a byte; invalid escapes are kept as they are", and in a query
/// (`form`) `+` is a space.
fn reference_decode(text: &str, form: bool) -> String {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if form && b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ASCII");
            out.push(u8::from_str_radix(hex, 16).expect("hex digits"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reference_parse_query(query: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in query.split('&') {
        if part.is_empty() {
            continue;
        }
        let (k, v) = match part.find('=') {
            Some(at) => (&part[..at], &part[at + 1..]),
            None => (part, ""),
        };
        out.push((reference_decode(k, true), reference_decode(v, true)));
    }
    out
}

/// "`*` matches any run of characters, `?` exactly one": the textbook table.
fn reference_glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // m[i][j]: p[..i] matches t[..j]
    let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
    m[0][0] = true;
    for i in 1..=p.len() {
        m[i][0] = m[i - 1][0] && p[i - 1] == '*';
        for j in 1..=t.len() {
            m[i][j] = match p[i - 1] {
                '*' => m[i - 1][j] || m[i][j - 1],
                '?' => m[i - 1][j - 1],
                c => m[i - 1][j - 1] && c == t[j - 1],
            };
        }
    }
    m[p.len()][t.len()]
}
