//! The store's identity file, `GEOMIRROR-STORE`, kept beside RocksDB's own files.
//!
//! Owns: a small text file naming the store's identity and its last checkpoint, written
//! atomically (a temporary file, fsynced, renamed over, the directory fsynced).
//!
//! Must not: hold replication state. It is a witness outside RocksDB: at every open the
//! store's own copy of the identity must match it, and the store's checkpoint must be at
//! least the file's. A store whose newest write-ahead log was lost (deleted, or never made
//! it to disk) comes back with an older checkpoint than the file, and is refused instead of
//! trusted (see `rocks.rs`, "Checkpoints").

use geomirror_core::StoreId;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const FILE_NAME: &str = "GEOMIRROR-STORE";
const HEADER: &str = "geomirror store";

/// What the identity file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub store: StoreId,
    pub checkpoint: u64,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Why an identity file that exists could not be taken.
#[derive(Debug, Error)]
pub enum IdentityFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is malformed", path.display())]
    Malformed { path: PathBuf },
}

/// Reads the identity file of the store at `dir`; `Ok(None)` when there is none.
pub fn read(dir: &Path) -> Result<Option<Identity>, IdentityFileError> {
    let path = path(dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IdentityFileError::Read { path, source }),
    };
    parse(&text).map(Some).ok_or(IdentityFileError::Malformed { path })
}

/// Parses the bytes of an identity file.
pub fn read_bytes(bytes: &[u8]) -> Option<Identity> {
    parse(std::str::from_utf8(bytes).ok()?)
}

fn parse(text: &str) -> Option<Identity> {
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let mut store = None;
    let mut checkpoint = None;
    for line in lines {
        match line.split_once(' ')? {
            ("id", v) => store = Some(parse_store_id(v)?),
            ("checkpoint", v) => checkpoint = Some(v.parse().ok()?),
            _ => return None,
        }
    }
    Some(Identity { store: store?, checkpoint: checkpoint? })
}

/// Parses a store identity as `StoreId` displays it (8-4-4-4-12 hex digits).
pub fn parse_store_id(s: &str) -> Option<StoreId> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok().map(StoreId)
}

/// Replaces the identity file, durably: when this returns, a crash leaves either the old
/// file or the new one, never a mix or none.
pub fn write(dir: &Path, id: Identity) -> io::Result<()> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        write!(f, "{HEADER}\nid {}\ncheckpoint {}\n", id.store, id.checkpoint)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path(dir))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_junk() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let id = Identity { store: StoreId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210), checkpoint: 42 };
        write(dir.path(), id).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(id));
        assert_eq!(parse_store_id(&id.store.to_string()), Some(id.store));
        for junk in ["", "geomirror store\nid 1\ncheckpoint 2\n", "other\n", "geomirror store\ncheckpoint 3\n", "geomirror store\nid x y\n"]
        {
            fs::write(path(dir.path()), junk).unwrap();
            assert!(matches!(read(dir.path()), Err(IdentityFileError::Malformed { .. })), "{junk:?} must be refused");
        }
    }
}
