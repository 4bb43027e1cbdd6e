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
    assert_eq!(
        strings(&broker["ports"]),
        ["127.0.0.1:5672:5672", "127.0.0.1:15672:15672"]
    );
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
    assert_eq!(
        strings(&bridge["ports"]),
        ["127.0.0.1:8080:8080", "127.0.0.1:8081:8081"]
    );
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

/// The broker's guest account works from any address (`loopback_users =
/// none`) and the bridge runs with development switches: a port published
/// without a host address is open on every interface of the host (and
/// Docker's rules bypass the host firewall). Every published port, of every
/// service, short syntax or long, must name the host's loopback.
#[test]
fn every_published_port_is_bound_to_the_host_loopback() {
    let doc = compose();
    let services = doc["services"].as_hash().expect("services is a map");
    let mut checked = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap_or("?");
        let Some(ports) = service["ports"].as_vec() else {
            continue;
        };
        for port in ports {
            let host_ip = published_host_ip(port);
            assert_eq!(
                host_ip.as_deref(),
                Some("127.0.0.1"),
                "service {name}: port {port:?} is not bound to 127.0.0.1 on the host"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 7, "the seven published ports were checked");
}

/// `docker compose up` runs the broker, PostgreSQL and one bridge in
/// cluster mode; `--profile cluster` adds a second bridge of the same
/// cluster. Both bridges store in the compose PostgreSQL, with the
/// credentials the postgres service creates, and differ only in their
/// instance id and host ports.
#[test]
fn the_cluster_profile_adds_a_second_bridge_of_the_same_cluster() {
    let doc = compose();
    let services = &doc["services"];
    let db = &services["postgres"];
    let image = db["image"].as_str().expect("postgres has an image");
    assert!(
        image.starts_with("postgres:") && !image.contains("alpine"),
        "the official Debian-based postgres image: {image}"
    );
    assert_eq!(strings(&db["ports"]), ["127.0.0.1:55432:5432"]);
    assert!(db["healthcheck"]["test"].as_vec().is_some());
    let db_env = &db["environment"];
    let (user, password, name) = (
        db_env["POSTGRES_USER"].as_str().unwrap(),
        db_env["POSTGRES_PASSWORD"].as_str().unwrap(),
        db_env["POSTGRES_DB"].as_str().unwrap(),
    );
    let url = format!("postgres://{user}:{password}@postgres:5432/{name}");

    let first = &services["notify-bridge"];
    let second = &services["notify-bridge-2"];
    for name in ["rabbitmq", "postgres", "notify-bridge"] {
        assert!(
            services[name]["profiles"].is_badvalue(),
            "{name} runs without a profile"
        );
    }
    assert_eq!(strings(&second["profiles"]), ["cluster"]);
    assert_eq!(
        strings(&second["ports"]),
        ["127.0.0.1:8082:8080", "127.0.0.1:8083:8081"]
    );
    assert_eq!(second["build"], first["build"]);
    assert_eq!(second["volumes"], first["volumes"]);
    assert_eq!(second["command"], first["command"]);

    let mut ids = Vec::new();
    for (service, bridge) in [("notify-bridge", first), ("notify-bridge-2", second)] {
        let env = &bridge["environment"];
        let value = |key: &str| {
            env[key]
                .as_str()
                .unwrap_or_else(|| panic!("{service}: {key} is not set as a string"))
                .to_string()
        };
        assert_eq!(value("NOTIFY_BRIDGE_CLUSTER__ENABLED"), "true", "{service}");
        assert_eq!(
            value("NOTIFY_BRIDGE_CLUSTER__NAME"),
            "notify-bridge",
            "{service}"
        );
        assert_eq!(value("NOTIFY_BRIDGE_INBOX__ENABLED"), "true", "{service}");
        assert_eq!(value("NOTIFY_BRIDGE_INBOX__STORE"), "postgres", "{service}");
        assert_eq!(value("NOTIFY_BRIDGE_INBOX__POSTGRES_URL"), url, "{service}");
        assert_eq!(
            env["NOTIFY_BRIDGE_AMQP__URL"], first["environment"]["NOTIFY_BRIDGE_AMQP__URL"],
            "{service}"
        );
        for dependency in ["rabbitmq", "postgres"] {
            assert_eq!(
                bridge["depends_on"][dependency]["condition"].as_str(),
                Some("service_healthy"),
                "{service} waits for {dependency}"
            );
        }
        ids.push(value("NOTIFY_BRIDGE_CLUSTER__INSTANCE_ID"));
    }
    assert_ne!(ids[0], ids[1], "each bridge has its own instance id");
}

/// The host address of one `ports` entry: `"IP:HOST:CONTAINER"` (short
/// syntax; `"HOST:CONTAINER"` and `"CONTAINER"` have none) or
/// `{host_ip: IP, ...}` (long syntax).
fn published_host_ip(port: &Yaml) -> Option<String> {
    if let Some(text) = port.as_str() {
        let parts: Vec<&str> = text.rsplitn(3, ':').collect();
        return (parts.len() == 3).then(|| parts[2].trim_matches(['[', ']']).to_string());
    }
    port["host_ip"].as_str().map(str::to_string)
}
