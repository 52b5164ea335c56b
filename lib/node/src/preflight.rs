//! What a site checks on disk before it creates anything there.
//!
//! Owns: every check of the files and directories a validated config names that can fail,
//! and of the addresses it listens on:
//! - each volume's media: its directory exists (geomirror never creates the directories of
//!   the files an operator names), and the media, if it exists, is a regular file of the
//!   volume's size (or empty: the start sizes it);
//! - the TCP listeners (`nbd.listen` and, with a peer, `admin.listen`): not the same
//!   address (the replication port is UDP, and may share a number with either);
//! - with a peer, the state directory: a directory, or creatable (its parent exists), and
//!   each volume's store in it a directory if present;
//! - the site's certificate, key and CA: readable and parseable, the key the certificate's;
//! - the private key and the admin token files: accessible to their owner only (ssh's rule
//!   for private keys), unless the config allows otherwise; tokens long enough.
//!
//! `RunningSite::start` runs `check` before it creates a directory or a file, so a refused
//! start leaves the disk as it was, and each refusal names the config field it is about.
//!
//! Must not: create, write, lock or open for writing anything, or bind an address (the site
//! binds its listeners itself, right after these checks); decide what a site does with the
//! state it finds (`site.rs` does).

use crate::config::SiteConfig;
use crate::transport::tls::{self, SiteTls, TlsError};
use rustls::sign::CertifiedKey;
use std::fs::Metadata;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The shortest bearer token accepted: 16 characters, so that a token cannot be guessed
/// over the network even when it is made of a small alphabet.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Why a site does not start. Each names the config field and says what to do.
#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "{field} {path}: the directory {dir} does not exist, and geomirror does not create the directories of the files it is given: create it (`mkdir -p {dir}`) or correct the path"
    )]
    NoDirectory { field: String, path: PathBuf, dir: PathBuf },
    #[error("{field} {path} is {kind}; it must be a regular file (geomirror creates it, sparse, if it is missing)")]
    NotAFile { field: String, path: PathBuf, kind: &'static str },
    #[error(
        "{field} {path} is {actual} bytes but {size_field} is {configured} bytes; geomirror never truncates or grows media on its own: fix {size_field}, or move the file away to start empty"
    )]
    MediaSize { field: String, size_field: String, path: PathBuf, actual: u64, configured: u64 },
    #[error("{first} and {second} are both {addr}: two listeners cannot share an address; give each its own port")]
    SameAddress { first: &'static str, second: &'static str, addr: SocketAddr },
    #[error("{field} {path} is {kind}, not a directory")]
    NotADirectory { field: String, path: PathBuf, kind: &'static str },
    #[error("{field} {path}: cannot look it up")]
    Stat { field: String, path: PathBuf, source: io::Error },
    #[error(
        "{field} {path} holds a secret but is accessible to {who} (mode {mode:04o}): run `chmod 600 {path}`, or set allow_insecure_key_permissions = true in [site] to start anyway"
    )]
    Exposed { field: String, path: PathBuf, mode: u32, who: &'static str },
    /// A file that is read but holds no usable certificate or key (`error` says which).
    #[error("{field}: {error}")]
    Tls { field: &'static str, error: TlsError },
    #[error("tls.key {path} is not usable as this site's key: {source}")]
    Key { path: PathBuf, source: rustls::Error },
    #[error("tls.key {key} is not the private key of tls.cert {cert}: install the key made with that certificate")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("cannot read {field} {path}")]
    Read { field: &'static str, path: PathBuf, source: io::Error },
    #[error("{field} {path} holds a token of {len} characters; use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")]
    ShortToken { field: &'static str, path: PathBuf, len: usize },
}

/// What the checks loaded, for the start to use (read once, so it uses what was checked).
pub struct Checked {
    /// The site's certificate, key and CA (with a peer).
    pub tls: Option<SiteTls>,
    /// `[admin] token_file`'s token.
    pub token: Option<String>,
    /// `[admin] metrics_token_file`'s token.
    pub metrics_token: Option<String>,
}

/// Runs every check, in the order of the config file; the first failure is returned.
pub fn check(cfg: &SiteConfig) -> Result<Checked, PreflightError> {
    check_listeners(cfg)?;
    for (i, v) in cfg.volumes.iter().enumerate() {
        check_media(i, &v.media, v.geometry.volume_bytes())?;
    }
    let mut checked = Checked { tls: None, token: None, metrics_token: None };
    let Some(p) = &cfg.peer else { return Ok(checked) };
    check_state_dir(&p.state_dir, cfg.volumes.iter().map(|v| v.name.as_str()))?;
    let me = Process::current();
    let allow = cfg.allow_insecure_key_permissions;
    check_private("tls.key", &p.key, &me, allow)?;
    let field_of = |path: &Path| [("tls.cert", &p.cert), ("tls.key", &p.key), ("tls.ca", &p.ca)].into_iter().find(|(_, p)| *p == path);
    let tls = SiteTls::load(&p.cert, &p.key, &p.ca).map_err(|error| match error {
        TlsError::Read { path, source } => PreflightError::Read { field: field_of(&path).map_or("tls", |f| f.0), path, source },
        TlsError::Empty { ref path, .. } | TlsError::Ca { ref path, .. } => {
            PreflightError::Tls { field: field_of(path).map_or("tls", |f| f.0), error }
        }
        error => PreflightError::Tls { field: "tls", error },
    })?;
    // The key must be one rustls can sign with, and the certificate's: otherwise the first
    // handshake fails, long after the start looked fine.
    match CertifiedKey::from_der(tls.chain.clone(), tls.key.clone_key(), &tls::provider()) {
        Ok(_) => {}
        Err(rustls::Error::InconsistentKeys(_)) => return Err(PreflightError::KeyMismatch { key: p.key.clone(), cert: p.cert.clone() }),
        Err(source) => return Err(PreflightError::Key { path: p.key.clone(), source }),
    }
    checked.tls = Some(tls);
    if let Some(a) = &cfg.admin {
        checked.token = a.token_file.as_deref().map(|f| read_token("admin.token_file", f, &me, allow)).transpose()?;
        checked.metrics_token =
            a.metrics_token_file.as_deref().map(|f| read_token("admin.metrics_token_file", f, &me, allow)).transpose()?;
    }
    Ok(checked)
}

/// The site's TCP listeners are on different addresses. Port 0 (any free port) never
/// clashes; an unspecified address (`0.0.0.0`, `[::]`) clashes with every address of its
/// port.
fn check_listeners(cfg: &SiteConfig) -> Result<(), PreflightError> {
    let Some(admin) = &cfg.admin else { return Ok(()) };
    let (a, b) = (cfg.nbd.listen, admin.listen);
    let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
    if a.port() != 0 && a.port() == b.port() && overlap {
        return Err(PreflightError::SameAddress { first: "nbd.listen", second: "admin.listen", addr: b });
    }
    Ok(())
}

/// Volume `i`'s media: a regular file of the volume's size or empty, or missing in a
/// directory that exists.
fn check_media(i: usize, path: &Path, size_bytes: u64) -> Result<(), PreflightError> {
    let field = &format!("volume[{i}].media");
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() != 0 && m.len() != size_bytes => Err(PreflightError::MediaSize {
            field: field.into(),
            size_field: format!("volume[{i}].size"),
            path: path.into(),
            actual: m.len(),
            configured: size_bytes,
        }),
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => Err(PreflightError::NotAFile { field: field.into(), path: path.into(), kind: kind(&m) }),
        Err(e) if missing(&e) => {
            if std::fs::symlink_metadata(path).is_ok() {
                // Creating the media would create the link's missing target, wherever it is.
                return Err(PreflightError::NotAFile { field: field.into(), path: path.into(), kind: "a symbolic link to nothing" });
            }
            check_directory_of(field, path)
        }
        Err(source) => Err(PreflightError::Stat { field: field.into(), path: path.into(), source }),
    }
}

/// The state directory: a directory, or missing in a directory that exists (the stores
/// create it); a volume's store in it, where present, a directory.
fn check_state_dir<'a>(dir: &Path, volumes: impl Iterator<Item = &'a str>) -> Result<(), PreflightError> {
    const FIELD: &str = "site.state_dir";
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => return Err(PreflightError::NotADirectory { field: FIELD.into(), path: dir.into(), kind: kind(&m) }),
        Err(e) if missing(&e) => return check_directory_of(FIELD, dir),
        Err(source) => return Err(PreflightError::Stat { field: FIELD.into(), path: dir.into(), source }),
    }
    for name in volumes {
        let store = dir.join(name);
        match std::fs::metadata(&store) {
            Ok(m) if !m.is_dir() => {
                return Err(PreflightError::NotADirectory {
                    field: format!("the store of volume {name} in {FIELD}"),
                    path: store,
                    kind: kind(&m),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(PreflightError::Stat { field: FIELD.into(), path: store, source }),
        }
    }
    Ok(())
}

/// `path`'s directory exists (the file itself does not).
fn check_directory_of(field: &str, path: &Path) -> Result<(), PreflightError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => Err(PreflightError::NotADirectory { field: format!("the directory of {field}"), path: dir.into(), kind: kind(&m) }),
        Err(e) if missing(&e) => Err(PreflightError::NoDirectory { field: field.into(), path: path.into(), dir: dir.into() }),
        Err(source) => Err(PreflightError::Stat { field: field.into(), path: dir.into(), source }),
    }
}

/// The path does not exist: nothing is there, or a component on the way is no directory
/// (which `check_directory_of` then names).
fn missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
}

/// What a path is, in words, for a refusal.
fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// The user and groups this process runs as, for the permission rule.
struct Process {
    euid: u32,
    groups: Vec<u32>,
}

impl Process {
    fn current() -> Process {
        let mut groups: Vec<u32> = rustix::process::getgroups().unwrap_or_default().into_iter().map(|g| g.as_raw()).collect();
        groups.push(rustix::process::getegid().as_raw());
        Process { euid: rustix::process::geteuid().as_raw(), groups }
    }
}

/// Who besides a file's owner may access it, by its mode, owner and group; None when no one.
///
/// ssh's rule (no access for group or others), with an exception like PostgreSQL's: a file
/// owned by root may be readable (only) by its group when that group is how this process,
/// not root, reads it. That is what Kubernetes makes of a Secret mounted with `fsGroup` (root,
/// the pod's group, 0440) and Debian of keys in the `ssl-cert` group (root, 0640); root
/// chose who is in the group.
fn exposure(mode: u32, owner: u32, group: u32, me: &Process) -> Option<&'static str> {
    let (g, o) = (mode & 0o070 != 0, mode & 0o007 != 0);
    let root_shares_with_us = owner == 0 && me.euid != 0 && mode & 0o077 == 0o040 && me.groups.contains(&group);
    match (g && !root_shares_with_us, o) {
        (false, false) => None,
        (true, false) => Some("its group"),
        (false, true) => Some("all users"),
        (true, true) => Some("its group and all users"),
    }
}

/// Refuses a secret others may read, unless `allow`, which logs it instead.
fn check_private(field: &'static str, path: &Path, me: &Process, allow: bool) -> Result<(), PreflightError> {
    let m = std::fs::metadata(path).map_err(|source| PreflightError::Read { field, path: path.into(), source })?;
    let mode = m.mode() & 0o7777;
    if let Some(who) = exposure(mode, m.uid(), m.gid(), me) {
        if !allow {
            return Err(PreflightError::Exposed { field: field.into(), path: path.into(), mode, who });
        }
        tracing::warn!(
            field,
            path = %path.display(),
            mode = format!("{mode:04o}"),
            who,
            "INSECURE: a secret is accessible to {who}, accepted only because allow_insecure_key_permissions = true; run `chmod 600 {}` and remove the setting",
            path.display()
        );
    }
    Ok(())
}

/// Reads a bearer token: a file only its owner may read, holding at least
/// `MIN_TOKEN_CHARS` characters (surrounding white space is not part of it).
fn read_token(field: &'static str, path: &Path, me: &Process, allow: bool) -> Result<String, PreflightError> {
    check_private(field, path, me, allow)?;
    let t = std::fs::read_to_string(path).map_err(|source| PreflightError::Read { field, path: path.into(), source })?;
    let t = t.trim().to_owned();
    if t.chars().count() < MIN_TOKEN_CHARS {
        return Err(PreflightError::ShortToken { field, path: path.into(), len: t.chars().count() });
    }
    Ok(t)
}

#[cfg(test)]
#[path = "preflight_tests.rs"]
pub(crate) mod tests;
