//! rustls set-up: the server config for the proxy and preview listeners, and the client
//! config for `https://` upstreams.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{TlsFiles, UpstreamTls};

/// A TLS set-up failure: the config field to blame and the reason.
#[derive(Debug)]
pub struct TlsError(pub String, pub String);

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError(field.into(), format!("cannot read {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(field.into(), format!("{}: not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(
            field.into(),
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// Loads a PEM certificate chain and key; ALPN offers `h2` then `http/1.1`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert, "tls.cert")?;
    let key_bytes = std::fs::read(&files.key).map_err(|e| {
        TlsError(
            "tls.key".into(),
            format!("cannot read {}: {e}", files.key.display()),
        )
    })?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_bytes.as_slice())
        .map_err(|e| {
            TlsError(
                "tls.key".into(),
                format!("{}: not PEM: {e}", files.key.display()),
            )
        })?
        .ok_or_else(|| {
            TlsError(
                "tls.key".into(),
                format!("{} holds no PEM private key", files.key.display()),
            )
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError("tls".into(), e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| TlsError("tls.key".into(), format!("does not match tls.cert: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client config for `https://` upstreams: a CA file, or the system roots.
/// HTTP/1.1 only: Deepgram's API speaks it, and WebSocket upgrades need it.
pub fn upstream_client_config(tls: &UpstreamTls) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in read_certs(path, "upstream_tls.ca_file")? {
                roots.add(cert).map_err(|e| {
                    TlsError(
                        "upstream_tls.ca_file".into(),
                        format!("bad CA certificate: {e}"),
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError("upstream_tls".into(), e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A copy of `config` without ALPN: hyper-rustls sets ALPN itself and refuses a preset one.
pub fn without_alpn(config: &rustls::ClientConfig) -> rustls::ClientConfig {
    let mut config = config.clone();
    config.alpn_protocols.clear();
    config
}
