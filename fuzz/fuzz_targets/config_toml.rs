//! The config loader, `notify_bridge::config::Config::from_toml_str`: the
//! same figment pipeline (defaults, then the TOML text) and validation as
//! `Config::load` on a file, without the environment.
//!
//! Input: the TOML text (inputs that are not UTF-8 are skipped: figment reads
//! files as UTF-8 and refuses the rest before parsing).
//!
//! Beyond "no panic" (and no hang, e.g. in `log.level` filter parsing): an
//! error lists at least one problem, each naming a key; an accepted config
//! renders with `to_masked_toml` (what `check-config` prints) into TOML that
//! loads again to the same configuration, secrets aside.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notify_bridge::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::from_toml_str(text) {
        Ok(config) => config,
        Err(err) => {
            let shown = err.to_string();
            assert!(shown.starts_with("invalid configuration:\n  - "), "{shown}");
            return;
        }
    };
    let shown = config.to_masked_toml();
    assert!(!shown.starts_with("# cannot render"), "{shown}");
    let again = match Config::from_toml_str(&shown) {
        Ok(again) => again,
        Err(e) => panic!("the masked config does not load again: {e}\n{shown}\nfrom:\n{text}"),
    };
    // Masked: the secrets and the URL's password; the queue name is filled in.
    assert_eq!(again.websocket, config.websocket);
    assert_eq!(again.inbox, config.inbox);
    assert_eq!(again.log, config.log);
    assert_eq!(again.shutdown_timeout, config.shutdown_timeout);
    assert_eq!(again.auth.mode, config.auth.mode);
    assert_eq!(again.auth.user_claim, config.auth.user_claim);
    assert_eq!(again.auth.audience, config.auth.audience);
    assert_eq!(again.auth.issuer, config.auth.issuer);
    assert_eq!(
        again.auth.jwt_secret.is_some(),
        config.auth.jwt_secret.is_some()
    );
    assert_eq!(again.http.listen, config.http.listen);
    assert_eq!(again.http.api_keys.len(), config.http.api_keys.len());
    assert_eq!(again.http.admin_keys.len(), config.http.admin_keys.len());
    assert_eq!(again.amqp.exchange, config.amqp.exchange);
    assert_eq!(again.amqp.routing_key, config.amqp.routing_key);
    assert_eq!(again.amqp.prefetch, config.amqp.prefetch);
    assert_eq!(again.amqp.max_message_bytes, config.amqp.max_message_bytes);
    assert_eq!(
        again.amqp.reconnect_max_backoff,
        config.amqp.reconnect_max_backoff
    );
    assert_eq!(again.amqp.queue_name(), config.amqp.queue_name());
});
