//! TLS for Gateway servers and upstreams.
//!
//! Termination (`tls.mode` SIMPLE, MUTUAL, OPTIONAL_MUTUAL): certificates from files or from
//! a `credentialName` directory, chosen by SNI the way the servers' hosts are written; client
//! certificates verified against the server's `caCertificates`, then its `subjectAltNames`,
//! pins and `caCrl` (`client_auth`). Origination (DestinationRule
//! `tls` SIMPLE, MUTUAL): the server verified against the CA and `subjectAltNames`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::DigitallySignedStruct;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use meshroute_core::ir::{ClientTls, ListenerServer, ServerTlsMode, TlsVersion};

use super::client_auth::{ClientConstraints, ConstrainedVerifier};
use crate::credentials::CredentialError;

/// Why a listener's or a cluster's TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// A certificate, key or CA file that cannot be used.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0} TLS needs caCertificates (or a credentialName with ca.crt)")]
    NoClientCa(ServerTlsMode),
    #[error("servers on one port verify clients differently ({0} and {1}): meshroute run needs one client CA and one set of subjectAltNames, pins and CRL per port")]
    ClientCaConflict(String, String),
    #[error("servers on one port ask for different TLS versions or cipher suites: meshroute run applies one set per port")]
    ParamsConflict,
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The versions and TLS 1.2 cipher suites a listener serves (`ServerTLSSettings`'
/// `minProtocolVersion`, `maxProtocolVersion`, `cipherSuites`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TlsParams {
    min: Option<TlsVersion>,
    max: Option<TlsVersion>,
    suites: Vec<String>,
}

impl TlsParams {
    fn of(tls: &meshroute_core::ir::ServerTls) -> Self {
        Self {
            min: tls.min_protocol_version,
            max: tls.max_protocol_version,
            suites: tls.cipher_suites.clone(),
        }
    }

    fn versions(&self) -> Vec<&'static rustls::SupportedProtocolVersion> {
        let min = self.min.unwrap_or(TlsVersion::Tls12);
        let max = self.max.unwrap_or(TlsVersion::Tls13);
        [
            (TlsVersion::Tls12, &rustls::version::TLS12),
            (TlsVersion::Tls13, &rustls::version::TLS13),
        ]
        .into_iter()
        .filter(|(v, _)| (min..=max).contains(v))
        .map(|(_, p)| p)
        .collect()
    }

    /// The provider's suites: TLS 1.3's all, TLS 1.2's those named (all when none are).
    fn provider(&self) -> rustls::crypto::CryptoProvider {
        let mut provider = rustls::crypto::ring::default_provider();
        if !self.suites.is_empty() {
            provider.cipher_suites.retain(|suite| match suite {
                rustls::SupportedCipherSuite::Tls13(_) => true,
                rustls::SupportedCipherSuite::Tls12(_) => self
                    .suites
                    .iter()
                    .any(|name| openssl_name(suite.suite()) == Some(name.as_str())),
            });
        }
        provider
    }
}

/// OpenSSL's name of a TLS 1.2 suite (the names Istio's `cipherSuites` and Envoy use).
fn openssl_name(suite: rustls::CipherSuite) -> Option<&'static str> {
    use rustls::CipherSuite as S;
    Some(match suite {
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        _ => return None,
    })
}

fn file_error(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> TlsError + '_ {
    move |e| TlsError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A server's certificates: one, or an RSA and an ECDSA one (Istio's `tlsCertificates` and
/// `credentialNames`), of which a handshake gets the first the client can verify.
type Keys = Arc<[Arc<CertifiedKey>]>;

/// Certificates by server host: exact names, `*.suffix` wildcards, then `*`.
#[derive(Debug, Default)]
struct SniResolver {
    exact: HashMap<String, Keys>,
    /// `.suffix` → keys, longest first.
    wildcard: Vec<(String, Keys)>,
    any: Option<Keys>,
}

impl SniResolver {
    fn keys_for(&self, hello: &ClientHello<'_>) -> Option<&Keys> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return self.any.as_ref();
        };
        self.exact
            .get(&name)
            .or_else(|| {
                self.wildcard
                    .iter()
                    .find(|(suffix, _)| name.ends_with(suffix.as_str()))
                    .map(|(_, k)| k)
            })
            .or(self.any.as_ref())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys_for(&hello)?;
        // As Envoy: an ECDSA certificate for a client that can verify it, else the first
        // certificate whose key signs with a scheme the client offers.
        let offered = hello.signature_schemes();
        let usable = |k: &&Arc<CertifiedKey>| k.key.choose_scheme(offered).is_some();
        keys.iter()
            .filter(usable)
            .find(|k| k.key.algorithm() == rustls::SignatureAlgorithm::ECDSA)
            .or_else(|| keys.iter().find(usable))
            .or_else(|| keys.first())
            .map(Arc::clone)
    }
}

fn load_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert)(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(cert)(&e))?;
    if chain.is_empty() {
        return Err(file_error(cert)(&"no certificate in the file"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key)(&e))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| file_error(key)(&format!("unsupported private key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The TLS configuration for one listener, or `None` when its servers are plain text.
/// `credentials` maps a `credentialName` to a directory holding `tls.crt` and `tls.key`
/// (the layout of a Kubernetes TLS secret).
pub fn server_config(
    servers: &[ListenerServer],
    credentials: Option<&Path>,
    alpn_http: bool,
) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let mut resolver = SniResolver::default();
    let mut any_tls = false;
    let mut params: Option<TlsParams> = None;
    // One client CA (and one set of constraints) per listener: rustls verifies client
    // certificates per configuration.
    let mut client_ca: Option<(PathBuf, bool, ClientConstraints)> = None;
    for server in servers {
        // Only terminating servers carry TLS settings; the others are routed on their SNI
        // by the connection-level filter.
        let Some(tls) = &server.tls else { continue };
        if tls.mode.verifies_clients() {
            let optional = tls.mode == ServerTlsMode::OptionalMutual;
            let Some(ca) = crate::credentials::server_files(tls, credentials)?.client_ca else {
                return Err(TlsError::NoClientCa(tls.mode));
            };
            let constraints = ClientConstraints::of(tls);
            match &client_ca {
                Some((c, o, k)) if *c != ca || *o != optional || *k != constraints => {
                    return Err(TlsError::ClientCaConflict(
                        c.display().to_string(),
                        ca.display().to_string(),
                    ))
                }
                _ => client_ca = Some((ca, optional, constraints)),
            }
        }
        match &params {
            Some(p) if *p != TlsParams::of(tls) => return Err(TlsError::ParamsConflict),
            _ => params = Some(TlsParams::of(tls)),
        }
        any_tls = true;
        let files = crate::credentials::server_files(tls, credentials)?;
        let key: Keys = files
            .keys
            .iter()
            .map(|k| load_key(&k.cert, &k.key))
            .collect::<Result<Vec<_>, _>>()?
            .into();
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
    let params = params.unwrap_or_default();
    let provider = Arc::new(params.provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&params.versions())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((ca, optional, constraints)) => {
            let roots = root_store(&ca)?;
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            if optional {
                verifier = verifier.allow_unauthenticated();
            }
            if let Some(crl) = &constraints.crl {
                verifier = verifier.with_crls(revocation_lists(crl)?);
            }
            let verifier = verifier.build().map_err(|e| file_error(&ca)(&e))?;
            builder.with_client_cert_verifier(ConstrainedVerifier::wrap(verifier, constraints))
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    if alpn_http {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(Some(Arc::new(config)))
}

/// The certificate revocation lists of a PEM file (`caCrl`).
fn revocation_lists(
    path: &Path,
) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    let crls: Vec<_> = rustls_pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| file_error(path)(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path)(&e))?;
    if crls.is_empty() {
        return Err(file_error(path)(
            &"no certificate revocation list in the file",
        ));
    }
    Ok(crls)
}

/// Trusted roots from a PEM bundle.
fn root_store(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .map_err(|e| file_error(ca)(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(ca)(&e))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(file_error(ca)(&"no CA certificate in the file"));
    }
    Ok(roots)
}

/// The platform's trusted roots (used when `caCertificates` is unset), as
/// `rustls-native-certs` finds them: `SSL_CERT_FILE` / `SSL_CERT_DIR`, else the system's
/// own bundle wherever the distribution keeps it.
fn system_roots() -> Result<rustls::RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(file_error(Path::new("the system trust store"))(&why));
    }
    Ok(roots)
}

/// How to originate TLS to a cluster's endpoints (DestinationRule `tls`).
#[derive(Clone, Debug)]
pub struct Origination {
    pub config: Arc<rustls::ClientConfig>,
    /// `sni`; `None` takes the request's host (Istio's default), or the endpoint for TCP.
    pub sni: Option<String>,
}

/// The client configuration for a DestinationRule `tls` block.
pub fn origination(tls: &ClientTls, credentials: Option<&Path>) -> Result<Origination, TlsError> {
    let files = crate::credentials::client_files(tls, credentials)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
        Arc::new(AcceptAny(provider))
    } else {
        let (roots, source) = match &files.ca {
            Some(ca) => (root_store(ca)?, ca.clone()),
            None => (system_roots()?, PathBuf::from("the system trust store")),
        };
        let mut builder =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider);
        if let Some(crl) = &tls.ca_crl {
            builder = builder.with_crls(revocation_lists(Path::new(crl))?);
        }
        let inner = builder.build().map_err(|e| file_error(&source)(&e))?;
        let names = match (&tls.sni, tls.subject_alt_names.is_empty()) {
            (_, false) => NameCheck::Listed(tls.subject_alt_names.clone()),
            (None, true) => NameCheck::SniSent,
            (Some(_), true) => NameCheck::ChainOnly,
        };
        Arc::new(SanVerifier { inner, names })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_error(cert)(&e))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_error(cert)(&e))?;
            let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key)(&e))?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| file_error(cert)(&e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Origination {
        config: Arc::new(config),
        sni: tls.sni.clone(),
    })
}

/// Which name an upstream certificate must carry, as Istio sets Envoy's validation up: one
/// of `subjectAltNames` when given; else, when `sni` is unset too, the SNI sent (Envoy's
/// `auto_san_validation`); else none — the CA's signature alone.
#[derive(Debug)]
enum NameCheck {
    Listed(Vec<String>),
    SniSent,
    ChainOnly,
}

/// Verifies the chain against the CA, then the name as [`NameCheck`] says.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: NameCheck,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let wanted = match (&self.names, verified) {
            (NameCheck::SniSent, verified) => return verified,
            (_, Err(e)) if !is_name_mismatch(&e) => return Err(e),
            (NameCheck::ChainOnly, _) => return Ok(ServerCertVerified::assertion()),
            (NameCheck::Listed(wanted), _) => wanted,
        };
        // Any name type: Istio's `spiffe://` identities are URI names.
        if super::client_auth::has_any_name(end_entity, wanted).map_err(rustls::Error::General)? {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the certificate matches none of subjectAltNames {wanted:?}"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether verification failed only because the certificate is for another name.
fn is_name_mismatch(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. }
        )
    )
}

/// `insecureSkipVerify`: any certificate is accepted; signatures are still checked.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens TLS over `tcp` to `name` (the SNI, and the name verified when no
/// `subjectAltNames` are given). Errors read as Envoy's transport failure reasons.
pub async fn connect(
    origination: &Origination,
    name: &str,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|_| format!("TLS_error: {name:?} is not a valid server name"))?;
    tokio_rustls::TlsConnector::from(Arc::clone(&origination.config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidCertificate(_) | rustls::Error::General(_)
                    )
                });
            if certificate {
                format!("TLS_error: CERTIFICATE_VERIFY_FAILED: {e}")
            } else {
                format!("TLS_error: {e}")
            }
        })
}
