//! The notification on the wire: one decoder for AMQP bodies and HTTP bodies,
//! so both paths accept and refuse exactly the same messages.
//!
//! The payload is kept as the publisher's own JSON text (`RawValue`): key
//! order, big integers and escapes reach the browser untouched, and the
//! notification frame is serialized once per message, then shared by every
//! recipient.

use std::{collections::HashSet, fmt, sync::Arc};

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A user id, normalised to text so that `1` and `"1"` are the same user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// Parses a user id as it appears in a URL, a token claim or a message.
    /// U+0000 is refused wherever it comes from: the PostgreSQL inbox (and
    /// presence) cannot store it, so such an id could never be served.
    pub fn new(text: &str) -> Option<Self> {
        let text = text.trim();
        (!text.is_empty() && !text.contains('\0')).then(|| Self(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A user id from JSON: an integer or a non-empty string.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::String(s) => Self::new(s),
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => {
                Some(Self(Arc::from(n.to_string())))
            }
            _ => None,
        }
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a notification is for: exactly one kind per message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(UserId),
    /// Deduplicated: a user listed twice gets the message once.
    Users(Vec<UserId>),
    Channel(Arc<str>),
    Broadcast,
    /// One connection, by the welcome frame's `connection_id`; never
    /// stored. An id no open connection has is simply no recipient.
    Connection(Arc<str>),
}

/// A decoded, valid notification, with its frame already serialized.
#[derive(Debug, Clone)]
pub struct Notification {
    pub id: String,
    pub event: String,
    pub target: Target,
    /// `false` keeps the message out of the inbox (live feeds).
    pub store: bool,
    pub payload: Box<RawValue>,
    /// The `notification` frame, shared (cheaply cloned) by every recipient.
    pub frame: Utf8Bytes,
    /// `"receipt": false` in the body: send no delivery receipt for it.
    pub receipt: bool,
    /// The AMQP `reply_to` property (set by the consumer, not the body):
    /// receipts also go to that queue, with `correlation_id` = `id`.
    pub reply_to: Option<Arc<str>>,
}

/// What one message may cost: both bounds come from the `amqp` section, so
/// the broker path and the HTTP path refuse exactly the same messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// `amqp.max_message_bytes`.
    pub max_bytes: usize,
    /// `amqp.max_recipients`: distinct users one `user_ids` may name.
    pub max_recipients: usize,
}

impl DecodeLimits {
    pub fn from_config(config: &crate::config::AmqpConfig) -> Self {
        Self {
            max_bytes: config.max_message_bytes,
            max_recipients: config.max_recipients,
        }
    }
}

impl Default for DecodeLimits {
    /// The contract's defaults, for tests and tools.
    fn default() -> Self {
        Self::from_config(&crate::config::AmqpConfig::default())
    }
}

/// Why a message was refused; the text goes to the log, the dead-letter
/// reason and HTTP 400 bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge {
        size: usize,
        limit: usize,
    },
    /// More distinct users than `amqp.max_recipients`; `count` is how many
    /// had been told apart when the limit was passed.
    TooManyRecipients {
        count: usize,
        limit: usize,
    },
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { size, limit } => {
                write!(
                    f,
                    "message is {size} bytes, larger than the limit of {limit} bytes"
                )
            }
            DecodeError::TooManyRecipients { count, limit } => write!(
                f,
                "`user_ids` names more than {limit} distinct users (amqp.max_recipients): \
                 {count} counted before giving up"
            ),
            DecodeError::Invalid(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for DecodeError {}

fn invalid(reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(reason.into())
}

/// The fields as they arrive; each is kept raw so that presence, `null` and
/// wrong types can be told apart and reported precisely.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    user_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    user_ids: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    channel: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    broadcast: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    connection_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    event: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    store: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    receipt: Option<&'a RawValue>,
}

/// `Some` whenever the key is present, even with `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Decodes and validates one message body: the body's shape, then its
/// target, then the optional fields.
///
/// `fallback_id` is the AMQP `message_id` (or an HTTP-assigned id), used
/// when the body has no `id`; with neither, a UUID v7 is made.
pub fn decode(
    body: &[u8],
    fallback_id: Option<&str>,
    limits: &DecodeLimits,
) -> Result<Notification, DecodeError> {
    let text = json_object_text(body, limits)?;
    let wire: Wire<'_> =
        serde_json::from_str(text).map_err(|e| invalid(format!("body is not valid JSON: {e}")))?;
    let payload = wire
        .payload
        .ok_or_else(|| invalid("missing field `payload`"))?;
    let target = target_of(&wire, limits)?;
    let event = match wire.event {
        None => "notification".to_string(),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .ok()
            .filter(|event| !event.contains('\0'))
            .ok_or_else(|| invalid("`event` must be a string without U+0000"))?,
    };
    let id = match wire.id {
        Some(raw) => without_nul(non_empty_string(raw, "id")?, "id")?,
        None => match fallback_id.filter(|id| !id.is_empty() && !id.contains('\0')) {
            Some(id) => id.to_string(),
            None => uuid::Uuid::now_v7().to_string(),
        },
    };
    let store = flag(wire.store, "store")?;
    let receipt = flag(wire.receipt, "receipt")?;
    let mut notification = Notification::new(id, event, target, store, payload.to_owned());
    notification.receipt = receipt;
    Ok(notification)
}

/// The body as text, once it is within the size limit, UTF-8, and looks
/// like a JSON object (so that the error says which of these it is not).
fn json_object_text<'a>(body: &'a [u8], limits: &DecodeLimits) -> Result<&'a str, DecodeError> {
    if body.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|e| invalid(format!("body is not UTF-8: {e}")))?;
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(invalid("body is empty; expected a JSON object"));
    }
    if !trimmed.starts_with('{') {
        return Err(invalid("body is not a JSON object"));
    }
    Ok(text)
}

/// The one target the body names.
fn target_of(wire: &Wire<'_>, limits: &DecodeLimits) -> Result<Target, DecodeError> {
    let mut targets = Vec::with_capacity(1);
    if let Some(raw) = wire.user_id {
        targets.push(Target::User(parse_user(raw, "user_id")?));
    }
    if let Some(raw) = wire.user_ids {
        targets.push(Target::Users(parse_users(raw, limits.max_recipients)?));
    }
    if let Some(raw) = wire.channel {
        targets.push(Target::Channel(Arc::from(non_empty_string(
            raw, "channel",
        )?)));
    }
    if let Some(raw) = wire.connection_id {
        let id = non_empty_string(raw, "connection_id")?;
        targets.push(Target::Connection(Arc::from(id)));
    }
    if let Some(raw) = wire.broadcast {
        match raw.get() {
            "true" => targets.push(Target::Broadcast),
            "false" => {}
            _ => return Err(invalid("`broadcast` must be true or false")),
        }
    }
    match targets.len() {
        0 => Err(invalid(
            "no target: give one of `user_id`, `user_ids`, `channel`, `connection_id` or `broadcast: true`",
        )),
        1 => Ok(targets.pop().expect("one target")),
        _ => Err(invalid(
            "more than one kind of target: give only one of `user_id`, `user_ids`, `channel`, `connection_id`, `broadcast`",
        )),
    }
}

/// A string field that must not be empty.
fn non_empty_string(raw: &RawValue, field: &str) -> Result<String, DecodeError> {
    let refused = || invalid(format!("`{field}` must be a non-empty string"));
    let text: String = serde_json::from_str(raw.get()).map_err(|_| refused())?;
    if text.is_empty() {
        return Err(refused());
    }
    Ok(text)
}

/// A stored field must be free of U+0000: PostgreSQL's text cannot hold
/// it, and the commit would fail on every retry.
fn without_nul(text: String, field: &str) -> Result<String, DecodeError> {
    if text.contains('\0') {
        return Err(invalid(format!("`{field}` must not contain U+0000")));
    }
    Ok(text)
}

/// A boolean field that defaults to `true`.
fn flag(raw: Option<&RawValue>, field: &str) -> Result<bool, DecodeError> {
    match raw.map(RawValue::get) {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(invalid(format!("`{field}` must be true or false"))),
    }
}

/// What the `invalid` receipt of a refused body can say about it: its `id`
/// (from the body, else `fallback_id`, the AMQP `message_id`) and whether
/// it asked for no receipt. Only a body within the size limit is looked at.
pub fn refused_fields(
    body: &[u8],
    fallback_id: Option<&str>,
    limits: &DecodeLimits,
) -> (Option<String>, bool) {
    #[derive(Deserialize)]
    struct Readable {
        #[serde(default)]
        id: Option<serde_json::Value>,
        #[serde(default)]
        receipt: Option<serde_json::Value>,
    }
    let readable = (body.len() <= limits.max_bytes)
        .then(|| serde_json::from_slice::<Readable>(body).ok())
        .flatten();
    let from_body = readable.as_ref().and_then(|r| match &r.id {
        Some(serde_json::Value::String(id)) if !id.is_empty() => Some(id.clone()),
        _ => None,
    });
    let id = from_body.or_else(|| fallback_id.filter(|id| !id.is_empty()).map(str::to_string));
    let receipt = readable.is_none_or(|r| r.receipt != Some(serde_json::Value::Bool(false)));
    (id, receipt)
}

fn parse_user(raw: &RawValue, field: &str) -> Result<UserId, DecodeError> {
    let value: serde_json::Value = serde_json::from_str(raw.get())
        .map_err(|e| invalid(format!("`{field}` is not valid JSON: {e}")))?;
    UserId::from_json(&value).ok_or_else(|| {
        invalid(format!(
            "`{field}` must be an integer or a non-empty string without U+0000"
        ))
    })
}

/// The distinct users of `user_ids`, in first-seen order. Linear: a set
/// remembers who was seen, so 140,000 ids cost 140,000 hash lookups, not
/// 10^10 comparisons on the consumer's task.
fn parse_users(raw: &RawValue, max_recipients: usize) -> Result<Vec<UserId>, DecodeError> {
    let items: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| invalid("`user_ids` must be a non-empty array of user ids"))?;
    if items.is_empty() {
        return Err(invalid("`user_ids` must be a non-empty array of user ids"));
    }
    let bound = items.len().min(max_recipients.saturating_add(1));
    let mut seen: HashSet<UserId> = HashSet::with_capacity(bound);
    let mut users = Vec::with_capacity(bound);
    for item in items {
        let user = parse_user(item, "user_ids[]")?;
        if seen.insert(user.clone()) {
            if users.len() == max_recipients {
                return Err(DecodeError::TooManyRecipients {
                    count: users.len() + 1,
                    limit: max_recipients,
                });
            }
            users.push(user);
        }
    }
    Ok(users)
}

impl Notification {
    /// A notification from its decoded parts (the broker's body, or a live
    /// message from another instance of the cluster), its frame built once.
    pub fn new(
        id: String,
        event: String,
        target: Target,
        store: bool,
        payload: Box<RawValue>,
    ) -> Self {
        let frame = notification_frame(None, &id, &event, Some(&target), payload.get());
        Self {
            id,
            event,
            target,
            store,
            payload,
            frame,
            receipt: true,
            reply_to: None,
        }
    }

    /// The frame for one user's stored copy: the shared frame plus its
    /// per-user inbox position.
    pub fn frame_with_seq(&self, seq: u64) -> Utf8Bytes {
        notification_frame(
            Some(seq),
            &self.id,
            &self.event,
            Some(&self.target),
            self.payload.get(),
        )
    }
}

/// The frame of an inbox entry being replayed.
pub fn stored_frame(seq: u64, id: &str, event: &str, payload: &str) -> Utf8Bytes {
    notification_frame(Some(seq), id, event, None, payload)
}

/// `{"type":"notification","seq":…,"id":…,"event":…,"payload":…}` plus the
/// channel or broadcast marker (`seq` only for stored copies); the payload
/// text is copied as received.
fn notification_frame(
    seq: Option<u64>,
    id: &str,
    event: &str,
    target: Option<&Target>,
    payload: &str,
) -> Utf8Bytes {
    let mut out = String::with_capacity(80 + id.len() + event.len() + payload.len());
    out.push_str(r#"{"type":"notification","#);
    if let Some(seq) = seq {
        out.push_str(r#""seq":"#);
        out.push_str(&seq.to_string());
        out.push(',');
    }
    out.push_str(r#""id":"#);
    push_json_string(&mut out, id);
    out.push_str(r#","event":"#);
    push_json_string(&mut out, event);
    match target {
        Some(Target::Channel(channel)) => {
            out.push_str(r#","channel":"#);
            push_json_string(&mut out, channel);
        }
        Some(Target::Broadcast) => out.push_str(r#","broadcast":true"#),
        Some(Target::User(_) | Target::Users(_) | Target::Connection(_)) | None => {}
    }
    out.push_str(r#","payload":"#);
    out.push_str(payload);
    out.push('}');
    Utf8Bytes::from(out)
}

/// Appends `text` as a JSON string literal.
pub fn push_json_string(out: &mut String, text: &str) {
    // serde_json's escaping; it allocates one short-lived String per call
    // (ids and event names are short, and this runs once per message).
    out.push_str(&serde_json::to_string(text).expect("a str always serializes"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Notification {
        decode(body.as_bytes(), None, &DecodeLimits::default())
            .unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    fn err(body: &str) -> String {
        decode(body.as_bytes(), None, &DecodeLimits::default())
            .map(|n| format!("accepted: {:?}", n.target))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn receipt_false_is_decoded_and_anything_but_a_boolean_refused() {
        assert!(ok(r#"{"user_id":1,"payload":1}"#).receipt);
        assert!(ok(r#"{"user_id":1,"payload":1,"receipt":true}"#).receipt);
        assert!(!ok(r#"{"user_id":1,"payload":1,"receipt":false}"#).receipt);
        assert!(err(r#"{"user_id":1,"payload":1,"receipt":"no"}"#).contains("`receipt`"));
        // Unknown fields are still ignored next to it.
        assert!(!ok(r#"{"user_id":1,"payload":1,"receipt":false,"later":1}"#).receipt);
    }

    #[test]
    fn a_refused_body_gives_its_id_when_readable() {
        let limits = DecodeLimits::default();
        let fields = |body: &str, fallback| refused_fields(body.as_bytes(), fallback, &limits);
        assert_eq!(
            fields(r#"{"id":"m1","payload":1}"#, Some("amqp")),
            (Some("m1".into()), true)
        );
        assert_eq!(
            fields(r#"{"id":7,"payload":1}"#, Some("amqp")),
            (Some("amqp".into()), true)
        );
        assert_eq!(
            fields("not json", Some("amqp")),
            (Some("amqp".into()), true)
        );
        assert_eq!(fields("not json", None), (None, true));
        assert_eq!(
            fields(r#"{"id":"m2","receipt":false}"#, None),
            (Some("m2".into()), false)
        );
        let tiny = DecodeLimits {
            max_bytes: 4,
            ..limits
        };
        assert_eq!(refused_fields(br#"{"id":"m3"}"#, None, &tiny), (None, true));
    }

    #[test]
    fn integer_and_string_user_ids_are_the_same_user() {
        assert_eq!(
            ok(r#"{"user_id":1,"payload":{}}"#).target,
            ok(r#"{"user_id":"1","payload":{}}"#).target
        );
    }

    #[test]
    fn payload_text_is_forwarded_as_received() {
        let n = ok(
            r#"{"user_id":1,"payload":{"z":1,"a":12345678901234567890123,"f":1.50,"s":"\u00e9"}}"#,
        );
        let frame = n.frame.as_str();
        assert!(
            frame.ends_with(
                r#""payload":{"z":1,"a":12345678901234567890123,"f":1.50,"s":"\u00e9"}}"#
            ),
            "{frame}"
        );
        let parsed: serde_json::Value = serde_json::from_str(frame).unwrap();
        assert_eq!(parsed["type"], "notification");
        assert_eq!(parsed["event"], "notification");
    }

    #[test]
    fn null_payload_is_valid_but_missing_payload_is_not() {
        assert_eq!(ok(r#"{"user_id":1,"payload":null}"#).payload.get(), "null");
        assert!(err(r#"{"user_id":1}"#).contains("payload"));
    }

    #[test]
    fn exactly_one_kind_of_target() {
        assert!(err(r#"{"payload":1}"#).contains("no target"));
        assert!(err(r#"{"user_id":1,"channel":"c","payload":1}"#).contains("more than one"));
        assert!(err(r#"{"user_id":1,"broadcast":true,"payload":1}"#).contains("more than one"));
        // broadcast:false is ignored, so it does not count as a second target.
        assert_eq!(
            ok(r#"{"user_id":1,"broadcast":false,"payload":1}"#).target,
            Target::User(UserId::new("1").unwrap())
        );
        assert!(err(r#"{"broadcast":false,"payload":1}"#).contains("no target"));
        assert!(err(r#"{"broadcast":"yes","payload":1}"#).contains("broadcast"));
        assert_eq!(
            ok(r#"{"broadcast":true,"payload":1}"#).target,
            Target::Broadcast
        );
    }

    #[test]
    fn user_ids_are_deduplicated_and_validated() {
        let n = ok(r#"{"user_ids":[1,"1",2],"payload":1}"#);
        assert_eq!(
            n.target,
            Target::Users(vec![UserId::new("1").unwrap(), UserId::new("2").unwrap()])
        );
        assert!(err(r#"{"user_ids":[],"payload":1}"#).contains("user_ids"));
        assert!(err(r#"{"user_ids":[1.5],"payload":1}"#).contains("user_ids"));
        assert!(err(r#"{"user_id":"","payload":1}"#).contains("user_id"));
        assert!(err(r#"{"user_id":null,"payload":1}"#).contains("user_id"));
        assert!(err(r#"{"user_id":true,"payload":1}"#).contains("user_id"));
        assert!(err(r#"{"user_id":{"a":1},"payload":1}"#).contains("user_id"));
    }

    #[test]
    fn recipients_past_the_limit_are_refused_and_duplicates_do_not_count() {
        let limits = DecodeLimits {
            max_recipients: 3,
            ..DecodeLimits::default()
        };
        let body = |ids: &str| format!(r#"{{"user_ids":[{ids}],"payload":1}}"#);
        let n = decode(body("1,2,3,3,\"3\",1").as_bytes(), None, &limits).unwrap();
        assert!(matches!(n.target, Target::Users(ref u) if u.len() == 3));
        let e = decode(body("1,2,3,4").as_bytes(), None, &limits).unwrap_err();
        assert_eq!(e, DecodeError::TooManyRecipients { count: 4, limit: 3 });
        assert!(e.to_string().contains("amqp.max_recipients"), "{e}");
    }

    #[test]
    fn many_recipients_are_deduplicated_in_linear_time() {
        // 140,000 ids, each listed twice: with `Vec::contains` this was
        // ~10^10 comparisons (minutes in a debug build); a set makes it
        // instant. No timing is asserted: a quadratic dedupe would make this
        // test hang far past any sane test timeout.
        let ids: Vec<String> = (0..280_000).map(|i| (i % 140_000).to_string()).collect();
        let body = format!(r#"{{"user_ids":[{}],"payload":1}}"#, ids.join(","));
        let limits = DecodeLimits {
            max_bytes: 4 << 20,
            max_recipients: 200_000,
        };
        let n = decode(body.as_bytes(), None, &limits).unwrap();
        let Target::Users(users) = n.target else {
            panic!("not a users target")
        };
        assert_eq!(users.len(), 140_000);
        assert_eq!(users[139_999].as_str(), "139999");
    }

    #[test]
    fn one_connection_is_a_fifth_kind_of_target() {
        let n = ok(r#"{"connection_id":"c-7","payload":1}"#);
        assert_eq!(n.target, Target::Connection(Arc::from("c-7")));
        assert!(!n.frame.as_str().contains("connection"), "{}", n.frame);
        assert!(err(r#"{"connection_id":7,"payload":1}"#).contains("connection_id"));
        assert!(err(r#"{"connection_id":"","payload":1}"#).contains("connection_id"));
        assert!(err(r#"{"connection_id":"c-1","user_id":1,"payload":1}"#).contains("more than one"));
        assert!(err(r#"{"payload":1}"#).contains("connection_id"));
    }

    #[test]
    fn channel_and_broadcast_frames_carry_their_marker() {
        let n = ok(r#"{"channel":"news","payload":1}"#);
        assert!(n.frame.as_str().contains(r#""channel":"news""#));
        let n = ok(r#"{"broadcast":true,"payload":1}"#);
        assert!(n.frame.as_str().contains(r#""broadcast":true"#));
        assert!(err(r#"{"channel":"","payload":1}"#).contains("channel"));
        assert!(err(r#"{"channel":5,"payload":1}"#).contains("channel"));
    }

    #[test]
    fn id_comes_from_body_then_message_id_then_uuid() {
        assert_eq!(ok(r#"{"id":"abc","user_id":1,"payload":1}"#).id, "abc");
        let n = decode(
            br#"{"user_id":1,"payload":1}"#,
            Some("amqp-id"),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(n.id, "amqp-id");
        let made = ok(r#"{"user_id":1,"payload":1}"#).id;
        assert_eq!(uuid::Uuid::parse_str(&made).unwrap().get_version_num(), 7);
        assert!(err(r#"{"id":5,"user_id":1,"payload":1}"#).contains("id"));
    }

    #[test]
    fn event_and_store_are_checked() {
        let n = ok(r#"{"event":"chat","store":false,"user_id":1,"payload":1}"#);
        assert_eq!(n.event, "chat");
        assert!(!n.store);
        assert!(n.frame.as_str().contains(r#""event":"chat""#));
        assert!(err(r#"{"event":1,"user_id":1,"payload":1}"#).contains("event"));
        assert!(err(r#"{"store":"no","user_id":1,"payload":1}"#).contains("store"));
    }

    #[test]
    fn malformed_bodies_get_clear_reasons() {
        assert!(err("").contains("empty"));
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err("{not json").contains("not valid JSON"));
        assert!(err(r#"{"user_id":1,"payload":1} trailing"#).contains("not valid JSON"));
        let small = DecodeLimits {
            max_bytes: 100,
            ..DecodeLimits::default()
        };
        assert!(decode(&[0xff, 0xfe], None, &small)
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
        let big = decode(&[b' '; 101], None, &small).unwrap_err();
        assert!(matches!(
            big,
            DecodeError::TooLarge {
                size: 101,
                limit: 100
            }
        ));
    }

    #[test]
    fn stored_frames_carry_their_seq() {
        let n = ok(r#"{"user_id":1,"id":"s","payload":{"a":1}}"#);
        let v: serde_json::Value = serde_json::from_str(n.frame_with_seq(7).as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"notification","seq":7,"id":"s","event":"notification","payload":{"a":1}})
        );
        let replayed = stored_frame(7, "s", "notification", r#"{"a":1}"#);
        assert_eq!(replayed, n.frame_with_seq(7));
    }

    #[test]
    fn ids_and_events_are_escaped_in_the_frame() {
        let n = ok(r#"{"id":"a\"b</script>","event":"e\\","user_id":1,"payload":1}"#);
        let parsed: serde_json::Value = serde_json::from_str(n.frame.as_str()).unwrap();
        assert_eq!(parsed["id"], "a\"b</script>");
        assert_eq!(parsed["event"], "e\\");
    }
}
