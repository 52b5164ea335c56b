//! A volume's local media: one sparse file, positioned I/O, durable on sync.
//!
//! Owns: opening (or creating, sparse, at the configured size) the media file, holding an
//! exclusive lock on it so that two processes never serve one volume, and applying a
//! `WriteOp` to it: data with `pwrite`, zeroing (`ZERO_RANGE`) and trimming (`PUNCH_HOLE`)
//! with `fallocate` where the file system supports it and plain zeros where it does not; and
//! the scans of a media file for allocated ranges (`holds_data`, `allocated_bytes`).
//!
//! Must not: decide anything, or create directories: the media's directory is the
//! operator's, and a typo in its path must fail rather than grow a tree somewhere.
//! Ordering and durability rules come from the core's actions; this module only performs
//! them and reports failures.

use geomirror_core::{WriteKind, WriteOp};
use rustix::fs::{FallocateFlags, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Zeros written at a time where the file system cannot punch holes.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum MediaError {
    #[error("cannot open media file {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("media file {path} is {actual} bytes but the volume is configured as {configured} bytes; geomirror never truncates or grows media on its own: fix the size in the config, or move the file away to start empty")]
    SizeMismatch { path: PathBuf, actual: u64, configured: u64 },
    #[error("media file {path} is in use by another process (it holds the file's lock)")]
    Locked { path: PathBuf },
}

pub struct Media {
    file: File,
    path: PathBuf,
    size_bytes: u64,
}

impl Media {
    /// Opens the file, creating it sparse at `size_bytes` if it does not exist (its
    /// directory must).
    pub fn open(path: &Path, size_bytes: u64) -> Result<Media, MediaError> {
        let open_err = |source| MediaError::Open { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(open_err)?;
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|_| MediaError::Locked { path: path.to_owned() })?;
        let actual = file.metadata().map_err(open_err)?.len();
        if actual == 0 {
            // New (or empty) file: size it sparsely. No data can be lost by growing from 0.
            file.set_len(size_bytes).map_err(open_err)?;
            file.sync_all().map_err(open_err)?;
        } else if actual != size_bytes {
            return Err(MediaError::SizeMismatch { path: path.to_owned(), actual, configured: size_bytes });
        }
        Ok(Media { file, path: path.to_owned(), size_bytes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Reads exactly `buf.len()` bytes at `offset`. The caller has checked the range.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Applies one write. The caller (the core) has checked the range.
    pub fn apply(&self, op: &WriteOp) -> io::Result<()> {
        match &op.kind {
            WriteKind::Data(data) => self.file.write_all_at(data, op.offset),
            // Zeroing keeps the range allocated (so NBD's NO_HOLE always holds); trim frees it.
            WriteKind::Zero => self.zero(op.offset, op.len, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE),
            WriteKind::Trim => self.zero(op.offset, op.len, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE),
        }
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes the range read as zeros with `fallocate(flags)`, or by writing zeros where the
    /// file system lacks that mode.
    fn zero(&self, offset: u64, len: u64, flags: FallocateFlags) -> io::Result<()> {
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::INVAL => {}
            Err(e) => return Err(e.into()),
        }
        let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(len as usize)];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = ((end - at) as usize).min(zeros.len());
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Whether the file at `path` holds any data: it exists, is not empty, and has at least one
/// allocated range (`SEEK_DATA`). A file of holes reads as zeros everywhere, as new media
/// does. Used to tell a new site from one whose replication state was lost over its media.
pub fn holds_data(path: &Path) -> io::Result<bool> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(0)) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NXIO) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Bytes in allocated ranges of the file (`SEEK_DATA`/`SEEK_HOLE`); a file system without
/// them reports the whole file as data.
pub fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut total = 0;
    let mut at = 0;
    while at < len {
        let start = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(start)) {
            Ok(e) => e.min(len),
            Err(e) => return Err(e.into()),
        };
        total += end.saturating_sub(start);
        at = end.max(start + 1);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    #[test]
    fn allocated_bytes_counts_data_not_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        assert_eq!(allocated_bytes(&path).unwrap(), 0);
        f.write_all_at(&vec![7u8; 1 << 20], 8 << 20).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 40 << 20).unwrap();
        f.sync_all().unwrap();
        // File systems allocate in their own blocks; tmpfs and ext4 in 4 KiB, so exactly.
        assert_eq!(allocated_bytes(&path).unwrap(), 2 << 20);
    }

    #[test]
    fn writes_zeroes_and_trims_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.img");
        let m = Media::open(&path, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        m.apply(&WriteOp::data(4096, Bytes::from(vec![7u8; 65536]))).unwrap();
        m.apply(&WriteOp::zero(8192, 4096)).unwrap();
        m.apply(&WriteOp::trim(16384, 8192)).unwrap();
        m.sync().unwrap();
        let mut buf = vec![0u8; 65536];
        m.read_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 7));
        assert!(buf[4096..8192].iter().all(|b| *b == 0));
        assert!(buf[8192..12288].iter().all(|b| *b == 7));
        assert!(buf[12288..20480].iter().all(|b| *b == 0));
        assert!(buf[20480..].iter().all(|b| *b == 7));
    }

    #[test]
    fn a_size_mismatch_and_a_second_opener_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.img");
        let m = Media::open(&path, 1 << 20).unwrap();
        assert!(matches!(Media::open(&path, 1 << 20), Err(MediaError::Locked { .. })));
        drop(m);
        let err = Media::open(&path, 2 << 20).err().unwrap();
        assert!(matches!(err, MediaError::SizeMismatch { actual, configured, .. } if actual == 1 << 20 && configured == 2 << 20));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20, "nothing is truncated");
    }

    #[test]
    fn a_missing_directory_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/vol.img");
        assert!(matches!(Media::open(&path, 1 << 20), Err(MediaError::Open { .. })));
        assert!(!dir.path().join("no").exists());
    }
}
