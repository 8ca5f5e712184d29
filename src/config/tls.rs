//! `[server] tls`: the listener's certificate chain and private key, as PEM files.
//!
//! Loading is here, with the configuration, so that `aisle check` and a reload refuse a pair
//! that does not load (a missing file, no certificate, a key that does not match the
//! certificate) with the position of `tls` in `gateway.toml`; the listener's resolver
//! (`proxy::listener`) loads the same way when the files change, and keeps serving the pair it
//! has when the new one does not load.

use pingora::tls::sign::CertifiedKey;
use pingora::tls::{CertificateDer, CryptoProvider, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the certificate chain and its private key are (relative paths are resolved against
/// `gateway.toml`'s directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads and checks the pair: the chain's first certificate must be the key's.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, String> {
        let certs = read_pem(&self.cert, "cert")?
            .into_iter()
            .filter_map(|item| match item {
                Pem::Cert(c) => Some(c),
                Pem::Key(_) => None,
            })
            .collect::<Vec<_>>();
        if certs.is_empty() {
            return Err(format!(
                "cert {} holds no certificate (\"-----BEGIN CERTIFICATE-----\"); give the PEM \
                 certificate chain, the server's own certificate first",
                self.cert.display()
            ));
        }
        let key = read_pem(&self.key, "key")?
            .into_iter()
            .find_map(|item| match item {
                Pem::Key(k) => Some(k),
                Pem::Cert(_) => None,
            })
            .ok_or_else(|| {
                format!(
                    "key {} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM); give the \
                     certificate's private key",
                    self.key.display()
                )
            })?;
        pingora::tls::install_default_crypto_provider();
        let provider = CryptoProvider::get_default()
            .ok_or("no TLS crypto provider is installed (a bug in Aisle)")?;
        CertifiedKey::from_der(certs, key, provider)
            .map(Arc::new)
            .map_err(|e| {
                format!(
                    "key {} does not fit cert {} ({e}); give the private key of the chain's \
                     first certificate",
                    self.key.display(),
                    self.cert.display()
                )
            })
    }
}

enum Pem {
    Cert(CertificateDer<'static>),
    Key(PrivateKeyDer<'static>),
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<Pem>, String> {
    let text = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {what} {}: {e}; give a readable PEM file (relative paths are from \
             gateway.toml's directory)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for item in rustls_pemfile::read_all(&mut text.as_slice()) {
        let item = item.map_err(|e| format!("{what} {} is not valid PEM: {e}", path.display()))?;
        match item {
            rustls_pemfile::Item::X509Certificate(c) => out.push(Pem::Cert(c)),
            rustls_pemfile::Item::Pkcs8Key(k) => out.push(Pem::Key(k.into())),
            rustls_pemfile::Item::Pkcs1Key(k) => out.push(Pem::Key(k.into())),
            rustls_pemfile::Item::Sec1Key(k) => out.push(Pem::Key(k.into())),
            _ => {}
        }
    }
    Ok(out)
}
