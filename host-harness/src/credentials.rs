//! Where TLS material comes from: files named in the configuration, or an Istio
//! `credentialName`, which here is a directory `<credentials-dir>/<name>/` laid out as a
//! mounted Kubernetes TLS secret: `tls.crt`, `tls.key` and, for client verification or
//! origination, `ca.crt`.

use std::path::{Path, PathBuf};

use meshroute_core::ir::{ClientTls, ServerTls, ServerTlsMode};

/// Why a TLS setting names no usable files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("credentialName {0:?} needs --credentials-dir")]
    NoDirectory(String),
    #[error("a {0} TLS server needs serverCertificate and privateKey, or credentialName")]
    NoCertificate(ServerTlsMode),
}

/// A Gateway server's certificates with their keys (one, or an RSA and an ECDSA one) and
/// (MUTUAL) client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub keys: Vec<KeyFiles>,
    pub client_ca: Option<PathBuf>,
}

/// A certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl KeyFiles {
    fn in_secret(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }
}

/// A DestinationRule's client certificate and key (MUTUAL) and the CA to verify with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

fn secret_dir(credentials: Option<&Path>, name: &str) -> Result<PathBuf, CredentialError> {
    credentials
        .map(|d| d.join(name))
        .ok_or_else(|| CredentialError::NoDirectory(name.to_owned()))
}

/// The files of a terminating Gateway server.
pub fn server_files(
    tls: &ServerTls,
    credentials: Option<&Path>,
) -> Result<ServerFiles, CredentialError> {
    let mutual = tls.mode.verifies_clients();
    // A secret of its own for the client CA comes first (Istio 1.28's caCertCredentialName).
    let ca_secret = match (&tls.ca_cert_credential_name, mutual) {
        (Some(name), true) => Some(secret_dir(credentials, name)?.join("ca.crt")),
        _ => None,
    };
    // As istiod: several secrets share the first one's CA.
    let names: Vec<&String> = if tls.credential_names.is_empty() {
        tls.credential_name.iter().collect()
    } else {
        tls.credential_names.iter().collect()
    };
    if !names.is_empty() {
        let dirs = names
            .iter()
            .map(|n| secret_dir(credentials, n))
            .collect::<Result<Vec<_>, _>>()?;
        let ca = ca_secret
            .or_else(|| tls.ca_certificates.as_ref().map(PathBuf::from))
            .or_else(|| dirs.first().filter(|_| mutual).map(|d| d.join("ca.crt")));
        return Ok(ServerFiles {
            keys: dirs.iter().map(|d| KeyFiles::in_secret(d)).collect(),
            client_ca: ca,
        });
    }
    let client_ca = ca_secret.or_else(|| tls.ca_certificates.as_ref().map(PathBuf::from));
    if !tls.tls_certificates.is_empty() {
        return Ok(ServerFiles {
            keys: tls
                .tls_certificates
                .iter()
                .map(|c| KeyFiles {
                    cert: PathBuf::from(&c.server_certificate),
                    key: PathBuf::from(&c.private_key),
                })
                .collect(),
            client_ca,
        });
    }
    match (&tls.server_certificate, &tls.private_key) {
        (Some(c), Some(k)) => Ok(ServerFiles {
            keys: vec![KeyFiles {
                cert: PathBuf::from(c),
                key: PathBuf::from(k),
            }],
            client_ca,
        }),
        _ => Err(CredentialError::NoCertificate(tls.mode)),
    }
}

/// The files of a DestinationRule `tls` block; a `credentialName` secret supplies the client
/// certificate and key, and its `ca.crt` when it has one.
pub fn client_files(
    tls: &ClientTls,
    credentials: Option<&Path>,
) -> Result<ClientFiles, CredentialError> {
    if let Some(name) = &tls.credential_name {
        let dir = secret_dir(credentials, name)?;
        let ca = dir.join("ca.crt");
        return Ok(ClientFiles {
            cert: Some(dir.join("tls.crt")),
            key: Some(dir.join("tls.key")),
            ca: ca.exists().then_some(ca),
        });
    }
    Ok(ClientFiles {
        cert: tls.client_certificate.as_ref().map(PathBuf::from),
        key: tls.private_key.as_ref().map(PathBuf::from),
        ca: tls.ca_certificates.as_ref().map(PathBuf::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_point_into_the_credentials_directory() {
        let tls = ServerTls {
            mode: ServerTlsMode::Mutual,
            credential_name: Some("gw-cert".into()),
            ..Default::default()
        };
        let files = server_files(&tls, Some(Path::new("/creds"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(files.keys[0].cert, Path::new("/creds/gw-cert/tls.crt"));
        assert_eq!(files.keys[0].key, Path::new("/creds/gw-cert/tls.key"));
        assert_eq!(
            files.client_ca.as_deref(),
            Some(Path::new("/creds/gw-cert/ca.crt"))
        );
        let e = server_files(&tls, None).unwrap_err();
        assert!(e.to_string().contains("--credentials-dir"), "{e}");
        let simple = ServerTls {
            mode: ServerTlsMode::Simple,
            ..Default::default()
        };
        assert!(server_files(&simple, None)
            .unwrap_err()
            .to_string()
            .contains("serverCertificate"));
    }

    #[test]
    fn two_certificates_come_from_two_secrets_or_two_file_pairs() {
        let tls = ServerTls {
            mode: ServerTlsMode::Mutual,
            credential_names: vec!["rsa".into(), "ecdsa".into()],
            ..Default::default()
        };
        let files = server_files(&tls, Some(Path::new("/creds"))).unwrap_or_else(|e| panic!("{e}"));
        let certs: Vec<_> = files.keys.iter().map(|k| k.cert.clone()).collect();
        assert_eq!(
            certs,
            [
                Path::new("/creds/rsa/tls.crt"),
                Path::new("/creds/ecdsa/tls.crt")
            ]
        );
        // The first secret's CA verifies clients, as istiod has it.
        assert_eq!(
            files.client_ca.as_deref(),
            Some(Path::new("/creds/rsa/ca.crt"))
        );
        let pairs = ServerTls {
            mode: ServerTlsMode::Simple,
            tls_certificates: vec![
                meshroute_core::ir::CertificateFiles {
                    server_certificate: "/a.crt".into(),
                    private_key: "/a.key".into(),
                },
                meshroute_core::ir::CertificateFiles {
                    server_certificate: "/b.crt".into(),
                    private_key: "/b.key".into(),
                },
            ],
            ..Default::default()
        };
        let files = server_files(&pairs, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(files.keys.len(), 2);
        assert_eq!(files.keys[1].key, Path::new("/b.key"));
        assert_eq!(files.client_ca, None);
    }
}
