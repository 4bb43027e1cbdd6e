//! SIGHUP re-reads every configured certificate pair (rotation without a
//! restart). A pair that fails to load is logged as an ERROR and keeps its
//! previous certificate: a half-copied file must not take the listener down.
//!
//! The handler is installed whether or not TLS is configured, because the
//! default action of SIGHUP ends the process: an operator's `kill -HUP`
//! sent to a bridge without TLS must not stop it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::ReloadableCert;

/// Reloads `certs` on every SIGHUP until `shutdown`.
pub fn reload_on_sighup(certs: Vec<Arc<ReloadableCert>>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(e) => {
                warn!(error = %e, "cannot handle SIGHUP: certificates will not be reloaded");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    received = hangup.recv() => if received.is_none() { break },
                }
                reload_all(&certs);
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (certs, shutdown);
}

/// One SIGHUP's work: each pair on its own, so one bad pair does not stop
/// the other from rotating.
fn reload_all(certs: &[Arc<ReloadableCert>]) {
    if certs.is_empty() {
        info!("SIGHUP: no TLS certificate is configured; nothing to reload");
    }
    for cert in certs {
        let files = cert.files();
        let _span = tracing::info_span!("sighup", key = files.cert_key).entered();
        match cert.reload() {
            Ok(()) => info!(
                cert_file = %files.cert.display(),
                key_file = %files.key.display(),
                "SIGHUP: certificate reloaded; new handshakes present it"
            ),
            Err(e) => error!(
                error = %e,
                "SIGHUP: cannot reload the certificate; the previous one stays in use"
            ),
        }
    }
}
