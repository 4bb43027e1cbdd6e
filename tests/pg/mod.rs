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
/// Schemas earlier runs left more than an hour ago are dropped first (the
/// name's UUIDv7 holds its creation time), so the database does not grow
/// with every run.
pub async fn fresh_schema() -> Option<String> {
    let url = server_url()?;
    let db = connect(&url).await;
    drop_old_schemas(&db).await;
    let schema = format!("nb_test_{}", uuid::Uuid::now_v7().simple());
    db.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    Some(in_schema(&url, &schema))
}

async fn drop_old_schemas(db: &tokio_postgres::Client) {
    const PREFIX: &str = "nb_test_";
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let rows = db
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)",
            &[&PREFIX],
        )
        .await
        .unwrap();
    for name in rows.iter().map(|r| r.get::<_, String>(0)) {
        let created = name
            .get(PREFIX.len()..PREFIX.len() + 12)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        if created.is_some_and(|ms| now_ms.saturating_sub(ms) > 3_600_000) {
            // Another test may drop it at the same time: errors are fine.
            let _ = db
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .await;
        }
    }
}
