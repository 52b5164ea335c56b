//! A whole site: its volumes and its NBD server, started and stopped together.
//!
//! Owns: the start order (media and drivers first, then the listener, so that no client is
//! accepted before its volume can serve) and the stop order (stop accepting, finish the
//! requests already read, sync every volume, end).
//!
//! Must not: hold policy. It wires the parts the config describes.

use crate::config::SiteConfig;
use crate::nbd::server::{NbdCounters, NbdServer};
use crate::store::MemoryStore;
use crate::volume::Volume;
use anyhow::Context;
use geomirror_core::{Role, SiteState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::watch;

pub struct RunningSite {
    pub name: String,
    pub nbd_addr: SocketAddr,
    pub volumes: Vec<Volume>,
    pub nbd_counters: Arc<NbdCounters>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    drivers: Vec<JoinHandle<()>>,
}

impl RunningSite {
    /// Opens every volume and starts serving. Must run inside a tokio runtime.
    pub async fn start(cfg: SiteConfig) -> anyhow::Result<RunningSite> {
        let mut volumes = Vec::new();
        let mut drivers = Vec::new();
        for v in &cfg.volumes {
            let store = Box::new(MemoryStore::new(SiteState::fresh(Role::Primary)));
            let (volume, driver) = Volume::start(v, store, None).with_context(|| format!("volume {}", v.name))?;
            volumes.push(volume);
            drivers.push(driver);
        }
        let server = NbdServer::bind(cfg.nbd.clone(), volumes.clone())
            .await
            .with_context(|| format!("cannot listen for NBD clients on {}", cfg.nbd.listen))?;
        let nbd_addr = server.local_addr()?;
        let nbd_counters = server.counters();
        let (shutdown, rx) = watch::channel(false);
        let server = tokio::spawn(server.serve(rx));
        Ok(RunningSite { name: cfg.name, nbd_addr, volumes, nbd_counters, shutdown, server, drivers })
    }

    /// The URL a client uses for a volume.
    pub fn nbd_url(&self, volume: &str) -> String {
        format!("nbd://{}/{}", self.nbd_addr, volume)
    }

    /// Stops accepting, lets connections finish what they have read, then stops and syncs
    /// every volume.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
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
