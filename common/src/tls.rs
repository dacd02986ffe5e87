//! TLS for every listening service (rustls with the ring provider).
//!
//! With a certificate and key configured, they are served as they are. Without, the
//! service looks for `<cert dir>/localhost.crt` and `localhost.key` and, when they are not
//! there, generates a self-signed certificate for `localhost`, `127.0.0.1` and `::1`
//! (rcgen; more names on request, see [`ensure_generated_with`]) and writes it there, so `curl --cacert <cert dir>/localhost.crt` works and every
//! later start (and every other service sharing the directory) serves the same one.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files given by the operator.
    Files { cert: PathBuf, key: PathBuf },
    /// Reuse or generate `localhost.crt` / `localhost.key` in this directory.
    Generated { dir: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("certificate and key do not form a valid TLS configuration: {0}")]
    Config(String),
    #[error("the private key {key} does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// File names used for a generated certificate.
pub const CERT_FILE: &str = "localhost.crt";
pub const KEY_FILE: &str = "localhost.key";

/// The hosts a generated certificate is valid for.
pub const GENERATED_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Builds the rustls server configuration (HTTP/2 and HTTP/1.1 through ALPN).
pub fn server_config(source: &CertSource) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_path, key_path) = match source {
        CertSource::Files { cert, key } => (cert.clone(), key.clone()),
        CertSource::Generated { dir } => ensure_generated(dir)?,
    };
    let certs = read_certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|_| TlsError::Pem {
        path: key_path.clone(),
        what: "private key",
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                }
            }
            other => TlsError::Config(other.to_string()),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Returns the paths of the certificate and key in `dir`, generating them first if the
/// certificate is missing. The key is written before the certificate (both atomically), so
/// an existing certificate always has its key beside it.
pub fn ensure_generated(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    ensure_generated_with(dir, &[])
}

/// [`ensure_generated`], with `extra_sans` (DNS names or IP addresses, see [`valid_san`])
/// added to [`GENERATED_SANS`] when the certificate is generated. An existing pair is kept
/// as it is, whatever names it holds.
pub fn ensure_generated_with(
    dir: &Path,
    extra_sans: &[String],
) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let (cert_pem, key_pem) =
        generate(extra_sans).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_atomically(&key_path, key_pem.as_bytes(), true)?;
    write_atomically(&cert_path, cert_pem.as_bytes(), false)?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed TLS certificate");
    Ok((cert_path, key_path))
}

/// A self-signed server certificate that strict verifiers accept as its own trust anchor
/// (Python 3.13's default `VERIFY_X509_STRICT` included): subject and authority key
/// identifiers, server-auth usage, a common name.
fn generate(extra_sans: &[String]) -> Result<(String, String), rcgen::Error> {
    use rcgen::{DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose};
    let mut sans: Vec<String> = GENERATED_SANS.iter().map(|s| s.to_string()).collect();
    for san in extra_sans {
        if !sans.iter().any(|s| s.eq_ignore_ascii_case(san)) {
            sans.push(san.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(sans)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "msghash localhost");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Whether `name` can be a subject alternative name of a generated certificate: an IP
/// address, or a DNS name (letters, digits, `-`, dot-separated labels of at most 63
/// characters, at most 253 in all; a leading `*.` wildcard allowed).
pub fn valid_san(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && name.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn write_atomically(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses_and_serves_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = CertSource::Generated {
            dir: dir.path().join("certs"),
        };
        server_config(&source).expect("generated config");
        let cert = std::fs::read(dir.path().join("certs").join(CERT_FILE)).expect("cert");
        server_config(&source).expect("reused config");
        let again = std::fs::read(dir.path().join("certs").join(CERT_FILE)).expect("cert");
        assert_eq!(cert, again, "a second start must reuse the certificate");

        let files = CertSource::Files {
            cert: dir.path().join("certs").join(CERT_FILE),
            key: dir.path().join("certs").join(KEY_FILE),
        };
        let config = server_config(&files).expect("configured files");
        assert_eq!(config.alpn_protocols[0], b"h2");
    }

    #[test]
    fn extra_names_are_added_to_a_new_certificate_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = vec![
            "edge".to_owned(),
            "10.1.2.3".to_owned(),
            "LOCALHOST".to_owned(),
        ];
        let (cert, _) = ensure_generated_with(dir.path(), &extra).expect("generated");
        let pem = std::fs::read(&cert).expect("cert");
        let der = read_certs(&cert).expect("parses").remove(0);
        let contains = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"edge"), "DNS name edge");
        assert!(contains(&[10, 1, 2, 3]), "IP address");
        // Kept as it is on the next call, whatever is asked.
        ensure_generated_with(dir.path(), &["other".to_owned()]).expect("kept");
        assert_eq!(std::fs::read(&cert).expect("cert"), pem);

        for ok in [
            "edge",
            "query-1.msghash.svc",
            "*.example.com",
            "::1",
            "10.0.0.1",
        ] {
            assert!(valid_san(ok), "{ok}");
        }
        for bad in ["", "has space", "-x", "a..b", "é.com", &"a".repeat(64)] {
            assert!(!valid_san(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_the_file_that_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bogus = dir.path().join("bogus.pem");
        std::fs::write(&bogus, "not a pem").expect("write");
        let err = server_config(&CertSource::Files {
            cert: bogus.clone(),
            key: bogus.clone(),
        })
        .expect_err("must fail");
        assert!(err.to_string().contains("bogus.pem"), "{err}");
        let missing = server_config(&CertSource::Files {
            cert: dir.path().join("missing.crt"),
            key: bogus,
        })
        .expect_err("must fail");
        assert!(missing.to_string().contains("missing.crt"), "{missing}");
    }
}
