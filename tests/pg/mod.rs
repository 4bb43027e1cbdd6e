//! The PostgreSQL tests' database: the server scripts/postgres started
//! (URL in NOTIFY_BRIDGE_TEST_POSTGRES_URL), one fresh schema per test so
//! tests run in parallel without seeing each other's rows.

#![allow(dead_code)]

use tokio_postgres::NoTls;

/// The server's URL; `None` (the test skips, saying so) when the variable
/// is unset outside CI. Under CI=true a missing server fails the test.
pub fn server_url() -> Option<String> {
    match std::env::var("NOTIFY_BRIDGE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("NOTIFY_BRIDGE_TEST_POSTGRES_URL is unset under CI=true (scripts/test sets it)")
        }
        _ => {
            eprintln!(
                "SKIPPED: NOTIFY_BRIDGE_TEST_POSTGRES_URL is unset \
                 (bash scripts/postgres start; export NOTIFY_BRIDGE_TEST_POSTGRES_URL=$(bash scripts/postgres url))"
            );
            None
        }
    }
}

/// A superuser-free connection to the server (for setup and checks).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// `url` with its sessions' search_path set to `schema`.
pub fn in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// A new empty schema; the URL whose sessions use it. `None` when skipped.
pub async fn fresh_schema() -> Option<String> {
    let url = server_url()?;
    let schema = format!("nb_test_{}", uuid::Uuid::now_v7().simple());
    connect(&url)
        .await
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    Some(in_schema(&url, &schema))
}
