//! docker-compose.yml cannot be run here (no Docker engine), so it is parsed
//! and checked against what the scripts use: the same rabbitmq/ files, the
//! same config, the contract's ports.

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    YamlLoader::load_from_str(&text)
        .expect("docker-compose.yml is valid YAML")
        .remove(0)
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .unwrap_or_else(|| panic!("expected a list, got {node:?}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

#[test]
fn services_ports_and_mounts_match_the_scripts() {
    let doc = compose();
    let services = &doc["services"];
    let broker = &services["rabbitmq"];
    let bridge = &services["notify-bridge"];
    assert!(broker["image"].as_str().unwrap().contains("management"));
    assert_eq!(strings(&broker["ports"]), ["5672:5672", "15672:15672"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for mount in strings(&broker["volumes"])
        .iter()
        .chain(&strings(&bridge["volumes"]))
    {
        let host = mount.split(':').next().unwrap();
        assert!(root.join(host).is_file(), "mounted file missing: {host}");
    }
    let mounts = strings(&broker["volumes"]).join(" ");
    for file in [
        "rabbitmq/rabbitmq.conf",
        "rabbitmq/definitions.json",
        "rabbitmq/enabled_plugins",
    ] {
        assert!(mounts.contains(file), "{file} not mounted into the broker");
    }
    assert_eq!(strings(&bridge["ports"]), ["8080:8080", "8081:8081"]);
    assert_eq!(bridge["build"].as_str(), Some("."));
    assert!(root.join("Dockerfile").is_file());
    assert_eq!(
        bridge["depends_on"]["rabbitmq"]["condition"].as_str(),
        Some("service_healthy")
    );
    let env = &bridge["environment"];
    assert!(env["NOTIFY_BRIDGE_AMQP__URL"]
        .as_str()
        .unwrap()
        .contains("@rabbitmq:5672"));
    assert_eq!(
        env["NOTIFY_BRIDGE_WEBSOCKET__LISTEN"].as_str(),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        env["NOTIFY_BRIDGE_HTTP__LISTEN"].as_str(),
        Some("0.0.0.0:8081")
    );
    let command = strings(&bridge["command"]);
    assert_eq!(command[0], "--config");
    assert!(strings(&bridge["volumes"])[0].starts_with("./config/dev.toml:"));
}
