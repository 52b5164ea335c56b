//! Mutual TLS 1.3 for the replication link: who may talk to this site, decided during the
//! handshake, before any frame exists.
//!
//! Owns: loading PEM files, the one crypto provider (ring, passed explicitly to every
//! builder: two providers compiled in make rustls panic at run time), and the verifiers.
//! Both directions check the chain against the deployment's CA (which includes validity
//! dates), then the peer's identity: the URI SAN `geomirror:site:<peer>` of `certs.rs`. An
//! admin certificate, a certificate of another site, or none at all fails the handshake.
//! Every refusal is logged with its reason and counted by reason.
//!
//! Must not: enable 0-RTT (replayable data on a replication link is never safe), or accept a
//! certificate because the connection "worked": with QUIC a client whose certificate the
//! server rejects still sees its connect succeed and is closed a moment later, so a site
//! counts a link as up only when the peer's first frame arrives.

use crate::certs::{ADMIN_URI_PREFIX, SITE_URI_PREFIX};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// The ALPN protocol of the replication link; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"geomirror/1";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid CA certificate in {path}: {source}")]
    Ca { path: PathBuf, source: rustls::Error },
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(String),
    #[error("cannot bind the replication port {addr} (is another site or process using it?)")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
}

/// This site's certificate chain and key, and the CA it trusts.
pub struct SiteTls {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    /// The earliest notAfter of the CA certificates, in Unix seconds (for metrics).
    pub ca_not_after: Option<i64>,
}

impl SiteTls {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<SiteTls, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.to_owned(), source });
        let chain: Vec<CertificateDer<'static>> =
            rustls_pemfile_certs(&read(cert)?).ok_or_else(|| TlsError::Empty { path: cert.to_owned(), what: "certificate" })?;
        let key = rustls_pemfile_key(&read(key)?).ok_or_else(|| TlsError::Empty { path: key.to_owned(), what: "private key" })?;
        let mut roots = RootCertStore::empty();
        let cas = rustls_pemfile_certs(&read(ca)?).ok_or_else(|| TlsError::Empty { path: ca.to_owned(), what: "CA certificate" })?;
        let ca_not_after = cas.iter().filter_map(not_after).min();
        for c in cas {
            roots.add(c).map_err(|source| TlsError::Ca { path: ca.to_owned(), source })?;
        }
        Ok(SiteTls { chain, key, roots: Arc::new(roots), ca_not_after })
    }

    /// From PEM text (tests and generated deployments).
    pub fn from_pem(cert: &str, key: &str, ca: &str) -> Result<SiteTls, TlsError> {
        let chain = rustls_pemfile_certs(cert.as_bytes()).ok_or(TlsError::Verifier("no certificate in PEM".into()))?;
        let key = rustls_pemfile_key(key.as_bytes()).ok_or(TlsError::Verifier("no key in PEM".into()))?;
        let mut roots = RootCertStore::empty();
        let cas = rustls_pemfile_certs(ca.as_bytes()).ok_or(TlsError::Verifier("no CA in PEM".into()))?;
        let ca_not_after = cas.iter().filter_map(not_after).min();
        for c in cas {
            roots.add(c)?;
        }
        Ok(SiteTls { chain, key, roots: Arc::new(roots), ca_not_after })
    }

    /// When the site's certificate expires, in Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        self.chain.first().and_then(not_after)
    }
}

/// A certificate's notAfter, in Unix seconds.
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c.validity().not_after.timestamp())
}

fn rustls_pemfile_certs(pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().ok()?;
    (!v.is_empty()).then_some(v)
}

fn rustls_pemfile_key(pem: &[u8]) -> Option<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem).ok()
}

/// Every reason a handshake is refused for: the labels of `Refusals`.
pub const REFUSAL_REASONS: &[&str] = &[
    "no_certificate",
    "self_signed",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "wrong_identity",
    "wrong_purpose",
    "invalid_certificate",
    "admin_certificate",
];

/// Refused handshakes by reason: a bounded set of labels, for logs and metrics.
#[derive(Debug, Default)]
pub struct Refusals {
    by_reason: Mutex<BTreeMap<&'static str, u64>>,
}

impl Refusals {
    pub fn record(&self, reason: &'static str, detail: &str) {
        tracing::warn!(reason, detail, "replication peer refused during the TLS handshake");
        *self.by_reason.lock().expect("not poisoned").entry(reason).or_default() += 1;
    }

    pub fn count(&self, reason: &str) -> u64 {
        self.by_reason.lock().expect("not poisoned").get(reason).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.by_reason.lock().expect("not poisoned").clone()
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The label of a certificate error, and whether the certificate was self-signed.
fn reason_of(e: &rustls::Error, end_entity: &CertificateDer<'_>) -> &'static str {
    match e {
        // Whatever else is wrong with a self-signed certificate (openssl's `req -x509` makes
        // one with CA:TRUE, refused as a CA used as an end entity), that is the root cause.
        rustls::Error::InvalidCertificate(_) if self_signed(end_entity) => "self_signed",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not_yet_valid",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => "wrong_identity",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => "wrong_purpose",
            _ => "invalid_certificate",
        },
        _ => "invalid_certificate",
    }
}

fn self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.issuer() == c.subject())
}

/// The `geomirror:` URIs in a certificate's subject alternative names.
pub fn identities(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("geomirror:") => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// Checks that the certificate names exactly the expected site.
fn check_site(der: &CertificateDer<'_>, expected_site: &str) -> Result<(), (&'static str, String)> {
    let ids = identities(der);
    let want = format!("{SITE_URI_PREFIX}{expected_site}");
    if ids.contains(&want) {
        return Ok(());
    }
    let reason = if ids.iter().any(|i| i.starts_with(ADMIN_URI_PREFIX)) { "admin_certificate" } else { "wrong_identity" };
    Err((reason, format!("expected {want}, the certificate names {ids:?}")))
}

/// Server side: a client certificate from the CA that names the expected peer site.
#[derive(Debug)]
struct SiteClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    expected: String,
    refusals: Arc<Refusals>,
}

impl ClientCertVerifier for SiteClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self.inner.verify_client_cert(end_entity, intermediates, now) {
            self.refusals.record(reason_of(&e, end_entity), &e.to_string());
            return Err(e);
        }
        check_site(end_entity, &self.expected).map_err(|(reason, detail)| {
            self.refusals.record(reason, &detail);
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: a server certificate from the CA for the site's DNS name that also names
/// the site as its geomirror identity.
#[derive(Debug)]
struct SiteServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    refusals: Arc<Refusals>,
}

impl ServerCertVerifier for SiteServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Err(e) = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            self.refusals.record(reason_of(&e, end_entity), &e.to_string());
            return Err(e);
        }
        let site = server_name.to_str();
        check_site(end_entity, &site).map_err(|(reason, detail)| {
            self.refusals.record(reason, &detail);
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls server config of a site that accepts only `expected_peer`.
pub fn server_config(tls: &SiteTls, expected_peer: &str, refusals: Arc<Refusals>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(SiteClientVerifier { inner, expected: expected_peer.to_owned(), refusals });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No early data: 0-RTT stays off.
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// The rustls client config of a site connecting to its peer (named at connect time).
pub fn client_config(tls: &SiteTls, refusals: Arc<Refusals>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(SiteServerVerifier { inner, refusals });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// A client that presents no certificate at all, for the refusal tests.
#[cfg(test)]
pub(crate) fn client_config_without_certificate(tls: &SiteTls, refusals: Arc<Refusals>) -> rustls::ClientConfig {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(tls.roots.clone(), provider.clone()).build().unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SiteServerVerifier { inner, refusals }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg
}
