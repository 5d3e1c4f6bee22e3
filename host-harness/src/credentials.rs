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

/// A Gateway server's certificate, key and (MUTUAL) client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
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
    if let Some(name) = &tls.credential_name {
        let dir = secret_dir(credentials, name)?;
        let ca = ca_secret
            .or_else(|| tls.ca_certificates.as_ref().map(PathBuf::from))
            .or_else(|| mutual.then(|| dir.join("ca.crt")));
        return Ok(ServerFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: ca,
        });
    }
    match (&tls.server_certificate, &tls.private_key) {
        (Some(c), Some(k)) => Ok(ServerFiles {
            cert: PathBuf::from(c),
            key: PathBuf::from(k),
            client_ca: ca_secret.or_else(|| tls.ca_certificates.as_ref().map(PathBuf::from)),
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
        assert_eq!(files.cert, Path::new("/creds/gw-cert/tls.crt"));
        assert_eq!(files.key, Path::new("/creds/gw-cert/tls.key"));
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
}
