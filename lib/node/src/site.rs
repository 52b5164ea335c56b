//! A whole site: its volumes, its NBD server and, with a peer, its replication link.
//!
//! Owns: the start order (every check that can fail first, before any file or directory is
//! created: `preflight`, binding the NBD listener and the replication port, a look that the
//! admin address is free, the refusal of media without replication state; then stores and
//! media, then the link and the admin API, then serving NBD, so that no host is answered
//! before its volume can serve) and the stop order (stop accepting, finish the requests
//! already read, let a primary drain to its peer while its link is up, for a bounded time,
//! close the link, sync every volume, end).
//!
//! Must not: hold policy. It wires the parts the config describes.

use crate::admin::{self, AdminConfig, SiteControl};
use crate::config::SiteConfig;
use crate::nbd::server::{NbdCounters, NbdServer};
use crate::preflight;
use crate::store::{MemoryStore, RocksStore, Store};
use crate::transport::link::{self, LinkConns, LinkVolume, Peer};
use crate::transport::tls::Refusals;
use crate::volume::Volume;
use anyhow::{bail, Context};
use geomirror_core::{Role, SiteState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How long a stopping primary waits for its peer to apply everything it wrote.
const STOP_DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How often a stopping primary looks at its link again while it waits: the volume says
/// when it is drained, but not when its link goes down, which ends the wait.
const STOP_LINK_CHECK: Duration = Duration::from_millis(200);

pub struct RunningSite {
    pub name: String,
    pub nbd_addr: SocketAddr,
    pub volumes: Vec<Volume>,
    pub nbd_counters: Arc<NbdCounters>,
    /// Handshakes refused by reason (with a peer).
    pub refusals: Arc<Refusals>,
    /// The site's role at start (standalone sites are primaries).
    pub role: Role,
    /// The replication port actually bound (with a peer).
    pub link_addr: Option<SocketAddr>,
    /// The admin API's address (with a peer).
    pub admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    link_shutdown: watch::Sender<bool>,
    link: Option<tokio::task::JoinHandle<()>>,
    drivers: Vec<JoinHandle<()>>,
}

impl RunningSite {
    /// Opens every volume and starts serving. Must run inside a tokio runtime.
    pub async fn start(cfg: SiteConfig) -> anyhow::Result<RunningSite> {
        // Nothing is created before every check that can fail has passed, so a refused start
        // leaves the disk as it was.
        let checked = preflight::check(&cfg)?;
        // Then the addresses, still before anything is created: the NBD listener and the
        // replication port are bound now (hosts and the peer wait in their queues until the
        // volumes serve), and the admin address is tried (the admin API binds it once the
        // volumes it controls exist).
        let server = NbdServer::bind(cfg.nbd.clone())
            .await
            .with_context(|| format!("cannot listen for NBD clients on {} (nbd.listen)", cfg.nbd.listen))?;
        let refusals = Arc::new(Refusals::default());
        let endpoint = match &cfg.peer {
            None => None,
            Some(p) => {
                let tls = checked.tls.as_ref().context("the checks load the certificates of a site with a peer")?;
                let endpoint = crate::transport::endpoint(p.listen, tls, &p.name, &p.tuning, refusals.clone())
                    .with_context(|| format!("cannot listen for the peer on {} (peer.listen)", p.listen))?;
                Some(endpoint)
            }
        };
        if let Some(a) = cfg.admin.as_ref().filter(|a| a.listen.port() != 0) {
            std::net::TcpListener::bind(a.listen)
                .with_context(|| format!("cannot listen for the admin API on {} (admin.listen)", a.listen))?;
        }
        // Before the volumes: their write handles bind to the recorder installed now.
        crate::metrics::install(&cfg.name)?;
        let mut volumes = Vec::new();
        let mut drivers = Vec::new();
        let mut link_volumes = Vec::new();
        let mut roles = Vec::new();
        for v in &cfg.volumes {
            let (store, outbox): (Box<dyn Store>, _) = match &cfg.peer {
                None => (Box::new(MemoryStore::new(SiteState::fresh(Role::Primary, crate::store::new_store_id()?))), None),
                Some(p) => {
                    let dir = p.state_dir.join(&v.name);
                    let holds_data = crate::media::holds_data(&v.media)
                        .with_context(|| format!("volume {}: reading media {}", v.name, v.media.display()))?;
                    let initial_role = p.initial_role;
                    let store = RocksStore::open(&dir, || {
                        let id = crate::store::new_store_id()?;
                        Ok(if holds_data { SiteState::amnesiac(id) } else { SiteState::fresh(initial_role, id) })
                    })
                    .with_context(|| format!("volume {}", v.name))?;
                    if store.created() && holds_data {
                        tracing::warn!(
                            volume = v.name,
                            media = %v.media.display(),
                            state = %dir.display(),
                            "AMNESIAC: the media holds data but the site has no replication state for it (the state directory was lost, emptied or \
                             never made). Nothing about the media can be trusted: the volume starts as an amnesiac secondary, serving no host, \
                             until its primary rebuilds it with a full verified resync, or an operator promotes it with --force (its peer then \
                             gets a full verified resync from it). See docs/operations.md, \"Amnesia\""
                        );
                    }
                    let (tx, rx) = mpsc::unbounded_channel();
                    link_volumes.push(rx);
                    (Box::new(store), Some(tx))
                }
            };
            roles.push(store.load().role);
            let (volume, driver) = Volume::start(v, store, outbox).with_context(|| format!("volume {}", v.name))?;
            volumes.push(volume);
            drivers.push(driver);
        }
        let role = roles[0];
        if roles.iter().any(|r| *r != role) {
            bail!("the volumes of this site disagree about its role ({roles:?}); promote or demote them together");
        }

        let conns = Arc::new(LinkConns::default());
        let mut certificates = Vec::new();
        let (link_shutdown, link_rx) = watch::channel(false);
        let mut link_addr = None;
        let mut admin_addr = None;
        let link = match (&cfg.peer, endpoint) {
            (Some(p), Some(endpoint)) => {
                let tls = checked.tls.context("the checks load the certificates of a site with a peer")?;
                certificates.extend(tls.not_after().map(|t| ("site", t)));
                certificates.extend(tls.ca_not_after.map(|t| ("ca", t)));
                if let Some(a) = &cfg.admin {
                    let (token, metrics_token) = (checked.token, checked.metrics_token);
                    let control = Arc::new(SiteControl {
                        site: cfg.name.clone(),
                        peer: Some(p.name.clone()),
                        volumes: volumes.clone(),
                        bulk_bytes_per_sec: p.tuning.bulk_bytes_per_sec,
                    });
                    admin_addr =
                        Some(admin::start(AdminConfig { listen: a.listen, token, metrics_token }, &tls, control, link_rx.clone()).await?);
                }
                link_addr = Some(endpoint.local_addr()?);
                let lv: Vec<LinkVolume> =
                    volumes.iter().cloned().zip(link_volumes).map(|(volume, outbox)| LinkVolume { volume, outbox }).collect();
                tracing::info!(site = cfg.name, ?role, peer = p.name, listen = %p.listen, peer_address = %p.address, "starting the replication link");
                let peer = Peer {
                    address: p.address,
                    name: p.name.clone(),
                    bulk_bytes_per_sec: p.tuning.bulk_bytes_per_sec,
                    liveness: p.tuning.liveness(),
                };
                Some(tokio::spawn(link::run(endpoint, peer, lv, refusals.clone(), conns.clone(), link_rx.clone())))
            }
            _ => None,
        };

        let nbd_addr = server.local_addr()?;
        let nbd_counters = server.counters();
        let (shutdown, rx) = watch::channel(false);
        let server = tokio::spawn(server.serve(volumes.clone(), rx));
        let sources = crate::refresher::Sources {
            volumes: volumes.clone(),
            nbd: nbd_counters.clone(),
            refusals: cfg.peer.is_some().then(|| refusals.clone()),
            link: cfg.peer.is_some().then(|| conns.clone()),
            bulk_bytes_per_sec: cfg.peer.as_ref().and_then(|p| p.tuning.bulk_bytes_per_sec),
            certificates,
        };
        crate::refresher::spawn_refresher(sources, link_rx);
        Ok(RunningSite {
            name: cfg.name,
            nbd_addr,
            volumes,
            nbd_counters,
            refusals,
            role,
            link_addr,
            admin_addr,
            shutdown,
            server,
            link_shutdown,
            link,
            drivers,
        })
    }

    /// The URL a client uses for a volume.
    pub fn nbd_url(&self, volume: &str) -> String {
        format!("nbd://{}/{}", self.nbd_addr, volume)
    }

    /// Stops accepting, lets connections finish what they have read, gives the primaries up
    /// to `STOP_DRAIN_DEADLINE` to have their peer apply everything while their link is up,
    /// then stops the link and stops and syncs every volume. The deadline is for all volumes
    /// together: a site of many volumes waits it once, not once per volume.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        if let Some(link) = self.link {
            let until = tokio::time::Instant::now() + STOP_DRAIN_DEADLINE;
            for v in &self.volumes {
                drain_before_stop(v, until).await;
            }
            let _ = self.link_shutdown.send(true);
            let _ = link.await;
        }
        // Ends the metrics refresher too (and the link's tasks, if not already).
        let _ = self.link_shutdown.send(true);
        for v in &self.volumes {
            v.stop();
        }
        let drivers = self.drivers;
        let _ = tokio::task::spawn_blocking(move || {
            for d in drivers {
                let _ = d.join();
            }
        })
        .await;
    }
}

/// Waits, until `until` at most, while waiting can help: while the volume is a primary whose
/// link is up and whose peer has not applied everything. Each volume's present role decides,
/// not the configured one: a promoted secondary drains, and a fenced old primary has nothing
/// to drain. Says in the log how the wait ended, and whether writes are left for the next
/// start.
async fn drain_before_stop(v: &Volume, until: tokio::time::Instant) {
    let (tx, mut drained) = oneshot::channel();
    v.when_drained(move || {
        let _ = tx.send(());
    });
    loop {
        let (tx, rx) = oneshot::channel();
        v.status(move |s| {
            let _ = tx.send(s);
        });
        let Ok(s) = rx.await else { return };
        if s.role != Role::Primary || s.phase == crate::volume::VolumePhase::Fenced || s.drained {
            tracing::info!(volume = v.name(), "drained: nothing left for the peer to apply");
            return;
        }
        if !s.link_up {
            let (lag_bytes, resync_bytes) = (s.lag_bytes, s.resync_remaining_bytes);
            if lag_bytes == 0 && resync_bytes == 0 && !s.amnesiac {
                tracing::info!(volume = v.name(), "the peer is not connected; it had applied every write: stopping now");
            } else {
                tracing::warn!(
                    volume = v.name(),
                    lag_bytes,
                    resync_bytes,
                    "the peer is not connected: stopping now, before it applied every write; it resumes at the next start"
                );
            }
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            tracing::warn!(volume = v.name(), deadline = ?STOP_DRAIN_DEADLINE, lag_bytes = s.lag_bytes, "stopping before the peer applied every write; it resumes at the next start");
            return;
        }
        tokio::select! {
            r = &mut drained => {
                if r.is_ok() {
                    tracing::info!(volume = v.name(), "drained: nothing left for the peer to apply");
                }
                return;
            }
            _ = tokio::time::sleep_until(until.min(now + STOP_LINK_CHECK)) => {}
        }
    }
}

#[cfg(test)]
#[path = "site_tests.rs"]
mod tests;
