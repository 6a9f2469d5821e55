//! TLS for the API: loading a PEM certificate chain and key into a rustls `ServerConfig`, and
//! the self-signed development certificate `chartlog serve` uses when none is given.
//!
//! The crypto provider is ring, chosen explicitly rather than left to rustls' process-wide
//! default, so the choice cannot change when another dependency enables a second provider.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Names the development certificate must be valid for: how a developer's tools reach a
/// server on their own machine.
pub const DEVELOPMENT_SUBJECT_ALT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Lifetime of a generated development certificate. 825 days is the longest lifetime macOS
/// and iOS accept for a trusted server certificate, should a developer add it to a keychain.
pub const DEVELOPMENT_CERTIFICATE_DAYS: i64 = 825;

/// Certificates in one chain file; a real chain is leaf + a few intermediates.
pub const CERTIFICATE_CHAIN_LENGTH_MAX: usize = 16;

/// Where a certificate chain and its private key live, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PemFiles {
    /// The certificate chain, leaf first.
    pub certificate_chain: PathBuf,
    /// The private key of the leaf certificate.
    pub private_key: PathBuf,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain file is unreadable or not PEM.
    #[error("cannot read certificate chain {}: {source}", .path.display())]
    ReadCertificateChain {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: pem::Error,
    },
    /// The certificate chain file holds no certificate.
    #[error("certificate chain {} holds no certificate", .path.display())]
    EmptyCertificateChain {
        /// The file.
        path: PathBuf,
    },
    /// The certificate chain file holds more certificates than any real chain.
    #[error("certificate chain {} holds more than {CERTIFICATE_CHAIN_LENGTH_MAX} certificates", .path.display())]
    CertificateChainTooLong {
        /// The file.
        path: PathBuf,
    },
    /// The private key file is unreadable, not PEM, or holds no key.
    #[error("cannot read private key {}: {source}", .path.display())]
    ReadPrivateKey {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: pem::Error,
    },
    /// rustls refused the certificate and key (for example, the key does not match).
    #[error("certificate chain {} and private key {} are not usable together: {source}", .files.certificate_chain.display(), .files.private_key.display())]
    Unusable {
        /// The files.
        files: PemFiles,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// The protocol versions are not supported by the crypto provider (a build problem).
    #[error("cannot configure TLS 1.2 and 1.3: {0}")]
    ProtocolVersions(rustls::Error),
    /// Only one file of the development pair exists, so neither can be trusted to match.
    #[error("development TLS files are incomplete: {} exists but {} does not; remove it to generate a new pair", .present.display(), .missing.display())]
    IncompleteDevelopmentPair {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// rcgen could not generate the development certificate.
    #[error("cannot generate the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file or directory could not be inspected, created or written.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// What we tried, e.g. "write".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
}

/// Makes ring rustls' process-wide default provider, for code that does not pass one
/// explicitly (database and HTTP clients). Harmless if a provider is already installed.
pub fn install_default_crypto_provider() {
    // Err means some provider is installed already; the first installation wins by design.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A rustls server configuration serving the chain and key in `files`, TLS 1.2 and 1.3 only,
/// without client authentication.
pub fn server_config(files: &PemFiles) -> Result<ServerConfig, TlsError> {
    let certificate_chain = read_certificate_chain(&files.certificate_chain)?;
    let private_key = PrivateKeyDer::from_pem_file(&files.private_key).map_err(|source| {
        TlsError::ReadPrivateKey {
            path: files.private_key.clone(),
            source,
        }
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::ProtocolVersions)?
        .with_no_client_auth()
        .with_single_cert(certificate_chain, private_key)
        .map_err(|source| TlsError::Unusable {
            files: files.clone(),
            source,
        })
}

fn read_certificate_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |source| TlsError::ReadCertificateChain {
        path: path.to_owned(),
        source,
    };
    let mut chain = Vec::new();
    for certificate in CertificateDer::pem_file_iter(path).map_err(read_error)? {
        if chain.len() == CERTIFICATE_CHAIN_LENGTH_MAX {
            return Err(TlsError::CertificateChainTooLong {
                path: path.to_owned(),
            });
        }
        chain.push(certificate.map_err(read_error)?);
    }
    if chain.is_empty() {
        return Err(TlsError::EmptyCertificateChain {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// The development certificate and key under `<data_dir>/tls/`, generated on first use.
///
/// Creates `dev-cert.pem` (self-signed, for [`DEVELOPMENT_SUBJECT_ALT_NAMES`]) and
/// `dev-key.pem` (mode 0600) only when neither exists, so clients that trust the certificate
/// keep trusting it across restarts. If exactly one exists, this refuses rather than
/// overwrite: the pair may have been placed there by hand.
pub fn ensure_development_certificate(data_dir: &Path) -> Result<PemFiles, TlsError> {
    let tls_dir = data_dir.join("tls");
    let files = PemFiles {
        certificate_chain: tls_dir.join("dev-cert.pem"),
        private_key: tls_dir.join("dev-key.pem"),
    };
    let certificate_exists = exists(&files.certificate_chain)?;
    let key_exists = exists(&files.private_key)?;
    match (certificate_exists, key_exists) {
        (true, true) => return Ok(files),
        (true, false) => {
            return Err(TlsError::IncompleteDevelopmentPair {
                present: files.certificate_chain,
                missing: files.private_key,
            });
        }
        (false, true) => {
            return Err(TlsError::IncompleteDevelopmentPair {
                present: files.private_key,
                missing: files.certificate_chain,
            });
        }
        (false, false) => {}
    }

    let (certificate_pem, private_key_pem) = generate_development_certificate()?;
    // The key directory is private to the service user, like the data directory.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tls_dir)
        .map_err(|source| TlsError::Io {
            action: "create directory",
            path: tls_dir.clone(),
            source,
        })?;
    // Key first, certificate last: a crash in between leaves an incomplete pair, which the
    // next start reports instead of serving a certificate without its key.
    write_file_atomically(&files.private_key, private_key_pem.as_bytes(), 0o600)?;
    write_file_atomically(&files.certificate_chain, certificate_pem.as_bytes(), 0o644)?;
    sync_directory(&tls_dir)?;
    tracing::info!(
        certificate = %files.certificate_chain.display(),
        "generated a self-signed development certificate"
    );
    Ok(files)
}

/// A self-signed ECDSA P-256 certificate and its PKCS#8 key, both PEM.
fn generate_development_certificate() -> Result<(String, String), TlsError> {
    let names: Vec<String> = DEVELOPMENT_SUBJECT_ALT_NAMES
        .iter()
        .map(|name| (*name).to_owned())
        .collect();
    let mut params = rcgen::CertificateParams::new(names)?;
    let mut distinguished_name = rcgen::DistinguishedName::new();
    distinguished_name.push(
        rcgen::DnType::CommonName,
        "chartlog development certificate",
    );
    params.distinguished_name = distinguished_name;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that run behind the machine that generated it.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(DEVELOPMENT_CERTIFICATE_DAYS);

    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let certificate = params.self_signed(&key_pair)?;
    Ok((certificate.pem(), key_pair.serialize_pem()))
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Io {
        action: "inspect",
        path: path.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so `path` never holds a partial file, and
/// sets `mode` before any byte is written.
fn write_file_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let temporary = path.with_extension("pem.partial");
    let io_error = |action: &'static str, at: &Path| {
        let at = at.to_owned();
        move |source| TlsError::Io {
            action,
            path: at,
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io_error("create", &temporary))?;
    // `mode` above applies only to a new file; a leftover from a crash keeps its old mode.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error("set permissions on", &temporary))?;
    file.write_all(contents)
        .map_err(io_error("write", &temporary))?;
    file.sync_all().map_err(io_error("sync", &temporary))?;
    drop(file);
    fs::rename(&temporary, path).map_err(io_error("rename into place", path))?;
    Ok(())
}

fn sync_directory(path: &Path) -> Result<(), TlsError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(|source| TlsError::Io {
            action: "sync directory",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_certificate_is_generated_once_and_loads() {
        let data_dir = tempfile::tempdir().expect("temporary directory");
        let files = ensure_development_certificate(data_dir.path()).expect("generated");
        let key_mode = fs::metadata(&files.private_key)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let first = fs::read(&files.certificate_chain).expect("certificate");

        let again = ensure_development_certificate(data_dir.path()).expect("reused");
        assert_eq!(again, files);
        assert_eq!(
            fs::read(&again.certificate_chain).expect("certificate"),
            first
        );

        install_default_crypto_provider();
        server_config(&files).expect("rustls accepts the generated pair");
    }

    #[test]
    fn an_incomplete_development_pair_is_refused() {
        let data_dir = tempfile::tempdir().expect("temporary directory");
        let files = ensure_development_certificate(data_dir.path()).expect("generated");
        fs::remove_file(&files.certificate_chain).expect("remove certificate");
        let error = ensure_development_certificate(data_dir.path()).expect_err("incomplete");
        assert!(matches!(error, TlsError::IncompleteDevelopmentPair { .. }));
    }

    #[test]
    fn a_missing_certificate_chain_names_the_file() {
        let data_dir = tempfile::tempdir().expect("temporary directory");
        let files = PemFiles {
            certificate_chain: data_dir.path().join("absent-cert.pem"),
            private_key: data_dir.path().join("absent-key.pem"),
        };
        let message = server_config(&files).expect_err("absent").to_string();
        assert!(message.contains("absent-cert.pem"), "{message}");
    }
}
