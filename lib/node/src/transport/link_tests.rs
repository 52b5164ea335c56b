//! Two real volumes replicating over QUIC with mutual TLS, through the WAN emulator: the
//! link of `link.rs` in place of the in-process channel of `volume_pair_tests.rs`.

use super::link::{self, ConnKind, LinkConns, LinkVolume, Peer};
use super::tls::{Refusals, SiteTls};
use super::{client_endpoint, endpoint, LinkTuning};
use crate::certs::{Ca, Validity};
use crate::config::VolumeConfig;
use crate::store::{MemoryStore, RocksStore};
use crate::volume::Volume;
use crate::wan::{LinkConfig, WanEmu};
use bytes::Bytes;
use geomirror_core::{CoreConfig, Geometry, Mode, Role, SiteState, StoreId, WriteOp};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

const MIB: u64 = 1 << 20;

async fn write(v: &Volume, op: WriteOp, fua: bool) {
    let (tx, rx) = oneshot::channel();
    v.write(
        op,
        fua,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    assert_eq!(rx.await.unwrap(), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_replicates_over_quic_with_mtls_through_the_wan_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t", Validity::days_from_now(1)).unwrap();
    let ca_pem = ca.issued().cert_pem;
    let tls = |site: &str| {
        let i = ca.issue_site(site, Validity::days_from_now(1)).unwrap();
        SiteTls::from_pem(&i.cert_pem, &i.key_pem, &ca_pem).unwrap()
    };
    let tuning = LinkTuning { rtt: Duration::from_millis(10), ..LinkTuning::default() };
    let secondary_ep = endpoint("127.0.0.1:0".parse().unwrap(), &tls("dc2"), "dc1", &tuning, Arc::new(Refusals::default())).unwrap();
    let emu = WanEmu::start(
        "127.0.0.1:0".parse().unwrap(),
        secondary_ep.local_addr().unwrap(),
        LinkConfig::with_rtt(Duration::from_millis(10)),
        None,
        1,
    )
    .await
    .unwrap();
    let primary_ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &tls("dc1"), &tuning, Arc::new(Refusals::default())).unwrap();

    let cfg = |file: &str| VolumeConfig {
        name: "vol0".into(),
        media: dir.path().join(file),
        geometry: Geometry::new(64 * MIB, MIB).unwrap(),
        description: String::new(),
        core: CoreConfig { mode: Mode::Predictive, ..CoreConfig::default() },
    };
    let (p_out, p_rx) = mpsc::unbounded_channel();
    let (s_out, s_rx) = mpsc::unbounded_channel();
    let (primary, p_thread) =
        Volume::start(&cfg("p.img"), Box::new(MemoryStore::new(SiteState::fresh(Role::Primary, StoreId(1)))), Some(p_out)).unwrap();
    let store = RocksStore::open(&dir.path().join("s.store"), || Ok(SiteState::fresh(Role::Secondary, StoreId(2)))).unwrap();
    let (secondary, s_thread) = Volume::start(&cfg("s.img"), Box::new(store), Some(s_out)).unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    // The secondary never connects (it is no primary), so its peer address is never used.
    let nowhere =
        Peer { address: "127.0.0.1:9".parse().unwrap(), name: "dc1".into(), bulk_bytes_per_sec: None, liveness: tuning.liveness() };
    let (p_conns, s_conns) = (Arc::new(LinkConns::default()), Arc::new(LinkConns::default()));
    let s_task = tokio::spawn(link::run(
        secondary_ep,
        nowhere,
        vec![LinkVolume { volume: secondary.clone(), outbox: s_rx }],
        Arc::new(Refusals::default()),
        s_conns.clone(),
        stop_rx.clone(),
    ));
    // Paced, so that the chunked writer carries the bulk here.
    let dc2 = Peer { address: emu.listen, name: "dc2".into(), bulk_bytes_per_sec: Some(20_000_000), liveness: tuning.liveness() };
    let p_task = tokio::spawn(link::run(
        primary_ep,
        dc2,
        vec![LinkVolume { volume: primary.clone(), outbox: p_rx }],
        Arc::new(Refusals::default()),
        p_conns.clone(),
        stop_rx,
    ));

    // Sequential 1 MiB writes (misses, then hits as prediction runs ahead), rewrites, FUA.
    for i in 0..40u64 {
        write(&primary, WriteOp::data(i * MIB, Bytes::from(vec![i as u8 + 1; MIB as usize])), i % 9 == 0).await;
    }
    for i in 0..40u64 {
        write(&primary, WriteOp::data((i * 13 % 60) * MIB + 4096, Bytes::from(vec![0xA0 + i as u8; 8192])), false).await;
    }
    let (tx, rx) = oneshot::channel();
    primary.when_drained(move || {
        let _ = tx.send(());
    });
    rx.await.unwrap();
    // What the link's metrics read: both connections, on both sides, with the data's bytes.
    let sent: std::collections::BTreeMap<_, _> = p_conns.stats().into_iter().map(|(k, st)| (k, st.udp_tx.bytes)).collect();
    assert_eq!(sent.keys().copied().collect::<Vec<_>>(), [ConnKind::Control, ConnKind::Data], "{sent:?}");
    assert!(sent[&ConnKind::Data] > 40 * MIB, "the primary's data connection sent the 40 MiB written: {sent:?}");
    let seen: Vec<_> = s_conns.stats().into_iter().map(|(k, st)| (k, st.path.rtt)).collect();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [ConnKind::Control, ConnKind::Data], "{seen:?}");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(p_task, s_task);
    primary.stop();
    secondary.stop();
    p_thread.join().unwrap();
    s_thread.join().unwrap();
    let a = std::fs::read(dir.path().join("p.img")).unwrap();
    let b = std::fs::read(dir.path().join("s.img")).unwrap();
    assert!(a == b, "the secondary's image differs from the primary's after the drain");
    assert!(emu.status().contains("link=up"), "{}", emu.status());
    eprintln!("{}", emu.status());
}

/// The two sites' TLS, and a link tuned to probe every 100 ms and declare a peer lost after
/// 1 s without an answer; QUIC's own keep-alive keeps every connection of these tests
/// alive, so only the link's liveness check can end one.
struct Silent {
    ca: Ca,
    tuning: LinkTuning,
}

impl Silent {
    fn new() -> Silent {
        let tuning = LinkTuning {
            rtt: Duration::from_millis(10),
            keep_alive: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(1),
            ..LinkTuning::default()
        };
        Silent { ca: Ca::generate("t", Validity::days_from_now(1)).unwrap(), tuning }
    }

    fn tls(&self, site: &str) -> SiteTls {
        let i = self.ca.issue_site(site, Validity::days_from_now(1)).unwrap();
        SiteTls::from_pem(&i.cert_pem, &i.key_pem, &self.ca.issued().cert_pem).unwrap()
    }

    fn volume(
        &self,
        dir: &std::path::Path,
        role: Role,
    ) -> (Volume, std::thread::JoinHandle<()>, mpsc::UnboundedReceiver<crate::volume::Outbound>) {
        let cfg = VolumeConfig {
            name: "vol0".into(),
            media: dir.join("v.img"),
            geometry: Geometry::new(16 * MIB, MIB).unwrap(),
            description: String::new(),
            core: CoreConfig { mode: Mode::Predictive, ..CoreConfig::default() },
        };
        let (out, rx) = mpsc::unbounded_channel();
        let (v, t) = Volume::start(&cfg, Box::new(MemoryStore::new(SiteState::fresh(role, StoreId(3)))), Some(out)).unwrap();
        (v, t, rx)
    }
}

async fn link_up(v: &Volume) -> bool {
    let (tx, rx) = oneshot::channel();
    v.status(move |s| {
        let _ = tx.send(s.link_up);
    });
    rx.await.unwrap()
}

/// A failure bound for these tests (ten idle timeouts), not a measurement.
const BOUND: Duration = Duration::from_secs(10);

/// The connection closed with the link's "peer lost" code within `BOUND`.
async fn closed_as_peer_lost(conn: &quinn::Connection) {
    let why = tokio::time::timeout(BOUND, conn.closed()).await.expect("the silent side's connection closed within the bound");
    match why {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(3), "closed as peer lost: {c:?}");
            assert!(String::from_utf8_lossy(&c.reason).contains("no keep-alive answered"), "{c:?}");
        }
        other => panic!("closed as peer lost, not {other}"),
    }
}

/// A primary whose process is alive at the QUIC level (its endpoint answers QUIC's pings)
/// but answers no keep-alive probe is declared lost by the secondary: the volume sees the
/// link down, and the connection is closed as "peer lost". With QUIC's idle timeout alone,
/// the session stayed up as long as the endpoint did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_declares_a_primary_that_answers_no_probe_lost() {
    let dir = tempfile::tempdir().unwrap();
    let t = Silent::new();
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), &t.tls("dc2"), "dc1", &t.tuning, Arc::new(Refusals::default())).unwrap();
    let addr = ep.local_addr().unwrap();
    let (secondary, thread, outbox) = t.volume(dir.path(), Role::Secondary);
    let (stop_tx, stop_rx) = watch::channel(false);
    let nowhere =
        Peer { address: "127.0.0.1:9".parse().unwrap(), name: "dc1".into(), bulk_bytes_per_sec: None, liveness: t.tuning.liveness() };
    let task = tokio::spawn(link::run(
        ep,
        nowhere,
        vec![LinkVolume { volume: secondary.clone(), outbox }],
        Arc::new(Refusals::default()),
        Arc::new(LinkConns::default()),
        stop_rx,
    ));

    // The silent primary: a real mTLS connection and a control stream, never read.
    let fake = client_endpoint("127.0.0.1:0".parse().unwrap(), &t.tls("dc1"), &t.tuning, Arc::new(Refusals::default())).unwrap();
    let conn = fake.connect(addr, "dc2").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let preamble =
        super::framing::Preamble { stream: geomirror_core::Stream::Control, session: crate::volume::SessionId(7), volume: "vol0".into() };
    send.write_all(&preamble.encode()).await.unwrap();

    let until = tokio::time::Instant::now() + BOUND;
    while !link_up(&secondary).await {
        assert!(tokio::time::Instant::now() < until, "the secondary saw the session start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    closed_as_peer_lost(&conn).await;
    let until = tokio::time::Instant::now() + BOUND;
    while link_up(&secondary).await {
        assert!(tokio::time::Instant::now() < until, "the secondary reports the link down once the primary is declared lost");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let _ = stop_tx.send(true);
    let _ = task.await;
    secondary.stop();
    thread.join().unwrap();
}

/// The other way round: a primary declares lost a secondary that accepts its connections
/// and streams but answers no probe, and closes the session as "peer lost".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_declares_a_secondary_that_answers_no_probe_lost() {
    let dir = tempfile::tempdir().unwrap();
    let t = Silent::new();
    // The silent secondary: accepts both connections and the control stream, never reads.
    let fake = endpoint("127.0.0.1:0".parse().unwrap(), &t.tls("dc2"), "dc1", &t.tuning, Arc::new(Refusals::default())).unwrap();
    let peer = Peer { address: fake.local_addr().unwrap(), name: "dc2".into(), bulk_bytes_per_sec: None, liveness: t.tuning.liveness() };
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &t.tls("dc1"), &t.tuning, Arc::new(Refusals::default())).unwrap();
    let (primary, thread, outbox) = t.volume(dir.path(), Role::Primary);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(link::run(
        ep,
        peer,
        vec![LinkVolume { volume: primary.clone(), outbox }],
        Arc::new(Refusals::default()),
        Arc::new(LinkConns::default()),
        stop_rx,
    ));

    let control = fake.accept().await.unwrap().await.unwrap();
    let _data = fake.accept().await.unwrap().await.unwrap();
    let _stream = control.accept_bi().await.unwrap();
    closed_as_peer_lost(&control).await;

    let _ = stop_tx.send(true);
    let _ = task.await;
    primary.stop();
    thread.join().unwrap();
}
