//! The admin API's listener and the life of one connection.
//!
//! Owns: the TLS configuration (TLS 1.3 with the site's certificate, ring only, client
//! certificates optional but checked against the deployment's CA), the accept loop, and
//! each connection's bounds: the handshake pool and timeout, admission to a slot once the
//! handshake tells whether the caller presented an admin certificate (`limits::Slots`), the
//! request-head timeout and size (hyper's), and a lingering close so that a refusal reaches
//! its client.
//!
//! Must not: look at a request: who may do what is decided by `auth`, behind which every
//! route sits.

use super::auth::{Connection, PeerCert};
use super::limits::{
    Refusal, Slots, Timeout, CLOSE_LINGER, HANDSHAKE_TIMEOUT, HEADER_READ_TIMEOUT, LIMITS, MAX_HANDSHAKES, MAX_HEAD_BYTES,
};
use crate::transport::tls::{provider, SiteTls, TlsError};
use axum::extract::Extension;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// HTTPS with the site's certificate. Client certificates are optional at the TLS level
/// (a token caller has none) but, when present, must chain to the deployment's CA.
pub(super) fn server_config(tls: &SiteTls) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts connections until `shutdown`, each served by `app` in its own task.
pub(super) async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, app: Router, mut shutdown: watch::Receiver<bool>) {
    for reason in Refusal::ALL {
        crate::metrics::admin_refused(reason.as_str(), 0);
    }
    for kind in Timeout::ALL {
        crate::metrics::admin_timeouts(kind.as_str(), 0);
    }
    let slots = Slots::new(LIMITS, |pool, n| crate::metrics::admin_connections(pool.as_str(), n));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            p = handshakes.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.changed() => return,
        };
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        tokio::spawn(connection(tcp, remote, permit, acceptor.clone(), app.clone(), slots.clone()));
    }
}

/// One connection: the handshake (holding a handshake slot), then admission, then HTTP/1.1
/// until the client leaves, a deadline passes or an answer closes it.
async fn connection(
    tcp: TcpStream,
    remote: SocketAddr,
    handshake: OwnedSemaphorePermit,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    slots: Arc<Slots>,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "admin TLS handshake failed");
            return;
        }
        Err(_) => {
            crate::metrics::admin_timeouts(Timeout::Handshake.as_str(), 1);
            tracing::info!(%remote, "admin TLS handshake timed out");
            return;
        }
    };
    let peer = PeerCert::from_chain(stream.get_ref().1.peer_certificates());
    let slot = match slots.admit(remote.ip(), matches!(peer, PeerCert::Admin(_))) {
        Ok(slot) => slot,
        Err(refusal) => {
            crate::metrics::admin_refused(refusal.as_str(), 1);
            tracing::info!(%remote, reason = refusal.as_str(), "admin connection refused");
            // The refusal is written and lingered over while the handshake slot is held, so
            // refused connections cannot pile up beyond that pool.
            refuse(stream, &refusal.message(remote.ip(), slots.limits())).await;
            drop(handshake);
            return;
        }
    };
    drop(handshake);
    tracing::debug!(%remote, pool = slot.pool().as_str(), "admin connection admitted");
    let service = hyper_util::service::TowerToHyperService::new(app.layer(Extension(Connection { peer, remote })));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
    match http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).without_shutdown().await {
        Ok(parts) => linger(parts.io.into_inner()).await,
        Err(e) if e.is_timeout() => {
            crate::metrics::admin_timeouts(Timeout::Header.as_str(), 1);
            tracing::info!(%remote, "admin connection closed: no complete request head within {} s", HEADER_READ_TIMEOUT.as_secs());
        }
        Err(e) => tracing::debug!(%remote, error = %e, "admin connection ended"),
    }
    drop(slot);
}

/// Answers 503 with `message` at once, without reading the request, and closes.
async fn refuse(mut stream: TlsStream, message: &str) {
    let body = serde_json::json!({ "error": message }).to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    match tokio::time::timeout(CLOSE_LINGER, stream.write_all(answer.as_bytes())).await {
        Ok(Ok(())) => linger(stream).await,
        _ => tracing::debug!("a refused admin client did not take its answer"),
    }
}

/// Ends a connection whose last answer is written: close our side (TLS close_notify, then
/// FIN), and read and discard what the client still sends until it closes too, for at most
/// `CLOSE_LINGER`, so that closing over unread bytes does not reset the answer away.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if stream.shutdown().await.is_ok() {
            let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
        }
    })
    .await;
}
