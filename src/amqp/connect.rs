//! Opening a broker connection with the configured TLS, once for the
//! consumer and the publisher alike (CONTRACT.md, "TLS"): `amqps://` URLs
//! verify the broker against the system roots, or, when `amqp.tls_ca_file`
//! is set, against that CA alone (a private CA pins the broker: a
//! certificate some public CA issued for the same name is not accepted).
//!
//! The CA file is read at startup ([`check`], exit 2 when unusable) and
//! again on every connect, so a rotated CA is picked up on the next
//! reconnect without a restart.

use std::{io, path::Path, sync::Arc};

use lapin::{
    options::ConfirmSelectOptions,
    tcp::{AsyncTcpStream, RustlsConnector},
    uri::{AMQPScheme, AMQPUri},
    Channel, Connection, ConnectionProperties,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer};

use crate::config::{AmqpConfig, ConfigError};

/// A connection of its own, named `name`, with one channel in confirm
/// mode: what the side port's publisher and the receipts publishers each
/// open, apart from the consumer's, so a failing publish never disturbs it.
pub async fn confirm_channel(
    config: &AmqpConfig,
    name: String,
) -> lapin::Result<(Connection, Channel)> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connection = connect(config, properties).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Connects to `config.url` as described in the module documentation.
pub async fn connect(
    config: &AmqpConfig,
    properties: ConnectionProperties,
) -> lapin::Result<Connection> {
    let uri: AMQPUri = config
        .url
        .parse()
        .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let Some(ca_file) = config
        .tls_ca_file
        .as_deref()
        .filter(|_| uri.scheme == AMQPScheme::AMQPS)
    else {
        // amqp://, or amqps:// against the system roots (lapin's
        // rustls-native-certs feature).
        return Connection::connect_uri(uri, properties).await;
    };
    let connector = Arc::new(RustlsConnector::from(
        client_config(ca_file).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
    ));
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host.clone();
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), uri.authority.port))
                .await?
                .collect();
            let tcp = AsyncTcpStream::connect(&runtime, addrs).await?;
            Ok(tcp.into_rustls(&connector, &host).await?)
        },
        properties,
    )
    .await
}

/// Startup's check of `amqp.tls_ca_file`: readable, and at least one PEM
/// certificate in it. Also refuses it beside an `amqp://` URL, where it
/// would silently do nothing.
pub fn check(config: &AmqpConfig) -> Result<(), ConfigError> {
    let Some(ca_file) = &config.tls_ca_file else {
        return Ok(());
    };
    if !config.url.starts_with("amqps://") {
        return Err(ConfigError::key(
            "amqp.tls_ca_file",
            "is set, but amqp.url is not an amqps:// URL: the CA would not be used",
        ));
    }
    client_config(ca_file)
        .map(drop)
        .map_err(|e| ConfigError::key("amqp.tls_ca_file", e))
}

/// A client configuration that trusts exactly the certificates in
/// `ca_file`.
fn client_config(ca_file: &Path) -> Result<ClientConfig, String> {
    let shown = ca_file.display();
    let pem = std::fs::read(ca_file).map_err(|e| format!("{shown}: cannot read it ({e})"))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{shown}: not PEM certificates ({e})"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{shown}: not a usable CA certificate ({e})"))?;
    }
    if roots.is_empty() {
        return Err(format!("{shown}: holds no PEM CERTIFICATE block"));
    }
    ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
}
