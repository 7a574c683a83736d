//! How agents and operators trust the relay, on data connections and on MQTT over TLS:
//! the relay certificate's SHA-256 fingerprint pinned, or a CA that signs it. There is
//! no "skip verification" switch.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsConnector;

/// Accepts exactly one certificate, named by its fingerprint; signatures are still checked.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity).into();
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the relay's certificate {} is not the pinned {}",
                hex::encode(seen),
                hex::encode(self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connector that trusts the pinned fingerprint, or else the CA file.
pub fn connector(fingerprint: Option<&str>, ca: Option<&Path>) -> anyhow::Result<TlsConnector> {
    Ok(TlsConnector::from(client_config(fingerprint, ca)?))
}

/// A rustls client configuration that trusts the pinned fingerprint, or else the CA file.
pub fn client_config(
    fingerprint: Option<&str>,
    ca: Option<&Path>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let cfg = match (fingerprint, ca) {
        (Some(fp), _) => {
            let mut fingerprint = [0u8; 32];
            hex::decode_to_slice(fp.trim().replace(':', ""), &mut fingerprint)
                .context("relay_fingerprint must be 64 hex digits (SHA-256)")?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    fingerprint,
                    provider,
                }))
                .with_no_client_auth()
        }
        (None, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("could not read {}", ca.display()))?
            {
                roots.add(cert.with_context(|| format!("bad certificate in {}", ca.display()))?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => bail!("no way to trust the relay: set relay_fingerprint or relay_ca"),
    };
    Ok(Arc::new(cfg))
}
