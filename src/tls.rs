//! rustls set-up: the server config for the proxy and preview listeners, and the client
//! config for `https://` upstreams.

use std::path::Path;
use std::sync::Arc;

use rustls::InconsistentKeys;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};

use crate::config::{TlsFiles, UpstreamTls};

/// A TLS set-up failure: the config field to blame and the reason.
#[derive(Debug)]
pub struct TlsError {
    pub field: String,
    pub reason: String,
}

impl TlsError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> TlsError {
        TlsError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError::new(field, format!("cannot read {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::new(field, not_pem(path)))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            field,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The PEM label of an encrypted PKCS#8 key, which rustls cannot use.
const ENCRYPTED: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";

/// A file that is not PEM. The parser's own message is not repeated: it quotes the
/// malformed line, which in a key file on one line is the whole private key.
fn not_pem(path: &Path) -> String {
    format!(
        "{}: not PEM (a malformed or unterminated BEGIN/END section; each base64 line on its own line)",
        path.display()
    )
}

/// Loads a PEM certificate chain and key; ALPN offers `h2` then `http/1.1`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert, "tls.cert")?;
    let key_bytes = std::fs::read(&files.key).map_err(|e| {
        TlsError::new(
            "tls.key",
            format!("cannot read {}: {e}", files.key.display()),
        )
    })?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_bytes.as_slice())
        .map_err(|_| TlsError::new("tls.key", not_pem(&files.key)))?
        .ok_or_else(|| {
            let encrypted = key_bytes
                .windows(ENCRYPTED.len())
                .any(|w| w == ENCRYPTED.as_bytes());
            TlsError::new("tls.key",
                if encrypted {
                    format!(
                        "{} holds an encrypted private key; give Switchyard the key decrypted (`openssl pkey -in {0} -out NEW`)",
                        files.key.display()
                    )
                } else {
                    format!("{} holds no PEM private key", files.key.display())
                },
            )
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // What `with_single_cert` does, step by step, so that each failure names its file.
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
        TlsError::new(
            "tls.key",
            format!("{}: not a usable private key: {e}", files.key.display()),
        )
    })?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        // A key type whose public half rustls cannot derive is not checked (as rustls does).
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::new(
                "tls.key",
                format!(
                    "{} does not match the certificate in {}",
                    files.key.display(),
                    files.cert.display()
                ),
            ));
        }
        Err(e) => {
            return Err(TlsError::new(
                "tls.cert",
                format!("{}: not a usable certificate: {e}", files.cert.display()),
            ));
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("tls", e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = session_cache();
    Ok(Arc::new(config))
}

/// The one session cache every server config shares (rustls's default size): a reload,
/// which builds a new config, does not make every returning client do a full handshake.
fn session_cache() -> Arc<dyn rustls::server::StoresServerSessions> {
    static CACHE: std::sync::OnceLock<Arc<rustls::server::ServerSessionMemoryCache>> =
        std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| rustls::server::ServerSessionMemoryCache::new(256))
        .clone()
}

/// The client config for `https://` upstreams: a CA file, or the system roots.
/// HTTP/1.1 only: Deepgram's API speaks it, and WebSocket upgrades need it. With
/// `https_pools` (a pool has an `https://` URL), finding no system roots is an error: every
/// such upstream would fail verification, found only as "unreachable" at run time.
pub fn upstream_client_config(
    tls: &UpstreamTls,
    https_pools: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in read_certs(path, "upstream_tls.ca_file")? {
                roots.add(cert).map_err(|e| {
                    TlsError::new("upstream_tls.ca_file", format!("bad CA certificate: {e}"))
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if https_pools && roots.is_empty() {
                return Err(TlsError::new(
                    "upstream_tls.ca_file",
                    "no system CA certificates were found to verify the https:// upstreams: \
                     name a CA file here, or install the system's CA bundle",
                ));
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::new("upstream_tls", e.to_string()))?
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_pair() -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    /// `server_config` on the given PEM texts: the field and reason it refuses them with.
    fn refused(cert: &str, key: &str) -> (String, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
        };
        std::fs::write(&files.cert, cert).expect("cert");
        std::fs::write(&files.key, key).expect("key");
        match server_config(&files) {
            Ok(_) => (String::new(), String::new()),
            Err(TlsError { field, reason }) => (field, reason),
        }
    }

    #[test]
    fn each_bad_file_is_named_under_its_own_field() {
        let (cert, key) = pem_pair();
        assert_eq!(refused(&cert, &key), (String::new(), String::new()));

        let armoured =
            |kind: &str| format!("-----BEGIN {kind}-----\nQUFBQUFB\n-----END {kind}-----\n");
        let (field, reason) = refused(&armoured("CERTIFICATE"), &key);
        assert_eq!(field, "tls.cert", "{reason}");
        assert!(
            reason.contains("server.crt") && reason.contains("not a usable certificate"),
            "{reason}"
        );

        let (field, reason) = refused(&cert, &armoured("PRIVATE KEY"));
        assert_eq!(field, "tls.key", "{reason}");
        assert!(
            reason.contains("server.key") && reason.contains("not a usable private key"),
            "{reason}"
        );

        let (_, other_key) = pem_pair();
        let (field, reason) = refused(&cert, &other_key);
        assert_eq!(field, "tls.key", "{reason}");
        assert!(
            reason.contains("does not match the certificate in") && reason.contains("server.crt"),
            "{reason}"
        );
    }

    /// A key file written on one line (`echo $KEY > server.key`) is refused without its
    /// text: the PEM parser's message quotes the malformed line, the whole key.
    #[test]
    fn a_malformed_key_is_not_repeated_in_the_reason() {
        let (cert, key) = pem_pair();
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        for one_line in [key.replace('\n', " "), key.replace('\n', "")] {
            let (field, reason) = refused(&cert, &one_line);
            assert_eq!(field, "tls.key", "{reason}");
            assert!(reason.contains("not PEM"), "{reason}");
            assert!(!reason.contains(&body[..16]), "the key is in: {reason}");
        }
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nQUFB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let (field, reason) = refused(&cert, encrypted);
        assert_eq!(field, "tls.key", "{reason}");
        assert!(reason.contains("encrypted"), "{reason}");
    }
}
