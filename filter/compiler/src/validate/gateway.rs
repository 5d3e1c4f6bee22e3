//! Gateway: servers, ports, hosts and TLS settings.

use std::collections::BTreeMap;

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
            if !hosts::is_ip(b) && !b.starts_with("unix://") {
                v.err(
                    &sp.key("bind"),
                    format!("{b:?} is not a valid IP address or unix:// socket"),
                );
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

pub(super) fn server_tls(v: &mut V<'_>, p: &FieldPath, t: &api::ServerTlsSettings) {
    let mode = t.mode.as_deref().unwrap_or("PASSTHROUGH");
    let has_cred = t.credential_name.is_some()
        || !t.credential_names.is_empty()
        || !t.tls_certificates.is_empty();
    match mode {
        "PASSTHROUGH" | "AUTO_PASSTHROUGH" => {}
        "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" => {
            if !has_cred {
                if t.server_certificate.is_none() {
                    v.err(
                        &p.key("serverCertificate"),
                        format!("{mode} TLS requires a server certificate"),
                    );
                }
                if t.private_key.is_none() {
                    v.err(
                        &p.key("privateKey"),
                        format!("{mode} TLS requires a private key"),
                    );
                }
                if mode != "SIMPLE"
                    && t.ca_certificates.is_none()
                    && t.ca_cert_credential_name.is_none()
                {
                    v.err(
                        &p.key("caCertificates"),
                        format!("{mode} TLS requires a client CA bundle"),
                    );
                }
            }
        }
        "ISTIO_MUTUAL" => {
            if t.server_certificate.is_some()
                || t.private_key.is_some()
                || t.ca_certificates.is_some()
                || has_cred
            {
                v.err(p, "cannot have associated private key/server certificate/credentialName in ISTIO_MUTUAL mode");
            }
        }
        other => v.err(&p.key("mode"), format!("unknown TLS mode {other:?}")),
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
    for (i, suite) in t.cipher_suites.iter().enumerate() {
        if !meshroute_core::ir::TLS12_CIPHER_SUITES.contains(&suite.as_str()) {
            v.err(
                &p.key("cipherSuites").idx(i),
                format!(
                    "cipher suite {suite:?} is not supported by meshroute (it serves {})",
                    meshroute_core::ir::TLS12_CIPHER_SUITES.join(", ")
                ),
            );
        }
    }
}

/// What a server's TLS settings ask beyond one certificate and one client CA. meshroute's
/// servers verify a client certificate against the CA alone and serve one certificate, so
/// each such setting is refused where it would narrow who gets in (accepting it would let
/// in every certificate the CA signed) and reported where it would only be ignored.
fn client_certificate_constraints(
    v: &mut V<'_>,
    p: &FieldPath,
    t: &api::ServerTlsSettings,
    mode: &str,
) {
    let verifies = matches!(mode, "MUTUAL" | "OPTIONAL_MUTUAL");
    let terminates = verifies || mode == "SIMPLE";
    let constraints = [
        (
            "subjectAltNames",
            !t.subject_alt_names.is_empty(),
            "the names of a client certificate are not checked",
        ),
        (
            "verifyCertificateSpki",
            !t.verify_certificate_spki.is_empty(),
            "client certificates are not pinned by public key",
        ),
        (
            "verifyCertificateHash",
            !t.verify_certificate_hash.is_empty(),
            "client certificates are not pinned by hash",
        ),
        (
            "caCrl",
            t.ca_crl.is_some(),
            "client certificates are not checked for revocation",
        ),
    ];
    for (field, set, what) in constraints {
        if !set {
            continue;
        }
        if verifies {
            v.err(
                &p.key(field),
                format!("{field} is not supported by meshroute: {what}, so every certificate the CA signed would be accepted"),
            );
        } else if terminates {
            v.warn(
                &p.key(field),
                format!(
                    "{field} has no effect in {mode} mode: client certificates are not requested"
                ),
            );
        }
    }
    if t.insecure_skip_verify == Some(true) && verifies {
        v.warn(
            &p.key("insecureSkipVerify"),
            "insecureSkipVerify has no effect in meshroute: a client certificate that fails verification is refused",
        );
    }
    if terminates {
        if !t.credential_names.is_empty() {
            v.err(
                &p.key("credentialNames"),
                "credentialNames is not supported by meshroute: a server serves one certificate; name it with credentialName",
            );
        }
        if !t.tls_certificates.is_empty() {
            v.err(
                &p.key("tlsCertificates"),
                "tlsCertificates is not supported by meshroute: a server serves one certificate; give it with serverCertificate and privateKey",
            );
        }
    }
}
