//! Throwaway certificate authorities (rcgen) and TLS clients for the wss,
//! https and amqps tests: each client trusts exactly the CAs it is given.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use tokio::net::TcpStream;
use tokio_tungstenite::{tungstenite, Connector, MaybeTlsStream};

use super::{daemon::TempDir, Client};

/// A CA that signs server certificates for 127.0.0.1 and localhost.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate and its key, as PEM, and the certificate's DER (to
/// compare with what a handshake presented).
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A fresh server certificate (new key each time) for 127.0.0.1.
    pub fn leaf(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A client configuration that trusts this CA only.
    pub fn client(&self) -> Arc<ClientConfig> {
        client_trusting(&[self.pem()])
    }
}

impl Leaf {
    /// Writes `cert.pem` and `key.pem` (or other names) into `dir`.
    pub fn write(&self, dir: &TempDir, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        (
            dir.write(cert, &self.cert_pem),
            dir.write(key, &self.key_pem),
        )
    }
}

/// A client configuration that trusts exactly the CAs in `pems`.
pub fn client_trusting(pems: &[&str]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

/// A wss handshake to `addr` (`path_and_query` with its token) trusting
/// `config`'s roots: the client and the certificate the server presented.
pub async fn wss_connect(
    addr: SocketAddr,
    path_and_query: &str,
    config: Arc<ClientConfig>,
) -> Result<(Client, Vec<u8>), tungstenite::Error> {
    let url = format!("wss://{addr}{path_and_query}");
    let (client, _) = tokio::time::timeout(
        super::WAIT,
        tokio_tungstenite::connect_async_tls_with_config(
            url,
            None,
            false,
            Some(Connector::Rustls(config)),
        ),
    )
    .await
    .expect("the wss handshake ends in time")?;
    let presented = match client.get_ref() {
        MaybeTlsStream::Rustls(tls) => tls.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        _ => panic!("a wss:// connection is a TLS stream"),
    };
    Ok((client, presented))
}

/// `GET path` over https to `addr`: the status and the body, or the TLS
/// (or HTTP) error.
pub async fn https_get(
    addr: SocketAddr,
    path: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let request = super::http_client::build(addr, "GET", path, &[], "");
    let reply = super::http_client::exchange(tls, request)
        .await
        .map_err(std::io::Error::other)?;
    Ok((reply.status, reply.body))
}
