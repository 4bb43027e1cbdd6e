//! A certificate chain and its key read from PEM files, checked to belong
//! together, behind a resolver whose certificate can be swapped while the
//! listener runs (SIGHUP): rustls asks the resolver on every handshake, so
//! the next handshake presents the new one and open connections, which
//! finished theirs, are untouched.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    InconsistentKeys,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, HttpConfig, WebSocketConfig};

/// Where one listener's certificate and key are, with the dotted keys they
/// came from, so that every error names the key an operator must fix.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert_key: &'static str,
    pub key_key: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// `websocket.tls_cert_file` and `tls_key_file`, when both are set
    /// (the configuration refuses one without the other).
    pub fn websocket(config: &WebSocketConfig) -> Option<Self> {
        Self::pair(
            ("websocket.tls_cert_file", &config.tls_cert_file),
            ("websocket.tls_key_file", &config.tls_key_file),
        )
    }

    /// `http.tls_cert_file` and `tls_key_file`, when both are set.
    pub fn http(config: &HttpConfig) -> Option<Self> {
        Self::pair(
            ("http.tls_cert_file", &config.tls_cert_file),
            ("http.tls_key_file", &config.tls_key_file),
        )
    }

    fn pair(
        (cert_key, cert): (&'static str, &Option<PathBuf>),
        (key_key, key): (&'static str, &Option<PathBuf>),
    ) -> Option<Self> {
        Some(Self {
            cert_key,
            key_key,
            cert: cert.clone()?,
            key: key.clone()?,
        })
    }

    /// Reads and checks both files: a chain of at least one certificate,
    /// a private key the provider can sign with, and the key belonging to
    /// the chain's first certificate.
    pub fn read(&self) -> Result<CertifiedKey, CertError> {
        let cert_error = |detail: &dyn fmt::Display| CertError {
            key: self.cert_key,
            detail: format!("{}: {detail}", self.cert.display()),
        };
        let key_error = |detail: &dyn fmt::Display| CertError {
            key: self.key_key,
            detail: format!("{}: {detail}", self.key.display()),
        };
        let chain = read_chain(&self.cert).map_err(|e| cert_error(&e))?;
        let key = read_key(&self.key).map_err(|e| key_error(&e))?;
        let signer = super::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| key_error(&format!("not a usable private key ({e})")))?;
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
                Ok(certified)
            }
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                Err(key_error(&format!(
                    "is not the key of the certificate in {} ({})",
                    self.cert.display(),
                    self.cert_key
                )))
            }
            Err(e) => Err(cert_error(&format!("not a usable certificate ({e})"))),
        }
    }
}

/// Why a pair cannot be used, naming the dotted key of the file at fault.
#[derive(Debug)]
pub struct CertError {
    pub key: &'static str,
    pub detail: String,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.detail)
    }
}

impl std::error::Error for CertError {}

impl From<CertError> for ConfigError {
    fn from(e: CertError) -> Self {
        ConfigError::key(e.key, e.detail)
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))?;
    if chain.is_empty() {
        return Err("holds no PEM CERTIFICATE block".into());
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1) ({e})"))
}

/// The certificate a listener presents, re-read by [`ReloadableCert::reload`].
pub struct ReloadableCert {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadableCert {
    /// Reads the pair for the first time.
    pub fn load(files: CertFiles) -> Result<Self, ConfigError> {
        let current = RwLock::new(Arc::new(files.read()?));
        Ok(Self { files, current })
    }

    /// Reads the files again; on success the next handshake presents the
    /// new certificate. On failure the previous one stays in use.
    pub fn reload(&self) -> Result<(), CertError> {
        let fresh = Arc::new(self.files.read()?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    pub fn files(&self) -> &CertFiles {
        &self.files
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}
