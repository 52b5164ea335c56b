//! `geomirror adopt`: puts a volume whose media already holds data under protection.
//!
//! Owns: the checks before an adoption (a site with a peer, a volume of its config, media
//! that exists at the configured size, holds data and is not in use, and no replication
//! state for the volume yet), creating the volume's store as an adopted primary
//! (`SiteState::adopted`: it owes its peer a full verified resync), and what the operator
//! is told. It runs while the site is stopped and changes nothing when a check fails. The
//! allocation scan is `media`'s (`allocated_bytes`), beside `holds_data`.
//!
//! Must not: touch the media (it is only opened, for its lock and size, and scanned for
//! allocated ranges), or replace a store that exists: a site whose state was lost starts as
//! an amnesiac secondary on its own, and adopting over it would make its possibly older
//! media the truth. That is why adoption is a command an operator runs once, never a
//! config setting a restart could repeat.

use crate::config::{SiteConfig, VolumeConfig};
use crate::media::Media;
use crate::store::RocksStore;
use anyhow::{bail, Context, Result};
use geomirror_core::{SiteState, StoreId};
use std::path::{Path, PathBuf};

/// One volume adopted.
#[derive(Clone, Debug)]
pub struct Adopted {
    pub volume: String,
    pub media: PathBuf,
    pub size_bytes: u64,
    /// Bytes in allocated ranges of the media file (`SEEK_DATA`/`SEEK_HOLE`): what a sync
    /// onto blank media has to read and compare, at most.
    pub allocated_bytes: u64,
    pub store: StoreId,
    pub state_dir: PathBuf,
}

/// Adopts `volume` (every volume of the site when None), after checking all of them: either
/// every named volume is adopted, or none.
pub fn adopt(cfg: &SiteConfig, volume: Option<&str>) -> Result<Vec<Adopted>> {
    let Some(peer) = &cfg.peer else {
        bail!("site {} has no [peer]: it mirrors nothing, so there is nothing to adopt its data for; add a [peer] section first", cfg.name)
    };
    let chosen: Vec<&VolumeConfig> = match volume {
        Some(name) => match cfg.volumes.iter().find(|v| v.name == name) {
            Some(v) => vec![v],
            None => bail!(
                "site {} has no volume {name:?}; its volumes: {}",
                cfg.name,
                cfg.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        },
        None => cfg.volumes.iter().collect(),
    };
    // Every check first, for every volume; only then is anything created.
    let mut plans = Vec::new();
    for v in &chosen {
        let dir = peer.state_dir.join(&v.name);
        plans.push((v, check(v, &dir)?, dir));
    }
    let mut out = Vec::new();
    for (v, allocated_bytes, dir) in plans {
        let id = crate::store::new_store_id().context("draw a store identity")?;
        let store =
            RocksStore::open(&dir, || Ok(SiteState::adopted(id))).with_context(|| format!("volume {}: create its store", v.name))?;
        if !store.created() {
            bail!("volume {}: a store appeared at {} while adopting; is the site running?", v.name, dir.display());
        }
        drop(store);
        tracing::warn!(
            volume = v.name,
            media = %v.media.display(),
            store = %id,
            allocated_bytes,
            "ADOPTED: the media's data is now this volume's primary copy; the peer gets a full verified resync from it"
        );
        out.push(Adopted {
            volume: v.name.clone(),
            media: v.media.clone(),
            size_bytes: v.geometry.volume_bytes(),
            allocated_bytes,
            store: id,
            state_dir: dir,
        });
    }
    Ok(out)
}

/// The checks for one volume; its allocated bytes when it may be adopted.
fn check(v: &VolumeConfig, dir: &Path) -> Result<u64> {
    let size = v.geometry.volume_bytes();
    match std::fs::metadata(&v.media) {
        Ok(m) if m.len() == 0 => bail!(
            "volume {}: media {} is empty: there is no data to adopt; a new volume needs no adoption, start the site as usual",
            v.name,
            v.media.display()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "volume {}: media {} does not exist: adopt puts existing data under protection; for a new volume, start the site as usual",
            v.name,
            v.media.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("volume {}: media {}", v.name, v.media.display())),
    }
    if let Some(existing) = existing_store(dir)? {
        bail!(
            "volume {}: it already has replication state at {}{existing}: adopt is only for media that holds data and has no state. \
             If that state belongs to this media, start the site as usual. If it must go (the media is the copy to keep and the \
             state is stale), move {} aside first, then adopt",
            v.name,
            dir.display(),
            dir.display()
        );
    }
    // Opening takes the media's lock (a running site holds it) and checks its size; the
    // file exists and is not empty, so nothing is created or resized.
    let media = Media::open(&v.media, size).with_context(|| format!("volume {}", v.name))?;
    let allocated =
        crate::media::allocated_bytes(&v.media).with_context(|| format!("volume {}: scan media {} for data", v.name, v.media.display()))?;
    drop(media);
    if allocated == 0 {
        bail!(
            "volume {}: media {} holds no data (it is all holes): there is nothing to adopt; start the site as usual",
            v.name,
            v.media.display()
        );
    }
    Ok(allocated)
}

/// A description of the store at `dir` when there is one (its identity when readable).
fn existing_store(dir: &Path) -> Result<Option<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read the state directory {}", dir.display())),
    };
    if entries.count() == 0 {
        return Ok(None);
    }
    Ok(Some(match crate::store::identity_file::read(dir) {
        Ok(Some(id)) => format!(" (store {})", id.store),
        _ => String::new(),
    }))
}
