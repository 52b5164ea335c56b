//! Saved-aside extents: what a site held before a resync overwrote it.
//!
//! Owns: the side file of a volume (`<media>.aside`, a sparse image holding saved extents
//! at their own offsets) and its index (`<media>.aside.idx`, the saved extent ids), and the
//! rule that the first copy of an extent wins: once an extent is in the index it is never
//! copied again, so a restart in the middle of a failback cannot replace what the site held
//! with what the resync already wrote.
//!
//! Must not: decide what to save. The core emits `SaveAside` for exactly the extents that
//! must be kept; this module makes each copy durable before the media is touched again.

use crate::media::Media;
use geomirror_core::{ExtentId, Geometry};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub struct Aside {
    data_path: PathBuf,
    index_path: PathBuf,
    geo: Geometry,
    /// Loaded on first use: most volumes never save anything.
    open: Option<(File, File, BTreeSet<ExtentId>)>,
}

impl Aside {
    pub fn new(media: &Path, geo: Geometry) -> Aside {
        Aside::named(media, ".aside", geo)
    }

    /// The side file of one failback: the one that brought this site into `epoch`
    /// (`<media>.aside.e<epoch>`), so that each failback keeps its own copies.
    pub fn for_epoch(media: &Path, epoch: u64, geo: Geometry) -> Aside {
        Aside::named(media, &format!(".aside.e{epoch}"), geo)
    }

    fn named(media: &Path, suffix: &str, geo: Geometry) -> Aside {
        let with = |suffix: &str| {
            let mut p = media.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        Aside { data_path: with(suffix), index_path: with(&format!("{suffix}.idx")), geo, open: None }
    }

    /// The side files next to `media` with how many extents each holds, oldest epoch first.
    pub fn list(media: &Path) -> Vec<(PathBuf, u64)> {
        let Some(dir) = media.parent() else { return Vec::new() };
        let Some(name) = media.file_name().and_then(|n| n.to_str()) else { return Vec::new() };
        let prefix = format!("{name}.aside.e");
        let mut out: Vec<(u64, PathBuf, u64)> = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let epoch: u64 = file.strip_prefix(&prefix)?.parse().ok()?;
                let idx = e.path().with_file_name(format!("{file}.idx"));
                let extents = std::fs::metadata(idx).map_or(0, |m| m.len() / 8);
                Some((epoch, e.path(), extents))
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, p, n)| (p, n)).collect()
    }

    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// The extents saved so far (read from the index).
    pub fn saved(&mut self) -> io::Result<BTreeSet<ExtentId>> {
        Ok(self.files()?.2.clone())
    }

    fn files(&mut self) -> io::Result<&mut (File, File, BTreeSet<ExtentId>)> {
        if self.open.is_none() {
            let data = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.data_path)?;
            if data.metadata()?.len() < self.geo.volume_bytes() {
                data.set_len(self.geo.volume_bytes())?;
            }
            let mut index = OpenOptions::new().read(true).append(true).create(true).open(&self.index_path)?;
            let mut raw = Vec::new();
            index.read_to_end(&mut raw)?;
            // A torn last entry (a crash mid-append) names no extent: it was never saved.
            let saved = raw.chunks_exact(8).map(|c| ExtentId(u64::from_be_bytes(c.try_into().expect("8 bytes")))).collect();
            self.open = Some((data, index, saved));
        }
        Ok(self.open.as_mut().expect("just opened"))
    }

    /// Copies the extent's current content aside, durably, unless a copy exists.
    pub fn save(&mut self, media: &Media, extent: ExtentId) -> io::Result<()> {
        let range = self.geo.extent_range(extent);
        let (data, index, saved) = self.files()?;
        if saved.contains(&extent) {
            return Ok(());
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        media.read_at(&mut buf, range.start)?;
        data.write_all_at(&buf, range.start)?;
        data.sync_data()?;
        // Only a copy that is durable is entered in the index.
        index.write_all(&extent.0.to_be_bytes())?;
        index.sync_data()?;
        saved.insert(extent);
        tracing::info!(extent = extent.0, file = %self.data_path.display(), "saved an extent aside before overwriting it");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use geomirror_core::WriteOp;

    #[test]
    fn the_first_copy_wins_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let geo = Geometry::new(1 << 20, 64 << 10).unwrap();
        let media = Media::open(&dir.path().join("v.img"), 1 << 20).unwrap();
        media.apply(&WriteOp::data(64 << 10, Bytes::from(vec![1u8; 64 << 10]))).unwrap();
        let mut aside = Aside::new(&dir.path().join("v.img"), geo);
        aside.save(&media, ExtentId(1)).unwrap();
        media.apply(&WriteOp::data(64 << 10, Bytes::from(vec![2u8; 64 << 10]))).unwrap();
        // A restart: the index says extent 1 is saved, so the new content is not copied.
        let mut aside = Aside::new(&dir.path().join("v.img"), geo);
        aside.save(&media, ExtentId(1)).unwrap();
        assert_eq!(aside.saved().unwrap().into_iter().collect::<Vec<_>>(), vec![ExtentId(1)]);
        let side = std::fs::read(aside.data_path()).unwrap();
        assert!(side[64 << 10..128 << 10].iter().all(|b| *b == 1), "the first copy is kept");
        assert!(side[..64 << 10].iter().all(|b| *b == 0));
    }
}
