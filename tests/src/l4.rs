//! Connection-level test support: a test CA issuing real certificates, TCP and TLS upstreams
//! that say who they are, and raw TCP/TLS clients.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate authority for one test, writing its files under `dir`.
pub struct TestCa {
    pub dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert_pem: String,
}

/// A certificate and key issued by a [`TestCa`], as PEM and as files.
pub struct Issued {
    /// The DER SubjectPublicKeyInfo of the key, which `verifyCertificateSpki` pins.
    pub spki_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "meshroute-ca-{name}-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("meshroute test CA {name}"),
        );
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_pem = cert.pem();
        std::fs::write(dir.join("ca.crt"), &cert_pem).unwrap();
        Self {
            dir,
            issuer: rcgen::Issuer::new(params, key),
            cert_pem,
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `issued` as an Istio `credentialName` secret: `<dir>/creds/<name>/tls.crt`, `tls.key`
    /// and this CA as `ca.crt`. Returns the credentials directory.
    pub fn credential(&self, name: &str, issued: &Issued) -> PathBuf {
        let creds = self.dir.join("creds");
        let dir = creds.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), &issued.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), &issued.key_pem).unwrap();
        std::fs::write(dir.join("ca.crt"), &self.cert_pem).unwrap();
        creds
    }

    /// A leaf certificate for `names` (DNS SANs) with an ECDSA P-256 key, saved as
    /// `<file>.crt` / `<file>.key`.
    pub fn issue(&self, file: &str, names: &[&str]) -> Issued {
        self.issue_with(file, names, rcgen::KeyPair::generate().unwrap())
    }

    /// As [`TestCa::issue`], with a 2048-bit RSA key made by `openssl genpkey` (the crypto
    /// backend signs with RSA keys but does not make them).
    pub fn issue_rsa(&self, file: &str, names: &[&str]) -> Issued {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl genpkey: {out:?}");
        let pem = String::from_utf8(out.stdout).unwrap();
        let key = rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        self.issue_with(file, names, key)
    }

    fn issue_with(&self, file: &str, names: &[&str], key: rcgen::KeyPair) -> Issued {
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        self.sign(file, params, key)
    }

    /// A client certificate whose only name is the URI `uri` (a SPIFFE identity, as Istio's
    /// workloads carry), with serial number `serial`.
    pub fn issue_uri(&self, file: &str, uri: &str, serial: u64) -> Issued {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        self.sign(file, params, rcgen::KeyPair::generate().unwrap())
    }

    /// A revocation list of this CA revoking `serials`, saved as `<file>.pem`.
    pub fn revocation_list(&self, file: &str, serials: &[u64]) -> PathBuf {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(s),
                    revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).unwrap();
        let path = self.dir.join(format!("{file}.pem"));
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }

    fn sign(&self, file: &str, params: rcgen::CertificateParams, key: rcgen::KeyPair) -> Issued {
        use rcgen::PublicKeyData as _;
        let spki_der = key.subject_public_key_info();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_file, key_file) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Issued {
            spki_der,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_file,
            key_file,
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An upstream on 127.0.0.1 that answers every connection (raw TCP, or TLS with a
/// certificate) with `<name>:` followed by what it read, and counts connections.
pub struct EchoServer {
    pub name: String,
    pub port: u16,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Plain TCP: echoes each chunk prefixed with the name, until the client closes.
    pub fn tcp(name: &str) -> Self {
        Self::start(name, None)
    }

    /// TLS with `cert`: reads one HTTP/1.1 request head (or any bytes up to a blank line)
    /// and answers `200` with the name as body and `x-upstream`, keeping the connection.
    pub fn tls(name: &str, cert: &Issued) -> Self {
        Self::tls_verifying(name, cert, None)
    }

    /// As [`EchoServer::tls`], requiring a client certificate issued by `client_ca_pem`
    /// when given.
    pub fn tls_verifying(name: &str, cert: &Issued, client_ca_pem: Option<&str>) -> Self {
        let chain = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        Self::start(name, Some(Arc::new(config)))
    }

    fn start(name: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (n, s, c) = (name.to_owned(), Arc::clone(&stop), Arc::clone(&connections));
        let acceptor = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                c.fetch_add(1, Ordering::Relaxed);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let (n, tls) = (n.clone(), tls.clone());
                thread::spawn(move || match tls {
                    None => echo(conn, &n),
                    Some(config) => {
                        let Ok(server) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        answer_http(rustls::StreamOwned::new(server, conn), &n);
                    }
                });
            }
        });
        Self {
            name: name.to_owned(),
            port,
            stop,
            connections,
            acceptor: Some(acceptor),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

fn echo(mut conn: TcpStream, name: &str) {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = conn.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                let mut out = format!("{name}:").into_bytes();
                out.extend_from_slice(&buf[..n]);
                if conn.write_all(&out).is_err() {
                    return;
                }
            }
        }
    }
}

fn answer_http(mut s: impl Read + Write, name: &str) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-upstream: {name}\r\ncontent-length: {}\r\n\r\n{name}",
                name.len()
            );
            if s.write_all(reply.as_bytes())
                .and_then(|()| s.flush())
                .is_err()
            {
                return;
            }
            head.clear();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Sends `payload` over TCP to 127.0.0.1:`port`, half-closes, and reads everything back.
pub fn tcp_exchange(port: u16, payload: &str) -> Result<String, String> {
    tcp_exchange_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), payload)
}

/// As [`tcp_exchange`], to any loopback address.
pub fn tcp_exchange_at(addr: std::net::SocketAddr, payload: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(payload.as_bytes()).map_err(|e| e.to_string())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A TLS client: SNI `sni`, trusting `ca_pem`, presenting `client` when given.
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    pub fn new(ca_pem: &str, client: Option<&Issued>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(c) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        Self {
            config: Arc::new(config),
        }
    }

    /// An HTTP/1.1 GET over TLS to 127.0.0.1:`port` with SNI and Host `sni`; the whole
    /// response text, or why the connection failed.
    pub fn get(&self, port: u16, sni: &str, path: &str) -> Result<String, String> {
        self.get_at(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            sni,
            path,
        )
    }

    /// As [`TlsClient::get`], to any loopback address.
    pub fn get_at(
        &self,
        addr: std::net::SocketAddr,
        sni: &str,
        path: &str,
    ) -> Result<String, String> {
        let conn = rustls::ClientConnection::new(
            Arc::clone(&self.config),
            ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // One write, so the request travels in one TLS record.
        let request = format!("GET {path} HTTP/1.1\r\nhost: {sni}\r\n\r\n");
        tls.write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        // Read one response: head, then content-length bytes.
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while !out.ends_with(b"\r\n\r\n") {
            match tls.read(&mut byte) {
                Ok(1) => out.push(byte[0]),
                Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&out))),
                Err(e) => return Err(e.to_string()),
            }
        }
        let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        tls.read_exact(&mut body).map_err(|e| e.to_string())?;
        out.extend_from_slice(&body);
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// The certificate a TLS server at 127.0.0.1:`port` presents for `sni` to a client that
/// verifies signatures with `schemes` only (all the provider's when `None`), as PEM-decoded
/// DER: which of several certificates the server chose.
pub fn presented_certificate(
    port: u16,
    ca_pem: &str,
    sni: &str,
    schemes: Option<&[rustls::SignatureScheme]>,
) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
    let verifier = Arc::new(OfferedSchemes {
        inner,
        schemes: schemes.map(<[_]>::to_vec),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .ok_or_else(|| "no certificate".to_owned())
}

/// A verifier that offers the server only some signature schemes (what a client that
/// supports RSA only, or ECDSA only, sends).
#[derive(Debug)]
struct OfferedSchemes {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    schemes: Option<Vec<rustls::SignatureScheme>>,
}

impl rustls::client::danger::ServerCertVerifier for OfferedSchemes {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes
            .clone()
            .unwrap_or_else(|| self.inner.supported_verify_schemes())
    }
}

/// Istio's pins of `issued`: its `verifyCertificateSpki` (base64 SHA-256 of the public key
/// info) and `verifyCertificateHash` (SHA-256 of the certificate, as `AB:CD:…`).
pub fn pins(issued: &Issued) -> (String, String) {
    use base64::Engine as _;
    let sha = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    let spki = base64::engine::general_purpose::STANDARD.encode(sha(&issued.spki_der));
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let hash = sha(der.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    (spki, hash)
}

/// The path as text, for YAML.
pub fn path_text(p: &Path) -> String {
    p.display().to_string()
}
