//! What a MUTUAL or OPTIONAL_MUTUAL server asks of a client certificate beyond its CA, as
//! Envoy's `CertificateValidationContext` applies Istio's settings: one of the
//! `subjectAltNames` (exact, any name type), a `verifyCertificateSpki` or
//! `verifyCertificateHash` pin (either list may match), and no revocation by `caCrl`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use meshroute_core::ir::ServerTls;
use meshroute_core::pins;

/// The constraints of one server; equal constraints may share a listener.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ClientConstraints {
    subject_alt_names: Vec<String>,
    spki: Vec<[u8; 32]>,
    hashes: Vec<[u8; 32]>,
    pub(super) crl: Option<PathBuf>,
}

impl ClientConstraints {
    /// The constraints a server's settings name (pins the compiler let through are well
    /// formed; one that is not could never match, so it is left out).
    pub(super) fn of(tls: &ServerTls) -> Self {
        Self {
            subject_alt_names: tls.subject_alt_names.clone(),
            spki: tls
                .verify_certificate_spki
                .iter()
                .filter_map(|p| pins::spki_pin(p))
                .collect(),
            hashes: tls
                .verify_certificate_hash
                .iter()
                .filter_map(|p| pins::certificate_hash(p))
                .collect(),
            crl: tls.ca_crl.as_ref().map(PathBuf::from),
        }
    }

    /// Whether a name or pin is asked for (the CRL goes to the chain verifier).
    fn checks_the_leaf(&self) -> bool {
        !self.subject_alt_names.is_empty() || !self.spki.is_empty() || !self.hashes.is_empty()
    }

    /// Why the leaf certificate fails the names or pins, if it does.
    fn check(&self, der: &CertificateDer<'_>) -> Result<(), String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
        if !self.spki.is_empty() || !self.hashes.is_empty() {
            let spki = sha256(cert.tbs_certificate.subject_pki.raw);
            let whole = sha256(der.as_ref());
            if !self.spki.contains(&spki) && !self.hashes.contains(&whole) {
                return Err("the client certificate matches none of the pinned hashes".into());
            }
        }
        if !self.subject_alt_names.is_empty() && !carries_any(&cert, &self.subject_alt_names)? {
            return Err(format!(
                "the client certificate matches none of subjectAltNames {:?}",
                self.subject_alt_names
            ));
        }
        Ok(())
    }
}

/// Whether a certificate carries one of `wanted` as a subject alternative name of any type,
/// compared exactly, as the typed `exact` matchers Istio's settings become in Envoy.
pub(super) fn has_any_name(der: &CertificateDer<'_>, wanted: &[String]) -> Result<bool, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("the certificate cannot be read: {e}"))?;
    carries_any(&cert, wanted)
}

fn carries_any(cert: &X509Certificate<'_>, wanted: &[String]) -> Result<bool, String> {
    let names = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.as_slice(),
        Ok(None) => &[],
        Err(e) => return Err(format!("the certificate's names cannot be read: {e}")),
    };
    Ok(names.iter().any(|name| {
        wanted.iter().any(|want| match name {
            GeneralName::DNSName(n) | GeneralName::URI(n) | GeneralName::RFC822Name(n) => n == want,
            GeneralName::IPAddress(bytes) => {
                ip_of(bytes).is_some_and(|ip| want.parse::<IpAddr>().is_ok_and(|w| w == ip))
            }
            _ => false,
        })
    }))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The CA's verifier, then the names and pins on the leaf.
#[derive(Debug)]
pub(super) struct ConstrainedVerifier {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) constraints: ClientConstraints,
}

impl ConstrainedVerifier {
    /// `inner` alone when nothing is asked of the leaf.
    pub(super) fn wrap(
        inner: Arc<dyn ClientCertVerifier>,
        constraints: ClientConstraints,
    ) -> Arc<dyn ClientCertVerifier> {
        if constraints.checks_the_leaf() {
            Arc::new(Self { inner, constraints })
        } else {
            inner
        }
    }
}

impl ClientCertVerifier for ConstrainedVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.constraints
            .check(end_entity)
            .map_err(rustls::Error::General)?;
        Ok(verified)
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
