//! The site's configuration file: TOML in, typed and validated settings out.
//!
//! Owns: the file format (every field documented here is the reference for operators), its
//! defaults, and every check that can be made before the site starts. A bad value stops the
//! start with a message naming the field and what would be accepted.
//!
//! Must not: open files other than the config itself, or bind sockets. Paths are resolved
//! against the config file's directory, not the working directory, so a site starts the same
//! way from anywhere.

use crate::nbd::handshake::MAX_NAME_BYTES;
use crate::nbd::proto::MAX_BLOCK_BYTES;
use geomirror_core::{CoreConfig, Geometry, Mode};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field}: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
}

/// A size in bytes: an integer, or a string with a binary unit ("64K", "1MiB", "8G").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses "4096", "64K", "1M", "1MiB", "2G", "1T" (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit {:?} (use K, M, G or T)", &t[i..])),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size (examples: 4096, 64K, 1M, 2G)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// The file as written. See `deploy/` for a commented example.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    /// This site.
    pub site: SiteSection,
    /// The NBD server hosts connect to.
    #[serde(default)]
    pub nbd: NbdSection,
    /// The volumes this site serves, one `[[volume]]` table each.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// The site's name ("dc1"): shown in logs and status, and its identity to the peer.
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdSection {
    /// Address the NBD server listens on. NBD carries no authentication: keep it on
    /// loopback or a trusted storage network. Port 0 picks a free port (printed at start).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Connections served at once; more are accepted and closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// A client that has not finished its handshake within this time is dropped.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Request bytes one connection may have in flight (read and write payloads); further
    /// requests wait unread. At least the 32 MiB maximum block size.
    #[serde(default = "default_inflight")]
    pub max_inflight_bytes_per_connection: Size,
}

impl Default for NbdSection {
    fn default() -> Self {
        NbdSection {
            listen: default_listen(),
            max_connections: default_max_connections(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            max_inflight_bytes_per_connection: default_inflight(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:10809".into()
}
fn default_max_connections() -> u32 {
    64
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_inflight() -> Size {
    Size(64 << 20)
}
fn default_extent_size() -> Size {
    Size(geomirror_core::geometry::DEFAULT_EXTENT_BYTES)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
    /// The NBD export name ("vol0"): letters, digits, '.', '_' and '-'.
    pub name: String,
    /// The media file, created sparse at `size` if missing. Relative paths are resolved
    /// against the config file's directory.
    pub media: PathBuf,
    /// Volume size: a positive multiple of 4 KiB ("8G").
    pub size: Size,
    /// The unit the record tracks: a power of two from 64K to 64M.
    #[serde(default = "default_extent_size")]
    pub extent_size: Size,
    /// Free text shown by `nbdinfo --list`.
    #[serde(default)]
    pub description: String,
}

/// A validated site configuration.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    pub name: String,
    pub nbd: NbdConfig,
    pub volumes: Vec<VolumeConfig>,
}

#[derive(Clone, Debug)]
pub struct NbdConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_inflight_bytes_per_connection: u64,
}

#[derive(Clone, Debug)]
pub struct VolumeConfig {
    pub name: String,
    pub media: PathBuf,
    pub geometry: Geometry,
    pub description: String,
    pub core: CoreConfig,
}

impl SiteConfig {
    pub fn load(path: &Path) -> Result<SiteConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        SiteConfig::parse(&text, path, &base)
    }

    /// Parses and validates `text`; `path` names the file in errors, `base` resolves paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<SiteConfig, ConfigError> {
        let file: SiteFile = toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let invalid = |field: &str, message: String| ConfigError::Invalid { path: path.to_owned(), field: field.to_owned(), message };
        check_name(&file.site.name).map_err(|m| invalid("site.name", m))?;

        let n = &file.nbd;
        let listen: SocketAddr =
            n.listen.parse().map_err(|_| invalid("nbd.listen", format!("{:?} is not an address like 127.0.0.1:10809", n.listen)))?;
        if n.max_connections == 0 || n.max_connections > 65536 {
            return Err(invalid("nbd.max_connections", format!("must be between 1 and 65536, got {}", n.max_connections)));
        }
        if !(100..=600_000).contains(&n.handshake_timeout_ms) {
            return Err(invalid("nbd.handshake_timeout_ms", format!("must be between 100 and 600000, got {}", n.handshake_timeout_ms)));
        }
        let inflight = n.max_inflight_bytes_per_connection.0;
        if inflight < MAX_BLOCK_BYTES as u64 || inflight > 4 << 30 {
            return Err(invalid(
                "nbd.max_inflight_bytes_per_connection",
                format!("must be between 32M (one largest request) and 4G, got {inflight} bytes"),
            ));
        }

        if file.volumes.is_empty() {
            return Err(invalid("volume", "no [[volume]] is configured: a site serves at least one".into()));
        }
        let mut names = BTreeSet::new();
        let mut medias = BTreeSet::new();
        let mut volumes = Vec::new();
        for (i, v) in file.volumes.iter().enumerate() {
            let field = |f: &str| format!("volume[{i}].{f}");
            check_name(&v.name).map_err(|m| invalid(&field("name"), m))?;
            if !names.insert(v.name.clone()) {
                return Err(invalid(&field("name"), format!("{:?} is used by two volumes", v.name)));
            }
            let media = if v.media.is_absolute() { v.media.clone() } else { base.join(&v.media) };
            if !medias.insert(media.clone()) {
                return Err(invalid(&field("media"), format!("{} is used by two volumes", media.display())));
            }
            let geometry = Geometry::new(v.size.0, v.extent_size.0).map_err(|e| invalid(&field("size"), e.to_string()))?;
            if v.description.len() > MAX_NAME_BYTES {
                return Err(invalid(&field("description"), "longer than 4096 bytes".into()));
            }
            // No peer is configurable yet: every volume is served standalone.
            let core = CoreConfig { mode: Mode::Standalone, ..CoreConfig::default() };
            core.validate().map_err(|e| invalid(&field("replication"), e.to_string()))?;
            volumes.push(VolumeConfig { name: v.name.clone(), media, geometry, description: v.description.clone(), core });
        }
        Ok(SiteConfig {
            name: file.site.name,
            nbd: NbdConfig {
                listen,
                max_connections: n.max_connections as usize,
                handshake_timeout: Duration::from_millis(n.handshake_timeout_ms),
                max_inflight_bytes_per_connection: inflight,
            },
            volumes,
        })
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} must be 1 to 64 characters long"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("{name:?} may hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SiteConfig, ConfigError> {
        SiteConfig::parse(text, Path::new("site.toml"), Path::new("/etc/geomirror"))
    }

    const GOOD: &str = r#"
        [site]
        name = "dc1"
        [[volume]]
        name = "vol0"
        media = "vol0.img"
        size = "1G"
    "#;

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.nbd.listen, "127.0.0.1:10809".parse().unwrap());
        assert_eq!(c.nbd.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.volumes[0].media, PathBuf::from("/etc/geomirror/vol0.img"));
        assert_eq!(c.volumes[0].geometry.extent_bytes(), 1 << 20);
        assert_eq!(c.volumes[0].core.mode, Mode::Standalone);
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert!(err(&GOOD.replace("1G", "1000")).contains("volume[0].size"));
        assert!(err(&GOOD.replace("\"1G\"", "\"1G\"\nextent_size = \"3M\"")).contains("not a power of two"));
        assert!(err(&GOOD.replace("\"vol0\"", "\"a/b\"")).contains("volume[0].name"));
        assert!(err(&GOOD.replace("[site]", "[nbd]\nlisten = \"nowhere\"\n[site]")).contains("nbd.listen"));
        assert!(err(&GOOD.replace("[site]", "[nbd]\nmax_inflight_bytes_per_connection = \"1M\"\n[site]")).contains("32M"));
        assert!(err(&GOOD.replace("size", "sise")).contains("unknown field"));
        assert!(err("[site]\nname = \"x\"").contains("no [[volume]]"));
        assert!(err(&format!("{GOOD}\n[[volume]]\nname = \"vol0\"\nmedia = \"b\"\nsize = 4096")).contains("used by two volumes"));
    }

    /// The example configs in deploy/ are what operators copy: they must stay valid.
    #[test]
    fn the_example_configs_are_valid() {
        for (name, text) in [
            ("site.example.toml", include_str!("../../../deploy/site.example.toml")),
            ("quickstart.toml", include_str!("../../../deploy/quickstart.toml")),
        ] {
            let c = parse(text).unwrap_or_else(|e| panic!("deploy/{name}: {e}"));
            assert!(!c.volumes.is_empty());
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 G"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
