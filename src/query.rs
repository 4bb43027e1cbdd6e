//! The URL query string, read one way by the WebSocket handshake and the
//! side port alike: form encoding (`+` is a space, `%XX` a byte, an invalid
//! escape stays as it is), pairs in order, a key given twice kept twice.

use crate::message::UserId;

/// The query string as decoded `(key, value)` pairs, in order.
pub fn parse(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// The first non-empty value of `key`: `?token=&token=T` gives `T`.
pub fn value<'q>(pairs: &'q [(String, String)], key: &str) -> Option<&'q str> {
    pairs
        .iter()
        .find(|(k, v)| k == key && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// `?user_id=U`, the one rule for every route that takes it: the first
/// `user_id` that is not blank, trimmed (a user id is a non-empty string,
/// CONTRACT.md); a blank one counts as none given.
pub fn user_id(pairs: &[(String, String)]) -> Option<UserId> {
    pairs
        .iter()
        .filter(|(k, _)| k == "user_id")
        .find_map(|(_, v)| UserId::new(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_and_order() {
        let first = |query: &str| parse(query).remove(0).1;
        assert_eq!(first("v=a%20b+c%2"), "a b c%2");
        // A sign where a hex digit belongs stays as it is.
        assert_eq!(first("v=%+2"), "% 2");
        assert_eq!(first("v=chat:%+A"), "chat:% A");
        assert_eq!(first("v=%-1%4a"), "%-1J");
        assert_eq!(
            parse("channel=a%3Ab&x&&channel=c"),
            [("channel", "a:b"), ("x", ""), ("channel", "c")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(value(&parse("token=&token=T&token=U"), "token"), Some("T"));
        assert_eq!(value(&parse("token="), "token"), None);
    }

    #[test]
    fn user_id_is_the_first_one_not_blank() {
        let user = |query: &str| user_id(&parse(query)).map(|u| u.as_str().to_string());
        assert_eq!(user("user_id=5").as_deref(), Some("5"));
        assert_eq!(user("user_id=+5+").as_deref(), Some("5"));
        assert_eq!(user("user_id=a+b").as_deref(), Some("a b"));
        assert_eq!(
            user("user_id=&user_id=%20&user_id=6&user_id=7").as_deref(),
            Some("6")
        );
        assert_eq!(user("user_id=&user_id=+"), None);
        assert_eq!(user("other=5"), None);
    }
}
