//! The relay's TLS identity for data connections: a self-signed certificate made in the
//! data directory on first start, which agents pin by its SHA-256 fingerprint.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The relay's certificate and key.
pub struct Identity {
    /// The certificate chain (one self-signed certificate, or what the operator installed).
    pub certs: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads `cert.pem` and `key.pem` from `dir`, creating a self-signed pair for `host`
    /// if there are none.
    pub fn load_or_create(dir: &Path, host: &str) -> anyhow::Result<Identity> {
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        if !cert_path.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("could not create {}", dir.display()))?;
            let mut names = vec![host.to_owned(), "localhost".to_owned()];
            names.dedup();
            let ck = rcgen::generate_simple_self_signed(names)
                .context("could not make a certificate")?;
            crate::registry::write_private(&key_path, ck.key_pair.serialize_pem().as_bytes())?;
            std::fs::write(&cert_path, ck.cert.pem())
                .with_context(|| format!("could not write {}", cert_path.display()))?;
            tracing::info!(path = %cert_path.display(), "made a self-signed certificate for data connections");
        }
        let certs = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("could not read {}", cert_path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{} holds no certificate",
            cert_path.display()
        );
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .with_context(|| format!("could not read {}", key_path.display()))?;
        Ok(Identity { certs, key })
    }

    /// The SHA-256 fingerprint of the leaf certificate, hex: what agents pin.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.certs[0]))
    }

    /// A rustls server configuration (ring provider) for data connections.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .context("the relay certificate and key do not match")?;
        Ok(Arc::new(cfg))
    }
}
