//! TLS for the two listeners (CONTRACT.md, "TLS"): the WebSocket listener
//! speaks wss when `websocket.tls_cert_file`/`tls_key_file` are set, the
//! side port https when `http.tls_*` are. Platforms that do not terminate
//! TLS in front of the service need it here, and rotate certificates: the
//! files are read again on SIGHUP (`reload`) and the next handshake
//! presents the new certificate, while open connections keep theirs.
//!
//! - `certs`: reading and checking a PEM pair, the reloadable resolver.
//! - `stream`: one stream type for plain and TLS connections, so the
//!   WebSocket and HTTP code above it is the same for both.
//! - `reload`: the SIGHUP handler.
//!
//! The handshake itself runs in each accepted connection's own task (see
//! [`ListenerTls::accept`]'s callers), never in an accept loop.

mod certs;
mod reload;
mod stream;

use std::{io, sync::Arc};

use rustls::{crypto::CryptoProvider, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

pub use certs::{CertError, CertFiles, ReloadableCert};
pub use reload::reload_on_sighup;
pub use stream::ServerStream;

use crate::config::{Config, ConfigError};

/// The one crypto provider: ring, the one lapin's rustls is built with, named
/// explicitly so that a second provider turning up in the dependency tree
/// cannot make rustls refuse to pick one at run time.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One listener's TLS: the acceptor, over a certificate SIGHUP can swap.
pub struct ListenerTls {
    acceptor: TlsAcceptor,
    cert: Arc<ReloadableCert>,
}

impl ListenerTls {
    /// Reads `files` and builds the acceptor; a file that cannot be read or
    /// parsed is a [`ConfigError`] naming its key (startup exits 2).
    pub fn new(files: CertFiles) -> Result<Self, ConfigError> {
        let cert = Arc::new(ReloadableCert::load(files)?);
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::key(cert.files().cert_key, e))?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert,
        })
    }

    /// The TLS handshake on an accepted socket. The caller bounds it in
    /// time: it waits for the client.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<ServerStream> {
        let tls = self.acceptor.accept(tcp).await?;
        Ok(ServerStream::Tls(Box::new(tls)))
    }

    /// The certificate this listener presents, for [`reload_on_sighup`].
    pub fn cert(&self) -> Arc<ReloadableCert> {
        self.cert.clone()
    }
}

/// Both listeners' TLS, each `None` when its files are not configured.
pub struct ListenersTls {
    pub websocket: Option<Arc<ListenerTls>>,
    pub http: Option<Arc<ListenerTls>>,
}

impl ListenersTls {
    /// Loads what `config` asks for; see [`ListenerTls::new`].
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let load = |files: Option<CertFiles>| -> Result<_, ConfigError> {
            files.map(|f| ListenerTls::new(f).map(Arc::new)).transpose()
        };
        Ok(Self {
            websocket: load(CertFiles::websocket(&config.websocket))?,
            http: load(CertFiles::http(&config.http))?,
        })
    }

    /// The certificates SIGHUP re-reads.
    pub fn certs(&self) -> Vec<Arc<ReloadableCert>> {
        [&self.websocket, &self.http]
            .into_iter()
            .flatten()
            .map(|tls| tls.cert())
            .collect()
    }
}
