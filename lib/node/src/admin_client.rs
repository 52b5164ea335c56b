//! A client of the admin API, for the CLI and the tests: HTTPS (TLS 1.3, ring) to one
//! site, checking the site's certificate against the deployment's CA, presenting an admin
//! certificate or a bearer token. Tests also send raw bodies (`send`), connect from another
//! local address (`from_source`) and speak HTTP themselves over a bare connection (`connect`).
//!
//! Must not: retry operations. A promote that timed out may have happened; the caller asks
//! for status.

use crate::transport::tls::{provider, SiteTls};
use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long one call may take, the connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

pub struct AdminClient {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
    /// The local address to connect from (the system's choice when None).
    source: Option<IpAddr>,
}

/// An answer as it came: status, headers and body bytes.
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// How the caller proves who it is.
pub enum Credentials<'a> {
    /// An admin certificate and its key (PEM files).
    Certificate {
        cert: &'a Path,
        key: &'a Path,
    },
    Token(String),
    /// Nothing: the API refuses every call (useful only to test that it does).
    Anonymous,
}

impl AdminClient {
    /// `site` is the name the site's certificate carries (its DNS name).
    pub fn new(addr: SocketAddr, site: &str, ca: &Path, credentials: Credentials<'_>) -> Result<AdminClient> {
        let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("reading the CA certificate {}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.with_context(|| format!("{} is not a PEM certificate", ca.display()))?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let (mut tls, token) = match credentials {
            Credentials::Certificate { cert, key } => {
                let site = SiteTls::load(cert, key, ca).context("loading the admin certificate")?;
                (builder.with_client_auth_cert(site.chain, site.key)?, None)
            }
            Credentials::Token(t) => (builder.with_no_client_auth(), Some(t)),
            Credentials::Anonymous => (builder.with_no_client_auth(), None),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(site.to_owned()).map_err(|_| anyhow!("{site:?} is not a valid site name"))?;
        Ok(AdminClient { addr, server_name, tls: Arc::new(tls), token, source: None })
    }

    /// Connects from `source` (a local address) instead of the system's choice: tests use
    /// other loopback addresses to act as several hosts.
    pub fn from_source(mut self, source: IpAddr) -> AdminClient {
        self.source = Some(source);
        self
    }

    /// A TLS connection to the API with this client's certificate, if any, and nothing sent
    /// on it yet: for callers (tests) that speak HTTP themselves, slowly or not at all.
    pub async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let reach =
            || format!("cannot reach the admin API at {} (is the site running, and is this its [admin] listen address?)", self.addr);
        let tcp = match self.source {
            None => tokio::net::TcpStream::connect(self.addr).await.with_context(reach)?,
            Some(ip) => {
                let socket = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("cannot bind the local address {ip}"))?;
                socket.connect(self.addr).await.with_context(reach)?
            }
        };
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS with the admin API at {} failed", self.addr))
    }

    /// One call: `GET` or `POST` with a JSON body. Returns the status code and the JSON
    /// answer (an error answer is `{"error": "..."}`).
    pub async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Result<(u16, serde_json::Value)> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, body))
            .await
            .map_err(|_| anyhow!("no answer from the admin API at {} within {CALL_TIMEOUT:?}", self.addr))?
    }

    async fn call_inner(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Result<(u16, serde_json::Value)> {
        let payload = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        let Answer { status, body: bytes, .. } = self.send(method, path, payload.map(|p| ("application/json", p))).await?;
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(j) => j,
                Err(_) => bail!("the admin API answered {status} with something that is not JSON: {}", String::from_utf8_lossy(&bytes)),
            }
        };
        Ok((status, json))
    }

    /// One request on a new connection, with a body of any bytes (and its content type), the
    /// answer returned as it came. No deadline: `call` puts one around it.
    pub async fn send(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>) -> Result<Answer> {
        let tls = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", "geomirror");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let payload = match body {
            Some((content_type, bytes)) => {
                req = req.header("content-type", content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let resp = sender.send_request(req.body(Full::new(payload))?).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer { status, headers, body })
    }
}
