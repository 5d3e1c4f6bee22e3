//! Gateway: servers, ports, hosts and TLS settings.

use std::collections::{BTreeMap, BTreeSet};

use super::{GATEWAY_PROTOCOLS, V};
use crate::api;
use crate::diag::Diagnostic;
use crate::hosts;
use crate::load::Resource;
use crate::source::FieldPath;

pub(super) fn gateway(r: &Resource<api::Gateway>, out: &mut Vec<Diagnostic>) {
    let mut v = V::new(r, out);
    let spec = FieldPath::root().key("spec");
    if r.spec.servers.is_empty() {
        v.err(
            &spec.key("servers"),
            "gateway must have at least one server",
        );
    }
    if let Some(sel) = &r.spec.selector {
        v.labels(&spec.key("selector"), sel);
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in r.spec.servers.iter().enumerate() {
        let sp = spec.key("servers").idx(i);
        if s.hosts.is_empty() {
            v.err(
                &sp.key("hosts"),
                "server config must contain at least one host",
            );
        }
        for (j, h) in s.hosts.iter().enumerate() {
            let hp = sp.key("hosts").idx(j);
            let (ns, dns) = match h.split_once('/') {
                Some((ns, dns)) => (Some(ns), dns),
                None => (None, h.as_str()),
            };
            if let Some(ns) = ns {
                if ns != "*" && ns != "." && !hosts::is_dns1123_label(ns) {
                    v.err(&hp, format!("invalid namespace value {ns:?} in host {h:?}"));
                }
            }
            if hosts::is_ip(dns) {
                continue;
            }
            if let Err(e) = hosts::validate_wildcard_domain(dns) {
                v.err(&hp, e);
            } else if dns != "*" && !dns.contains('.') {
                v.err(
                    &hp,
                    format!(
                        "short names (non FQDN) are not allowed in Gateway server hosts: {dns:?}"
                    ),
                );
            }
        }
        let Some(port) = &s.port else {
            v.err(&sp.key("port"), "port is required");
            continue;
        };
        let pp = sp.key("port");
        v.port_number(&pp.key("number"), port.number, true);
        let proto = port.protocol.to_ascii_uppercase();
        if !GATEWAY_PROTOCOLS.contains(&proto.as_str()) {
            v.err(&pp.key("protocol"), format!("invalid protocol {:?}, supported protocols are HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP, TLS, HTTPS", port.protocol));
        }
        if port.name.is_empty() {
            v.err(&pp.key("name"), "port name must be set");
        } else if let Some(first) = names.insert(&port.name, i) {
            v.err(&pp.key("name"), format!("port names in servers must be unique: duplicate name {} (also spec.servers[{first}])", port.name));
        }
        if port.target_port.is_some() {
            v.err(
                &pp.key("targetPort"),
                "targetPort has no impact on Gateways",
            );
        }
        if let Some(b) = &s.bind {
            if let Some(socket) = b.strip_prefix("unix://") {
                if let Err(e) = super::unix_address(socket) {
                    v.err(&sp.key("bind"), e);
                }
                if port.number.is_some_and(|n| n != 0) {
                    v.err(
                        &pp.key("number"),
                        format!("port number must be 0 for unix domain socket: {b}"),
                    );
                }
                v.err(&sp.key("bind"), "a bind to a unix domain socket is not supported by meshroute: its gateways listen on TCP ports only");
            } else if !hosts::is_ip(b) {
                v.err(&sp.key("bind"), format!("{b} is not a valid IP"));
            } else {
                v.warn(&sp.key("bind"), "bind has no effect in meshroute: a gateway listens for each server port on the address it was started with, not on a server's own");
            }
        }
        let tls_proto = proto == "HTTPS" || proto == "TLS";
        match &s.tls {
            None if tls_proto => v.err(
                &sp.key("tls"),
                "server must have TLS settings for HTTPS/TLS protocols",
            ),
            None => {}
            Some(t) => {
                let tp = sp.key("tls");
                let has_settings = t.mode.is_some()
                    || t.server_certificate.is_some()
                    || t.private_key.is_some()
                    || t.ca_certificates.is_some()
                    || t.credential_name.is_some();
                if !tls_proto && has_settings {
                    v.err(
                        &tp,
                        "server cannot have TLS settings for plain text HTTP ports",
                    );
                }
                if t.https_redirect == Some(true) && proto != "HTTP" {
                    v.warn(
                        &tp.key("httpsRedirect"),
                        "tls.httpsRedirect should only be used with http servers",
                    );
                }
                if tls_proto {
                    server_tls(&mut v, &tp, t);
                }
            }
        }
    }
}

/// istiod's `validateTLSOptions`, in its words, then what meshroute's servers cannot do.
pub(super) fn server_tls(v: &mut V<'_>, p: &FieldPath, t: &api::ServerTlsSettings) {
    let mode = t.mode.as_deref().unwrap_or("PASSTHROUGH");
    let files = t.server_certificate.is_some() || t.private_key.is_some();
    let any_cert = files
        || t.ca_certificates.is_some()
        || t.ca_crl.is_some()
        || t.credential_name.is_some()
        || !t.credential_names.is_empty()
        || !t.tls_certificates.is_empty();
    match mode {
        "ISTIO_MUTUAL" => {
            for (set, what) in [
                (t.server_certificate.is_some(), "server certificate"),
                (t.private_key.is_some(), "private key"),
                (t.ca_certificates.is_some(), "CA bundle"),
                (!t.tls_certificates.is_empty(), "tlsCertificates"),
                (t.credential_name.is_some(), "credentialName"),
                (!t.credential_names.is_empty(), "credentialNames"),
            ] {
                if set {
                    v.err(p, format!("ISTIO_MUTUAL TLS cannot have associated {what}"));
                }
            }
        }
        "PASSTHROUGH" | "AUTO_PASSTHROUGH" if any_cert => v.warn(
            p,
            format!("{mode} mode does not use certificates, they will be ignored"),
        ),
        "PASSTHROUGH" | "AUTO_PASSTHROUGH" | "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" => {}
        other => v.err(&p.key("mode"), format!("unknown TLS mode {other:?}")),
    }
    if mode != "ISTIO_MUTUAL" {
        let sources = [
            t.server_certificate.is_some() && t.private_key.is_some(),
            t.credential_name.is_some(),
            !t.credential_names.is_empty(),
            !t.tls_certificates.is_empty(),
        ];
        if sources.iter().filter(|&&s| s).count() > 1 {
            v.err(p, "only one of credential_name, credential_names, server_certificate/private_key, tls_certificates should be specified");
        }
        let terminates = matches!(mode, "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL");
        let from_credential = t.credential_name.is_some() || !t.credential_names.is_empty();
        // istiod stops here for a credential: its files (and CRL) come with the secret.
        let checks_files = !(terminates && from_credential);
        if terminates && !from_credential {
            let prefix = if mode == "SIMPLE" {
                "SIMPLE TLS"
            } else {
                "MUTUAL TLS"
            };
            if mode != "SIMPLE"
                && t.ca_certificates.is_none()
                && t.ca_cert_credential_name.is_none()
            {
                v.err(
                    &p.key("caCertificates"),
                    format!("{prefix} requires a client CA bundle"),
                );
            }
            if t.tls_certificates.len() > 2 {
                v.warn(
                    &p.key("tlsCertificates"),
                    format!("{prefix} can support up to 2 server certificates"),
                );
            }
            let pairs: Vec<(bool, bool, FieldPath)> = if t.tls_certificates.is_empty() {
                vec![(
                    t.server_certificate.is_some(),
                    t.private_key.is_some(),
                    p.clone(),
                )]
            } else {
                t.tls_certificates
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let cp = p.key("tlsCertificates").idx(i);
                        (c.server_certificate.is_some(), c.private_key.is_some(), cp)
                    })
                    .collect()
            };
            for (cert, key, cp) in pairs {
                if !cert {
                    v.err(
                        &cp.key("serverCertificate"),
                        format!("{prefix} requires a server certificate"),
                    );
                }
                if !key {
                    v.err(
                        &cp.key("privateKey"),
                        format!("{prefix} requires a private key"),
                    );
                }
            }
        }
        if t.ca_crl.is_some() && checks_files {
            if t.credential_name.is_some() {
                v.err(&p.key("caCrl"), "CRL is not supported with credentialName. CRL has to be specified in the credential");
            }
            if mode == "SIMPLE" {
                v.err(&p.key("caCrl"), "CRL is not supported with SIMPLE TLS");
            }
        }
    }
    client_certificate_constraints(v, p, t, mode);
    if t.ca_cert_credential_name.is_some() && !matches!(mode, "MUTUAL" | "OPTIONAL_MUTUAL") {
        v.warn(
            &p.key("caCertCredentialName"),
            format!("caCertCredentialName has no effect in {mode} mode: only MUTUAL and OPTIONAL_MUTUAL verify client certificates"),
        );
    }
    let rank = |val: &str| match val {
        "TLSV1_0" => Some(0),
        "TLSV1_1" => Some(1),
        "TLSV1_2" => Some(2),
        "TLSV1_3" => Some(3),
        _ => None,
    };
    for (f, val) in [
        ("minProtocolVersion", &t.min_protocol_version),
        ("maxProtocolVersion", &t.max_protocol_version),
    ] {
        if let Some(val) = val {
            if val != "TLS_AUTO" && rank(val).is_none() {
                v.err(&p.key(f), format!("unknown TLS version {val:?}"));
            } else if matches!(val.as_str(), "TLSV1_0" | "TLSV1_1") {
                // A lower minimum only widens what is accepted; a lower maximum cannot be met.
                if f == "maxProtocolVersion" {
                    v.err(&p.key(f), format!("{val} is not supported by meshroute: its servers speak TLS 1.2 and 1.3 only"));
                } else {
                    v.warn(
                        &p.key(f),
                        format!("{val}: TLS 1.2 is the lowest version meshroute serves"),
                    );
                }
            }
        }
    }
    if let (Some(min), Some(max)) = (
        t.min_protocol_version.as_deref().and_then(rank),
        t.max_protocol_version.as_deref().and_then(rank),
    ) {
        if min > max {
            v.err(
                &p.key("minProtocolVersion"),
                "minProtocolVersion must be less than or equal to maxProtocolVersion",
            );
        }
    }
    cipher_suites(v, &p.key("cipherSuites"), &t.cipher_suites);
}

/// The suites Istio accepts in `cipherSuites` (istio/istio 1.30.3,
/// `pkg/config/security/security.go` `ValidCipherSuites`: BoringSSL's, without PSK).
const ISTIO_CIPHER_SUITES: [&str; 15] = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "DES-CBC3-SHA",
];

/// istiod's `IsValidCipherSuite`: a known suite, `ALL`, or an expression with a leading
/// operator (`-X`, `+X`, `!X`) that Envoy's BoringSSL reads.
fn is_valid_cipher_suite(suite: &str) -> bool {
    suite.is_empty()
        || suite == "ALL"
        || !suite.starts_with(|c: char| c.is_alphanumeric())
        || ISTIO_CIPHER_SUITES.contains(&suite)
}

/// The suites handed to the hosts, as istiod filters them: invalid ones and repeats dropped.
pub(crate) fn filter_cipher_suites(suites: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(suites.len());
    for s in suites {
        if is_valid_cipher_suite(s) && !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

fn cipher_suites(v: &mut V<'_>, p: &FieldPath, suites: &[String]) {
    let mut invalid = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut duplicate = BTreeSet::new();
    for (i, suite) in suites.iter().enumerate() {
        if !is_valid_cipher_suite(suite) {
            invalid.insert(suite.as_str());
        } else if !seen.insert(suite.as_str()) {
            duplicate.insert(suite.as_str());
        } else if !meshroute_core::ir::TLS12_CIPHER_SUITES.contains(&suite.as_str()) {
            v.warn(
                &p.idx(i),
                format!(
                    "cipher suite {suite:?} is applied by the generated Envoy bootstrap only: meshroute run serves TLS 1.2 with {} alone",
                    meshroute_core::ir::TLS12_CIPHER_SUITES.join(", ")
                ),
            );
        }
    }
    // Go's `%v` of a sorted list: `[a b]`.
    let list = |set: BTreeSet<&str>| set.into_iter().collect::<Vec<_>>().join(" ");
    if !invalid.is_empty() {
        v.warn(
            p,
            format!("ignoring invalid cipher suites: [{}]", list(invalid)),
        );
    }
    if !duplicate.is_empty() {
        v.warn(
            p,
            format!("ignoring duplicate cipher suites: [{}]", list(duplicate)),
        );
    }
}

/// The constraints on client certificates beyond the CA: both hosts apply them to MUTUAL
/// and OPTIONAL_MUTUAL servers; a SIMPLE server requests no certificate, which is said.
/// Pins must be well-formed, as Envoy refuses a listener whose pins are not.
fn client_certificate_constraints(
    v: &mut V<'_>,
    p: &FieldPath,
    t: &api::ServerTlsSettings,
    mode: &str,
) {
    let verifies = matches!(mode, "MUTUAL" | "OPTIONAL_MUTUAL");
    let terminates = verifies || mode == "SIMPLE";
    let constraints = [
        ("subjectAltNames", !t.subject_alt_names.is_empty()),
        (
            "verifyCertificateSpki",
            !t.verify_certificate_spki.is_empty(),
        ),
        (
            "verifyCertificateHash",
            !t.verify_certificate_hash.is_empty(),
        ),
    ];
    for (field, set) in constraints {
        if set && terminates && !verifies {
            v.warn(
                &p.key(field),
                format!(
                    "{field} has no effect in {mode} mode: client certificates are not requested"
                ),
            );
        }
    }
    for (i, pin) in t.verify_certificate_spki.iter().enumerate() {
        if meshroute_core::pins::spki_pin(pin).is_none() {
            v.err(
                &p.key("verifyCertificateSpki").idx(i),
                format!("{pin:?} is not a base64-encoded SHA-256 hash of a SubjectPublicKeyInfo"),
            );
        }
    }
    for (i, pin) in t.verify_certificate_hash.iter().enumerate() {
        if meshroute_core::pins::certificate_hash(pin).is_none() {
            v.err(
                &p.key("verifyCertificateHash").idx(i),
                format!("{pin:?} is not a hex-encoded SHA-256 hash of a certificate (64 hex digits, colons allowed)"),
            );
        }
    }
    if t.insecure_skip_verify == Some(true) && verifies {
        v.warn(
            &p.key("insecureSkipVerify"),
            "insecureSkipVerify has no effect in meshroute: a client certificate that fails verification is refused",
        );
    }
    for (i, c) in t.tls_certificates.iter().enumerate() {
        if c.ca_certificates.is_some() {
            v.warn(
                &p.key("tlsCertificates").idx(i).key("caCertificates"),
                "caCertificates of a tlsCertificates entry has no effect, as in istiod: client certificates are verified with the server's caCertificates",
            );
        }
    }
}
