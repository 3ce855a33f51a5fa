//! TLS connections this crate opens itself, so it runs their connection task and sees it
//! end, as it does for plain TCP.
//!
//! A connection redis-rs opens, it runs: when the server closes it (a restart, a
//! failover), nothing here learns of it before a request is sent on it and fails as
//! "broken pipe", which cannot tell a request never sent from one lost on the way. An
//! `INCR` made on a quiet TLS connection after a restart then failed instead of being
//! sent on a new connection. So TLS connections are opened here, with the same trust
//! redis-rs would use: the CA of [`Connector::tls_certificates`](crate::Connector::tls_certificates)
//! (and its client certificate), or the system's roots for `rediss://` alone. Where this
//! crate could not reproduce redis-rs's choice (a `Client` you built with its own
//! certificates, `#insecure`, `SO_LINGER`), redis-rs opens the connection as before.

use std::{
    io,
    sync::{Arc, OnceLock},
};

use redis::TlsCertificates;
use rustls::{
    ClientConfig, ConfigBuilder, RootCertStore, WantsVerifier,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::Error;

/// The trust a connector's TLS connections are opened with.
#[derive(Clone, Default)]
pub(crate) struct OwnTls {
    /// Built from [`Connector::tls_certificates`](crate::Connector::tls_certificates);
    /// `None`: the system's roots.
    certified: Option<Arc<ClientConfig>>,
}

impl OwnTls {
    /// Trusts the CA of `certificates` only (as redis-rs does with them), presenting
    /// their client certificate if any. A root certificate with no certificate in it is
    /// refused: redis-rs would take it for an empty list of CAs to trust.
    pub(crate) fn with_certificates(certificates: &TlsCertificates) -> Result<OwnTls, Error> {
        let roots = match &certificates.root_cert {
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for certificate in CertificateDer::pem_slice_iter(pem) {
                    let certificate = certificate.map_err(|err| {
                        Error::config(format!("the TLS root certificate cannot be read: {err}"))
                    })?;
                    roots.add(certificate).map_err(|err| {
                        Error::config(format!("the TLS root certificate is not a CA: {err}"))
                    })?;
                }
                if roots.is_empty() {
                    return Err(Error::config(
                        "the TLS root certificate holds no PEM certificate (-----BEGIN \
                         CERTIFICATE-----)",
                    ));
                }
                roots
            }
            None => native_roots().ok_or_else(|| {
                Error::config("the system's TLS root certificates cannot be read")
            })?,
        };
        let builder = builder()?.with_root_certificates(roots);
        let config = match &certificates.client_tls {
            Some(client) => {
                let chain = CertificateDer::pem_slice_iter(&client.client_cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| {
                        Error::config(format!("the TLS client certificate cannot be read: {err}"))
                    })?;
                let key = PrivateKeyDer::from_pem_slice(&client.client_key).map_err(|err| {
                    Error::config(format!("the TLS client key cannot be read: {err}"))
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| Error::config(format!("the TLS client certificate: {err}")))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(OwnTls {
            certified: Some(Arc::new(config)),
        })
    }

    /// How to open a TLS connection to `host` as redis-rs would for an address that
    /// carries certificates (`certified`) or not. `None` when this crate cannot: redis-rs
    /// should open it.
    pub(crate) fn for_host(&self, host: &str, certified: bool) -> Option<Handshake> {
        let config = match (&self.certified, certified) {
            (Some(config), true) => config.clone(),
            (None, false) => system_config()?,
            _ => return None,
        };
        let name = ServerName::try_from(host).ok()?.to_owned();
        Some(Handshake { config, name })
    }
}

/// A TLS handshake to make over a TCP connection, from [`OwnTls::for_host`].
pub(crate) struct Handshake {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Handshake {
    pub(crate) async fn handshake(self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        TlsConnector::from(self.config)
            .connect(self.name, tcp)
            .await
    }
}

/// A configuration with the process's crypto provider if one is installed, `ring`
/// otherwise. (`ClientConfig::builder` panics when the build has two providers and
/// neither is installed.)
fn builder() -> Result<ConfigBuilder<ClientConfig, WantsVerifier>, Error> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::config(format!("TLS: {err}")))
}

/// The system's root certificates, as redis-rs loads them; `None` if any cannot be read
/// (redis-rs then fails the connect, and says why) or there are none.
fn native_roots() -> Option<RootCertStore> {
    let loaded = rustls_native_certs::load_native_certs();
    if !loaded.errors.is_empty() {
        return None;
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    (added > 0).then_some(roots)
}

/// The configuration for `rediss://` addresses without certificates of their own, read
/// once per process.
fn system_config() -> Option<Arc<ClientConfig>> {
    static CONFIG: OnceLock<Option<Arc<ClientConfig>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = native_roots()?;
            Some(Arc::new(
                builder()
                    .ok()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        })
        .clone()
}

#[cfg(test)]
pub(crate) mod tests {
    use redis::ClientTlsConfig;

    use super::*;

    /// A self-signed CA's certificate, only for parsing (nothing connects with it).
    pub(crate) const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBhzCCAS2gAwIBAgIUH8PhClEJ4Qk/n9rOpogzYxBqO9EwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNcGFyc2Utb25seS1jYTAgFw0yNjExMjkyMTUwMzFaGA8yMTI2
MTEwNTIxNTAzMVowGDEWMBQGA1UEAwwNcGFyc2Utb25seS1jYTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABLwt6QvnZQkSa9DR/JmJ44zYNhmwDSMLJGm6VFmer883
wLCKYQWNPZIlV6grqCGCSqRgjwOTwCT9ZE/DYEZmCaOjUzBRMB0GA1UdDgQWBBT4
l2+2ywG76PSadXhuUMW1zQAhXDAfBgNVHSMEGDAWgBT4l2+2ywG76PSadXhuUMW1
zQAhXDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCJCkj2n4kQ
9Cf1a9RZR+LBzUzDdGbcqpTuYfIjdNIJLwIgWXYJyqOFhPZzmJNXvto2mJ77Wc/5
0QhZ26O3laCygTE=
-----END CERTIFICATE-----
";

    fn certificates(root: &str, client: Option<(&str, &str)>) -> TlsCertificates {
        TlsCertificates {
            client_tls: client.map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.as_bytes().to_vec(),
                client_key: key.as_bytes().to_vec(),
            }),
            root_cert: Some(root.as_bytes().to_vec()),
        }
    }

    fn refused(certificates: &TlsCertificates) -> String {
        match OwnTls::with_certificates(certificates) {
            Ok(_) => panic!("accepted"),
            Err(error) => {
                assert!(error.is_config(), "{error}");
                error.to_string()
            }
        }
    }

    #[test]
    fn certificates_that_cannot_be_used_are_config_errors_that_say_which() {
        assert!(OwnTls::with_certificates(&certificates(CERT, None)).is_ok());
        assert!(refused(&certificates("no PEM here", None)).contains("holds no PEM certificate"));
        let damaged = CERT.replace("MIIBhzCC", "MIIB!!CC");
        assert!(refused(&certificates(&damaged, None)).contains("root certificate"));
        let no_key = refused(&certificates(CERT, Some((CERT, "not a key"))));
        assert!(no_key.contains("client key"), "{no_key}");
    }
}
