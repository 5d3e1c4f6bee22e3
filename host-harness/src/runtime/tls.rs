//! TLS termination for Gateway servers (`tls.mode: SIMPLE`): certificates from files or from
//! a `credentialName` directory, chosen by SNI the way the servers' hosts are written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use meshroute_core::ir::ListenerServer;

/// Certificates by server host: exact names, `*.suffix` wildcards, then `*`.
#[derive(Debug, Default)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `.suffix` → key, longest first.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    any: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return self.any.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return Some(Arc::clone(k));
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix.as_str()))
            .map(|(_, k)| Arc::clone(k))
            .or_else(|| self.any.clone())
    }
}

fn load_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The TLS configuration for one listener, or `None` when its servers are plain text.
/// `credentials` maps a `credentialName` to a directory holding `tls.crt` and `tls.key`
/// (the layout of a Kubernetes TLS secret).
pub fn server_config(
    servers: &[ListenerServer],
    credentials: Option<&Path>,
) -> Result<Option<Arc<ServerConfig>>, String> {
    let mut resolver = SniResolver::default();
    let mut any_tls = false;
    for server in servers {
        let Some(tls) = &server.tls else { continue };
        match tls.mode.as_str() {
            "SIMPLE" => {}
            other => {
                return Err(format!(
                    "TLS mode {other} is not supported by meshroute run (SIMPLE is)"
                ))
            }
        }
        any_tls = true;
        let (cert, key): (PathBuf, PathBuf) =
            match (
                &tls.credential_name,
                &tls.server_certificate,
                &tls.private_key,
            ) {
                (Some(name), _, _) => {
                    let dir = credentials
                        .ok_or_else(|| format!("credentialName {name:?} needs --credentials-dir"))?
                        .join(name);
                    (dir.join("tls.crt"), dir.join("tls.key"))
                }
                (None, Some(c), Some(k)) => (PathBuf::from(c), PathBuf::from(k)),
                _ => return Err(
                    "a SIMPLE TLS server needs serverCertificate and privateKey, or credentialName"
                        .into(),
                ),
            };
        let key = load_key(&cert, &key)?;
        for host in &server.hosts {
            let host = host
                .rsplit_once('/')
                .map_or(host.as_str(), |(_, h)| h)
                .to_ascii_lowercase();
            if host == "*" {
                resolver.any.get_or_insert_with(|| Arc::clone(&key));
            } else if let Some(suffix) = host.strip_prefix('*') {
                resolver
                    .wildcard
                    .push((suffix.to_owned(), Arc::clone(&key)));
            } else {
                resolver
                    .exact
                    .entry(host)
                    .or_insert_with(|| Arc::clone(&key));
            }
        }
        resolver.any.get_or_insert(key);
    }
    if !any_tls {
        return Ok(None);
    }
    resolver
        .wildcard
        .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}
