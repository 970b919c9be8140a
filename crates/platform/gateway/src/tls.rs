//! TLS termination with rustls: a certificate chain and key from PEM files, ALPN
//! offering `h2` then `http/1.1`, and the files re-read when they change (a renewed
//! certificate is served without a restart; connections already open keep theirs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for a change.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// `tls = { cert_file = "...", key_file = "..." }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the certificate, then its intermediates.
    pub cert_file: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or Ed25519).
    pub key_file: PathBuf,
}

/// The certificate being served, swapped when the files change.
#[derive(Debug)]
pub struct Certificate {
    config: TlsConfig,
    current: ArcSwap<CertifiedKey>,
    /// The files' modification times when last loaded.
    loaded: std::sync::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(config: &TlsConfig) -> Result<CertifiedKey, String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let chain = CertificateDer::pem_slice_iter(&read(&config.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{}: not a PEM certificate chain: {e}",
                config.cert_file.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected -----BEGIN CERTIFICATE-----)",
            config.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&config.key_file)?)
        .map_err(|e| format!("{}: not a PEM private key: {e}", config.key_file.display()))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        format!(
            "{}: unsupported private key: {e}",
            config.key_file.display()
        )
    })?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not belong to the certificate in {}: {e}",
            config.key_file.display(),
            config.cert_file.display()
        )
    })?;
    Ok(certified)
}

impl Certificate {
    /// Loads the files; every problem is named.
    pub fn load(config: &TlsConfig) -> Result<Arc<Self>, String> {
        let stamps = (modified(&config.cert_file), modified(&config.key_file));
        let key = load(config)?;
        Ok(Arc::new(Self {
            config: config.clone(),
            current: ArcSwap::from_pointee(key),
            loaded: std::sync::Mutex::new(stamps),
        }))
    }

    /// Re-reads the files if they changed; a broken pair is refused and the current
    /// certificate kept.
    fn refresh(&self) {
        let stamps = (
            modified(&self.config.cert_file),
            modified(&self.config.key_file),
        );
        let Ok(mut loaded) = self.loaded.lock() else {
            return;
        };
        if *loaded == stamps {
            return;
        }
        *loaded = stamps;
        match load(&self.config) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                tracing::info!(cert = %self.config.cert_file.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "the changed TLS certificate is refused; the previous one keeps serving");
            }
        }
    }

    /// Checks the files every two seconds until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(WATCH_EVERY) => self.refresh(),
            }
        }
    }

    /// A rustls acceptor serving this certificate, with ALPN h2 and http/1.1.
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

#[derive(Debug)]
struct Resolver(Arc<Certificate>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/keys")
            .join(name)
    }

    #[test]
    fn a_matching_pair_loads_and_each_mistake_is_named() {
        let config = |cert: &str, key: &str| TlsConfig {
            cert_file: keys(cert),
            key_file: keys(key),
        };
        let good = Certificate::load(&config("tls-cert.pem", "tls-key.pem")).unwrap();
        assert!(good.acceptor().is_ok());
        let error = |c: TlsConfig| Certificate::load(&c).unwrap_err();
        assert!(error(config("tls-cert.pem", "ec.pem")).contains("does not belong"));
        assert!(error(config("missing.pem", "tls-key.pem")).contains("cannot read"));
        assert!(error(config("tls-key.pem", "tls-key.pem")).contains("no certificate"));
        assert!(error(config("tls-cert.pem", "tls-cert.pem")).contains("not a PEM private key"));
    }
}
