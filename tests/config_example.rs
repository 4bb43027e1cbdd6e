//! config/notify-bridge.example.toml says it holds "every key, with its
//! default": it is read as TOML into the configuration type (unknown keys
//! refused) and compared with the defaults, so a key added to the code, or
//! a default changed, without the example following, fails here.

use std::path::Path;

use notify_bridge::config::Config;

fn example() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/notify-bridge.example.toml");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn the_example_sets_every_cluster_key_to_its_default() {
    let text = example();
    let table: toml::Table = text.parse().expect("the example is TOML");
    let cluster = table
        .get("cluster")
        .and_then(|v| v.as_table())
        .expect("the example has a [cluster] section");
    let defaults = Config::default().cluster;
    let shown: Config = toml::from_str(&text).expect("the example's keys all exist");
    assert_eq!(shown.cluster, defaults);
    for key in ["enabled", "name", "instance_id"] {
        assert!(cluster.contains_key(key), "[cluster] shows {key}");
    }
}

#[test]
fn the_example_as_a_whole_is_the_defaults() {
    let shown: Config = toml::from_str(&example()).expect("the example's keys all exist");
    assert_eq!(shown, Config::default());
}
