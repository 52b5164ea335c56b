//! mTLS on loopback with real certificates: the right peer gets through, and every wrong
//! one is refused during the handshake, before the server has a connection to read a frame
//! from, with its reason counted.

use super::tls::{self, Refusals, SiteTls};
use super::{endpoint, LinkTuning};
use crate::certs::{Ca, Issued, Validity};
use quinn::Endpoint;
use std::sync::Arc;
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::sync::mpsc;

struct Pki {
    ca: Ca,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::generate("test", Validity::days_from_now(30)).unwrap();
        let ca_pem = ca.issued().cert_pem;
        Pki { ca, ca_pem }
    }
    fn tls(&self, issued: &Issued) -> SiteTls {
        SiteTls::from_pem(&issued.cert_pem, &issued.key_pem, &self.ca_pem).unwrap()
    }
}

/// Site dc2 expecting dc1: every handshake outcome is reported on the channel; accepted
/// connections have their first uni stream read to the end and reported as bytes.
/// What the server saw of one connection attempt: the bytes of its first stream, or why not.
type Outcomes = mpsc::UnboundedReceiver<Result<Vec<u8>, String>>;

fn server(pki: &Pki) -> (Endpoint, Arc<Refusals>, Outcomes) {
    let refusals = Arc::new(Refusals::default());
    let tls = pki.tls(&pki.ca.issue_site("dc2", Validity::days_from_now(30)).unwrap());
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), &tls, "dc1", &LinkTuning::default(), refusals.clone()).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let outcome = match incoming.await {
                Ok(conn) => match conn.accept_uni().await {
                    Ok(mut s) => s.read_to_end(1 << 20).await.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("accepted, then: {e}")),
                },
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(outcome);
        }
    });
    (ep, refusals, rx)
}

/// Connects as a client with `cfg` and sends one stream; the result of the attempt is
/// ignored: what counts is what the server saw.
async fn attempt(server: &Endpoint, cfg: rustls::ClientConfig, name: &str) {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = client.connect_with(quinn::ClientConfig::new(Arc::new(quic)), server.local_addr().unwrap(), name).unwrap();
    if let Ok(conn) = conn.await {
        // With QUIC the client may see its handshake complete before the server refuses its
        // certificate: sending must still get nowhere.
        if let Ok(mut s) = conn.open_uni().await {
            let _ = s.write_all(b"hello").await;
            let _ = s.finish();
        }
        conn.closed().await;
    }
}

fn issued_client(pki: &Pki, issued: &Issued) -> rustls::ClientConfig {
    tls::client_config(&pki.tls(issued), Arc::new(Refusals::default())).unwrap()
}

fn validity(from_days: i64, to_days: i64) -> Validity {
    let now = OffsetDateTime::now_utc();
    Validity { not_before: now + TimeDuration::days(from_days), not_after: now + TimeDuration::days(to_days) }
}

#[tokio::test]
async fn the_expected_peer_with_a_valid_certificate_gets_through() {
    let pki = Pki::new();
    let (ep, refusals, mut outcomes) = server(&pki);
    attempt(&ep, issued_client(&pki, &pki.ca.issue_site("dc1", Validity::days_from_now(30)).unwrap()), "dc2").await;
    assert_eq!(outcomes.recv().await.unwrap(), Ok(b"hello".to_vec()));
    assert!(refusals.snapshot().is_empty(), "{:?}", refusals.snapshot());
}

#[tokio::test]
async fn every_wrong_client_is_refused_with_its_reason_and_no_frame_is_read() {
    let pki = Pki::new();
    let other = Pki::new();
    let (ep, refusals, mut outcomes) = server(&pki);
    let self_signed = {
        let mut p = rcgen::CertificateParams::new(vec!["dc1".to_string()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI("geomirror:site:dc1".try_into().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    };
    let cases: Vec<(&str, rustls::ClientConfig)> = vec![
        ("unknown_ca", issued_client(&pki, &other.ca.issue_site("dc1", Validity::days_from_now(30)).unwrap())),
        ("self_signed", issued_client(&pki, &self_signed)),
        ("expired", issued_client(&pki, &pki.ca.issue_site("dc1", validity(-10, -1)).unwrap())),
        ("not_yet_valid", issued_client(&pki, &pki.ca.issue_site("dc1", validity(1, 10)).unwrap())),
        ("wrong_identity", issued_client(&pki, &pki.ca.issue_site("dc3", Validity::days_from_now(30)).unwrap())),
        ("admin_certificate", issued_client(&pki, &pki.ca.issue_admin("ops", Validity::days_from_now(30)).unwrap())),
    ];
    for (reason, cfg) in cases {
        attempt(&ep, cfg, "dc2").await;
        let outcome = outcomes.recv().await.unwrap();
        assert!(outcome.is_err(), "{reason}: the server got a connection and read {outcome:?}");
        assert_eq!(refusals.count(reason), 1, "{reason}: {:?}", refusals.snapshot());
    }
    // No certificate at all: rustls refuses before any verifier runs.
    let dc1 = pki.tls(&pki.ca.issue_site("dc1", Validity::days_from_now(30)).unwrap());
    attempt(&ep, tls::client_config_without_certificate(&dc1, Arc::new(Refusals::default())), "dc2").await;
    let outcome = outcomes.recv().await.unwrap();
    assert!(outcome.as_ref().is_err_and(|e| e.to_lowercase().contains("certificate")), "{outcome:?}");
    // The right peer still gets through afterwards.
    attempt(&ep, issued_client(&pki, &pki.ca.issue_site("dc1", Validity::days_from_now(30)).unwrap()), "dc2").await;
    assert_eq!(outcomes.recv().await.unwrap(), Ok(b"hello".to_vec()));
}

#[tokio::test]
async fn a_client_refuses_a_server_that_is_not_the_site_it_asked_for() {
    let pki = Pki::new();
    let (ep, _, _outcomes) = server(&pki);
    let refusals = Arc::new(Refusals::default());
    let cfg = tls::client_config(&pki.tls(&pki.ca.issue_site("dc1", Validity::days_from_now(30)).unwrap()), refusals.clone()).unwrap();
    // The server is dc2; the client asks for dc9.
    attempt(&ep, cfg, "dc9").await;
    assert_eq!(refusals.count("wrong_identity"), 1, "{:?}", refusals.snapshot());
}
