//! Two real volumes replicating over QUIC with mutual TLS, through the WAN emulator: the
//! link of `link.rs` in place of the in-process channel of `volume_pair_tests.rs`.

use super::link::{self, LinkConns, LinkVolume, Peer};
use super::tls::{Refusals, SiteTls};
use super::{client_endpoint, endpoint, LinkTuning};
use crate::certs::{Ca, Validity};
use crate::config::VolumeConfig;
use crate::store::{MemoryStore, RocksStore};
use crate::volume::Volume;
use crate::wan::{LinkConfig, WanEmu};
use bytes::Bytes;
use geomirror_core::{CoreConfig, Geometry, Mode, Role, SiteState, WriteOp};
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
        Volume::start(&cfg("p.img"), Box::new(MemoryStore::new(SiteState::fresh(Role::Primary))), Some(p_out)).unwrap();
    let store = RocksStore::open(&dir.path().join("s.store"), Role::Secondary).unwrap();
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
    assert_eq!(sent.keys().copied().collect::<Vec<_>>(), ["control", "data"], "{sent:?}");
    assert!(sent["data"] > 40 * MIB, "the primary's data connection sent the 40 MiB written: {sent:?}");
    let seen: Vec<_> = s_conns.stats().into_iter().map(|(k, st)| (k, st.path.rtt)).collect();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), ["control", "data"], "{seen:?}");
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
