//! A primary and a secondary volume, each a real driver thread with real media files (and
//! a RocksDB store on the secondary), joined by an in-order in-process link. Host writes go
//! through the primary; once it reports drained, the two media files must be equal. The
//! QUIC link replaces the channel here without changing the volumes.

use crate::config::VolumeConfig;
use crate::store::{MemoryStore, RocksStore};
use crate::volume::{LinkEvent, Outbound, SessionId, Volume, VolumeStatus};
use bytes::Bytes;
use geomirror_core::{CoreConfig, Geometry, HostError, Mode, Role, SiteState, StoreId, WriteOp};
use std::path::Path;
use tokio::sync::{mpsc, oneshot};

const MIB: u64 = 1 << 20;

fn volume_config(dir: &Path, name: &str, mode: Mode) -> VolumeConfig {
    VolumeConfig {
        name: "vol0".into(),
        media: dir.join(name),
        geometry: Geometry::new(64 * MIB, MIB).unwrap(),
        description: String::new(),
        core: CoreConfig { mode, ..CoreConfig::default() },
    }
}

async fn status(v: &Volume) -> VolumeStatus {
    let (tx, rx) = oneshot::channel();
    v.status(move |s| {
        let _ = tx.send(s);
    });
    rx.await.unwrap()
}

async fn write(v: &Volume, op: WriteOp, fua: bool) -> Result<(), HostError> {
    let (tx, rx) = oneshot::channel();
    v.write(
        op,
        fua,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.await.unwrap()
}

/// Moves frames between the two volumes in order, and tells the test each time the
/// primary might have become drained (after every frame the secondary sends it).
fn link(
    primary: Volume,
    secondary: Volume,
    mut from_p: mpsc::UnboundedReceiver<Outbound>,
    mut from_s: mpsc::UnboundedReceiver<Outbound>,
) -> mpsc::UnboundedReceiver<()> {
    let (tick_tx, tick_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        secondary.link(LinkEvent::Connected(SessionId(1)));
        primary.link(LinkEvent::Connected(SessionId(1)));
        loop {
            tokio::select! {
                Some(o) = from_p.recv() => match o {
                    Outbound::Send { frame, .. } => secondary.link(LinkEvent::Frame(SessionId(1), frame)),
                    Outbound::Disconnect { reason, .. } => panic!("primary disconnected: {reason}"),
                },
                Some(o) = from_s.recv() => match o {
                    Outbound::Send { frame, .. } => {
                        primary.link(LinkEvent::Frame(SessionId(1), frame));
                        let _ = tick_tx.send(());
                    }
                    Outbound::Disconnect { reason, .. } => panic!("secondary disconnected: {reason}"),
                },
                else => return,
            }
        }
    });
    tick_rx
}

async fn replicate(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let (p_out, p_rx) = mpsc::unbounded_channel();
    let (s_out, s_rx) = mpsc::unbounded_channel();
    let p_cfg = volume_config(dir.path(), "primary.img", mode);
    let s_cfg = volume_config(dir.path(), "secondary.img", mode);
    let (primary, _pt) =
        Volume::start(&p_cfg, Box::new(MemoryStore::new(SiteState::fresh(Role::Primary, StoreId(1)))), Some(p_out)).unwrap();
    let store = RocksStore::open(&dir.path().join("secondary.store"), || Ok(SiteState::fresh(Role::Secondary, StoreId(2)))).unwrap();
    let (secondary, _st) = Volume::start(&s_cfg, Box::new(store), Some(s_out)).unwrap();
    let mut ticks = link(primary.clone(), secondary.clone(), p_rx, s_rx);

    // A sequential stream, random-looking rewrites, zeroing and a trim, some with FUA.
    let mut writes = Vec::new();
    for i in 0..48u64 {
        writes.push((WriteOp::data(i * MIB / 2, Bytes::from(vec![i as u8 + 1; (MIB / 2) as usize])), i % 7 == 0));
    }
    for i in 0..64u64 {
        let off = (i * 7_919 * 4096) % (64 * MIB - 8192);
        writes.push((WriteOp::data(off, Bytes::from(vec![(i * 3) as u8; 8192])), false));
    }
    writes.push((WriteOp::zero(5 * MIB, 3 * MIB), false));
    writes.push((WriteOp::trim(40 * MIB, 2 * MIB), true));
    for (op, fua) in writes {
        assert_eq!(write(&primary, op, fua).await, Ok(()), "{mode:?}");
    }
    // Drained: every write applied and acknowledged by the secondary.
    while !status(&primary).await.drained {
        ticks.recv().await.expect("the link runs");
    }
    let s = status(&secondary).await;
    assert_eq!(s.role, Role::Secondary);
    assert!(!s.failed);
    primary.stop();
    secondary.stop();
    _pt.join().unwrap();
    _st.join().unwrap();
    let a = std::fs::read(&p_cfg.media).unwrap();
    let b = std::fs::read(&s_cfg.media).unwrap();
    assert!(a == b, "{mode:?}: the secondary's image differs from the primary's after the drain");
    assert!(a.iter().any(|x| *x != 0), "the test wrote something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predictive_pair_replicates_through_the_real_shells() {
    replicate(Mode::Predictive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_sync_pairs_replicate_through_the_real_shells() {
    replicate(Mode::Async).await;
    replicate(Mode::Sync).await;
}
