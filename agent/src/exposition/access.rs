//! Who may read the metrics endpoint: optional TLS (rustls) and an optional bearer token, both read
//! from files so that SIGHUP can reload them (a renewed certificate, a rotated token) without a
//! restart. A file that cannot be used is an error naming the file; the caller keeps what it had.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use hyper::{HeaderMap, header};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use subtle::ConstantTimeEq;
use tokio_rustls::TlsAcceptor;

/// Where the TLS and token files are (the command line's `--tls-cert`, `--tls-key`,
/// `--auth-token-file`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessConfig {
    /// PEM certificate chain and private key; both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A file holding the bearer token scrapers must send.
    pub token_file: Option<PathBuf>,
}

/// The loaded TLS configuration and token.
#[derive(Clone, Default)]
pub struct Access {
    tls: Option<TlsAcceptor>,
    token: Option<Token>,
}

/// The secret; never printed.
#[derive(Clone)]
struct Token(Arc<[u8]>);

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Longest token accepted: a header line, not a file by mistake.
const MAX_TOKEN: usize = 4096;

impl Access {
    /// Plain HTTP, no authentication: the default, for a loopback listener.
    pub fn open() -> Access {
        Access::default()
    }

    /// Reads the files `cfg` names.
    pub fn load(cfg: &AccessConfig) -> anyhow::Result<Access> {
        let tls = match &cfg.tls {
            Some((cert, key)) => Some(load_tls(cert, key)?),
            None => None,
        };
        let token = match &cfg.token_file {
            Some(path) => Some(load_token(path)?),
            None => None,
        };
        Ok(Access { tls, token })
    }

    /// The TLS handshake to run on each accepted connection, when TLS is on.
    pub fn tls(&self) -> Option<&TlsAcceptor> {
        self.tls.as_ref()
    }

    /// Whether a request with these headers may be answered: always without a token; with one, only
    /// when it carries `Authorization: Bearer <token>`. The comparison takes the same time wherever
    /// the first differing byte is.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(Token(want)) = &self.token else {
            return true;
        };
        headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| bearer(v.as_bytes()))
            .any(|given| bool::from(given.ct_eq(want)))
    }

    /// For the log: what protects the endpoint (never the secret).
    pub fn describe(&self) -> &'static str {
        match (self.tls.is_some(), self.token.is_some()) {
            (false, false) => "plain HTTP, no authentication",
            (true, false) => "TLS, no authentication",
            (false, true) => "plain HTTP, bearer token",
            (true, true) => "TLS, bearer token",
        }
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` value (scheme case-insensitive, RFC
/// 7235 §2.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

fn load_token(path: &Path) -> anyhow::Result<Token> {
    let bytes =
        fs::read(path).with_context(|| format!("reading the token file {}", path.display()))?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    if token.len() > MAX_TOKEN {
        bail!(
            "the token file {} holds {} bytes; a token is at most {MAX_TOKEN}",
            path.display(),
            token.len()
        );
    }
    // What a client can send in an Authorization header: visible ASCII, no spaces.
    if !token.iter().all(u8::is_ascii_graphic) {
        bail!(
            "the token in {} must be one line of printable ASCII without spaces",
            path.display()
        );
    }
    Ok(Token(Arc::from(token)))
}

fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        bail!(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in {}",
            cert.display()
        );
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!(
                "the TLS certificate {} and key {} do not go together",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn with_auth(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                header::AUTHORIZATION,
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        h
    }

    #[test]
    fn token_checks() -> anyhow::Result<()> {
        let d = tempfile::tempdir()?;
        let file = d.path().join("token");
        fs::write(&file, "s3cret-token\n")?;
        let a = Access::load(&AccessConfig {
            tls: None,
            token_file: Some(file),
        })?;
        assert!(a.authorized(&with_auth(&["Bearer s3cret-token"])));
        assert!(a.authorized(&with_auth(&["bearer   s3cret-token "])));
        assert!(a.authorized(&with_auth(&["Basic eDp5", "Bearer s3cret-token"])));
        for bad in [
            &[][..],
            &["Bearer s3cret-toke"],
            &["Bearer s3cret-token2"],
            &["s3cret-token"],
            &["Basic s3cret-token"],
            &["Bearer"],
        ] {
            assert!(!a.authorized(&with_auth(bad)), "{bad:?}");
        }
        assert_eq!(a.describe(), "plain HTTP, bearer token");
        assert!(Access::open().authorized(&HeaderMap::new()));
        Ok(())
    }

    #[test]
    fn bad_files_are_clear_errors() -> anyhow::Result<()> {
        let d = tempfile::tempdir()?;
        let path = |n: &str| d.path().join(n);
        let err = |cfg: AccessConfig| format!("{:#}", Access::load(&cfg).expect_err("must fail"));
        let token = |p: PathBuf| AccessConfig {
            tls: None,
            token_file: Some(p),
        };
        fs::write(path("empty"), " \n")?;
        fs::write(path("spaces"), "two words\n")?;
        assert!(err(token(path("missing"))).contains("reading the token file"));
        assert!(err(token(path("empty"))).contains("is empty"));
        assert!(err(token(path("spaces"))).contains("printable ASCII without spaces"));

        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        fs::write(path("cert.pem"), cert.cert.pem())?;
        fs::write(path("key.pem"), cert.signing_key.serialize_pem())?;
        fs::write(path("other-key.pem"), other.signing_key.serialize_pem())?;
        fs::write(path("junk.pem"), "not pem")?;
        let tls = |c: &str, k: &str| AccessConfig {
            tls: Some((path(c), path(k))),
            token_file: None,
        };
        assert_eq!(
            Access::load(&tls("cert.pem", "key.pem"))?.describe(),
            "TLS, no authentication"
        );
        assert!(err(tls("junk.pem", "key.pem")).contains("no PEM certificate"));
        assert!(err(tls("cert.pem", "junk.pem")).contains("reading the TLS private key"));
        assert!(err(tls("cert.pem", "other-key.pem")).contains("do not go together"));
        assert!(err(tls("nope.pem", "key.pem")).contains("nope.pem"));
        Ok(())
    }
}
