//! The site's configuration file: TOML in, typed and validated settings out.
//!
//! Owns: the file format (every field documented here is the reference for operators), its
//! defaults, and every check that can be made before the site starts. A bad value stops the
//! start with a message naming the field and what would be accepted.
//!
//! Must not: open files other than the config itself, or bind sockets. Paths are resolved
//! against the config file's directory, not the working directory, so a site starts the same
//! way from anywhere.

use crate::names::{check_name, check_site_name};
use crate::nbd::budget::GUARANTEED_BYTES_PER_CONNECTION;
use crate::nbd::handshake::MAX_NAME_BYTES;
use crate::nbd::proto::MAX_BLOCK_BYTES;
use crate::transport::LinkTuning;
use geomirror_core::geometry::GeometryError;
use geomirror_core::{CoreConfig, FlushPolicy, Geometry, LagPolicy, LinkLossPolicy, Mode, Role};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeSet;
use std::fmt;
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

/// What a size may be written as, for errors.
const SIZE_FORMS: &str = "a whole number of bytes or a string with a binary unit, like 4096 or \"8G\"";

/// A visitor rather than an untagged enum: serde's untagged enums drop the reason a value
/// failed ("data did not match any variant"), and the reason is what the operator needs.
struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a size: {SIZE_FORMS}")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
        Ok(Size(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
        u64::try_from(n).map(Size).map_err(|_| E::custom(format!("{n} is negative; a size is {SIZE_FORMS}")))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Size, E> {
        Err(E::custom(format!("{n} is not a whole number; a size is {SIZE_FORMS}")))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
        parse_size(s).map(Size).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
}

/// Why a size was refused; the sentence quotes what was given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{given:?}: unknown unit {unit:?} (use K, M, G or T)")]
    UnknownUnit { given: String, unit: String },
    #[error("{given:?} is not a size (examples: 4096, 64K, 1M, 2G)")]
    NotANumber { given: String },
    #[error("{given:?} is too large")]
    TooLarge { given: String },
}

/// Parses "4096", "64K", "1M", "1MiB", "2G", "1T" (binary units).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
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
                _ => return Err(SizeError::UnknownUnit { given: s.to_owned(), unit: t[i..].to_owned() }),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num.trim().parse().map_err(|_| SizeError::NotANumber { given: s.to_owned() })?;
    n.checked_mul(mult).ok_or_else(|| SizeError::TooLarge { given: s.to_owned() })
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
    /// The other site. Without it, the site serves its volumes alone (standalone).
    pub peer: Option<PeerSection>,
    /// This site's certificate and the deployment's CA (required with a peer).
    pub tls: Option<TlsSection>,
    /// What the link between the sites is like (with a peer).
    #[serde(default)]
    pub link: LinkSection,
    /// How volumes are replicated (with a peer).
    #[serde(default)]
    pub replication: ReplicationSection,
    /// The admin API (with a peer): status, promote, demote.
    #[serde(default)]
    pub admin: AdminSection,
    /// The volumes this site serves, one `[[volume]]` table each.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeSection>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// HTTPS, with the site's certificate. Keep it on localhost or a management network.
    pub listen: String,
    /// A file holding a bearer token that callers may present instead of an admin
    /// certificate. Without it only admin certificates are accepted.
    pub token_file: Option<PathBuf>,
    /// A file holding a second bearer token that is good for `GET /metrics` only: give it to
    /// Prometheus, not an admin's power. Admin certificates and the admin token may read
    /// the metrics too.
    pub metrics_token_file: Option<PathBuf>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection { listen: "127.0.0.1:7300".into(), token_file: None, metrics_token_file: None }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// The other site's name; its certificate must carry `geomirror:site:<name>`.
    pub name: String,
    /// Where to reach the peer's replication port (or a wan-emu in front of it).
    pub address: String,
    /// This site's replication port (UDP; QUIC).
    pub listen: String,
    /// The role this site takes at its first start; afterwards its store remembers.
    pub initial_role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The deployment's CA certificate (PEM).
    pub ca: PathBuf,
    /// This site's certificate (PEM), from `geomirror certs` or your own PKI.
    pub cert: PathBuf,
    /// This site's private key (PEM).
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSection {
    /// The link's bandwidth, from which QUIC's windows are sized.
    pub bandwidth_mbps: u64,
    /// The expected round-trip time between the sites.
    pub rtt_ms: u64,
    pub keep_alive_ms: u64,
    /// A link silent this long is down.
    pub idle_timeout_ms: u64,
    /// Bulk data is paced at this share of `bandwidth_mbps`, so that it never fills the
    /// path's queue and record updates cross in one round trip.
    pub bulk_pace_percent: u64,
}

impl Default for LinkSection {
    fn default() -> Self {
        LinkSection { bandwidth_mbps: 1000, rtt_ms: 50, keep_alive_ms: 1000, idle_timeout_ms: 10_000, bulk_pace_percent: 92 }
    }
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    /// predictive (the method), sync (every write waits for the secondary) or async.
    pub mode: Mode,
    /// local: FLUSH and FUA are durable on this site; remote: also applied on the peer.
    pub flush_policy: FlushPolicy,
    /// block: misses wait, then fail; degrade: go on with a local dirty map.
    pub on_link_loss: LinkLossPolicy,
    /// Most extents the record holds. Must cover max_lag_bytes at the volume's extent size.
    pub record_capacity_extents: u64,
    /// How long a miss waits for the record update before on_link_loss applies.
    pub record_update_timeout_ms: u64,
    /// Under block, how long a held write waits in all before it fails.
    pub link_loss_deadline_ms: u64,
    /// Most bytes written but not yet applied on the peer.
    pub max_lag_bytes: Size,
    /// throttle: new writes wait; resync: copy dirty extents from media instead.
    pub on_lag_full: LagPolicy,
    /// Most bytes shipped and not yet applied (the data window).
    pub max_inflight_bytes: Size,
    /// Data streams bulk data is spread over.
    pub data_lanes: u8,
    /// Clean generations older than this leave the record (0: only under pressure).
    pub clean_generation_max_age_ms: u64,
    /// A failback compares each extent of the failback set by SHA-256 digests of its 4 KiB
    /// blocks, reading it on both sites, and copies over the WAN only the blocks that
    /// differ. false copies the whole set.
    pub verify_failback: bool,
    /// A full sync onto a peer whose store replaced the one this site paired with (a rebuilt
    /// site): "approve" (an operator approves it, naming that store: `geomirror rebuild`)
    /// or "auto" (it starts by itself).
    pub rebuild: RebuildPolicy,
}

/// Whether a rebuild of the peer waits for an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebuildPolicy {
    Approve,
    Auto,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        let c = CoreConfig::default();
        ReplicationSection {
            mode: Mode::Predictive,
            flush_policy: FlushPolicy::Local,
            on_link_loss: LinkLossPolicy::Block,
            record_capacity_extents: c.record_capacity_extents,
            record_update_timeout_ms: c.record_update_timeout.as_millis() as u64,
            link_loss_deadline_ms: c.link_loss_deadline.as_millis() as u64,
            max_lag_bytes: Size(c.max_lag_bytes),
            on_lag_full: LagPolicy::Throttle,
            max_inflight_bytes: Size(c.max_inflight_bytes),
            data_lanes: c.data_lanes,
            clean_generation_max_age_ms: c.clean_generation_max_age.map_or(0, |d| d.as_millis() as u64),
            verify_failback: c.verify_failback,
            rebuild: if c.rebuild_auto { RebuildPolicy::Auto } else { RebuildPolicy::Approve },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// The site's name ("dc1"): shown in logs and status, and its identity to the peer.
    /// A name as `names::NAME_RULE` says, and a DNS name (the peer's TLS server name).
    pub name: String,
    /// Where the site keeps its durable state (a RocksDB store per volume, in
    /// `state_dir/<volume name>`). Required with a peer; relative to the config file's
    /// directory. Created at the first start if missing, but its parent must exist.
    pub state_dir: Option<PathBuf>,
    /// Start even though the site's private key (`[tls] key`) or a token file (`[admin]
    /// token_file`, `metrics_token_file`) may be read by other users (its mode gives group
    /// or others access). Off by default: such a file stops the start, as ssh refuses such a
    /// key. Each file let through is logged as a warning at every start.
    #[serde(default)]
    pub allow_insecure_key_permissions: bool,
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
    /// Request bytes all connections together may have in flight: write payloads not yet
    /// applied, read data not yet sent, replies waiting for a client that does not read.
    /// When it is spent, connections are not read further until replies go out. Each
    /// connection slot keeps a guaranteed 2 MiB of it, so it must be at least
    /// `max_connections` × 2M plus 32M (one largest request) for the rest.
    #[serde(default = "default_site_inflight")]
    pub max_inflight_bytes: Size,
}

impl Default for NbdSection {
    fn default() -> Self {
        NbdSection {
            listen: default_listen(),
            max_connections: default_max_connections(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            max_inflight_bytes_per_connection: default_inflight(),
            max_inflight_bytes: default_site_inflight(),
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
/// 256 MiB: the guaranteed shares of the default 64 connections (128 MiB) and a shared pool
/// in which two clients at once reach the 64 MiB per-connection depth. Without it the front
/// end could be made to hold 64 × 64 MiB.
fn default_site_inflight() -> Size {
    Size(256 << 20)
}
fn default_extent_size() -> Size {
    Size(geomirror_core::geometry::DEFAULT_EXTENT_BYTES)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
    /// The NBD export name ("vol0"), also the name of the volume's store directory and its
    /// metric label: a name as `names::NAME_RULE` says.
    pub name: String,
    /// The media file, created sparse at `size` if missing; its directory must exist.
    /// Relative paths are resolved against the config file's directory.
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
    /// None: standalone.
    pub peer: Option<PeerConfig>,
    /// The admin API (sites with a peer).
    pub admin: Option<AdminSettings>,
    /// Accept a private key or token file that others may read (with a warning).
    pub allow_insecure_key_permissions: bool,
}

#[derive(Clone, Debug)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub metrics_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub listen: SocketAddr,
    pub initial_role: Role,
    pub state_dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub tuning: LinkTuning,
}

#[derive(Clone, Debug)]
pub struct NbdConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_inflight_bytes_per_connection: u64,
    /// Over all connections; see `budget`.
    pub max_inflight_bytes: u64,
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
        let file: SiteFile = serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| parse_error(path, text, e))?;
        let invalid = |field: &str, message: String| ConfigError::Invalid { path: path.to_owned(), field: field.to_owned(), message };
        check_site_name(&file.site.name).map_err(|e| invalid("site.name", e.to_string()))?;

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
        let site_inflight = n.max_inflight_bytes.0;
        let shares = n.max_connections as u64 * GUARANTEED_BYTES_PER_CONNECTION as u64;
        let least = shares + MAX_BLOCK_BYTES as u64;
        if site_inflight < least || site_inflight > 1 << 40 {
            return Err(invalid(
                "nbd.max_inflight_bytes",
                format!(
                    "must be between {}M ({} connections × {}M guaranteed to each, plus 32M for one largest request) and 1T, \
                     got {site_inflight} bytes; raise it or lower nbd.max_connections",
                    least >> 20,
                    n.max_connections,
                    GUARANTEED_BYTES_PER_CONNECTION >> 20
                ),
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
            check_name(&v.name).map_err(|e| invalid(&field("name"), e.to_string()))?;
            if !names.insert(v.name.clone()) {
                return Err(invalid(&field("name"), format!("{:?} is used by two volumes", v.name)));
            }
            let media = if v.media.is_absolute() { v.media.clone() } else { base.join(&v.media) };
            if !medias.insert(media.clone()) {
                return Err(invalid(&field("media"), format!("{} is used by two volumes", media.display())));
            }
            let geometry = Geometry::new(v.size.0, v.extent_size.0).map_err(|e| {
                let f = if matches!(e, GeometryError::BadExtentSize(_)) { "extent_size" } else { "size" };
                invalid(&field(f), e.to_string())
            })?;
            if v.description.len() > MAX_NAME_BYTES {
                return Err(invalid(&field("description"), "longer than 4096 bytes".into()));
            }
            let core = match &file.peer {
                None => CoreConfig { mode: Mode::Standalone, ..CoreConfig::default() },
                Some(_) => {
                    let mut core = replication_core(&file.replication);
                    // Either side may notice a lost link up to one idle timeout before the
                    // other: the secondary gives up its record's authority that much earlier.
                    core.link_loss_detection_skew = Duration::from_millis(file.link.idle_timeout_ms);
                    let detect = file.link.idle_timeout_ms + file.replication.record_update_timeout_ms;
                    if core.on_link_loss == LinkLossPolicy::Degrade && file.replication.link_loss_deadline_ms <= detect {
                        return Err(invalid(
                            "replication.link_loss_deadline_ms",
                            format!(
                                "under degrade it must exceed link.idle_timeout_ms + record_update_timeout_ms ({detect} ms): a link loss is only known after the idle timeout, and writes waiting until then would fail instead of degrading"
                            ),
                        ));
                    }
                    core
                }
            };
            core.validate().map_err(|e| invalid("replication", e.to_string()))?;
            if core.mode == Mode::Predictive {
                // Every extent written but not yet applied must stay in the record, so a
                // record smaller than the lag in extents turns streams into misses.
                let lag_extents = core.max_lag_bytes.div_ceil(geometry.extent_bytes());
                let need = lag_extents + core.predictor.max_ahead as u64;
                if core.record_capacity_extents < need {
                    return Err(invalid(
                        "replication.record_capacity_extents",
                        format!(
                            "{} extents cannot hold max_lag_bytes ({} bytes = {lag_extents} extents of volume {:?}) plus the prediction lookahead ({}): use at least {need}, or lower max_lag_bytes",
                            core.record_capacity_extents, core.max_lag_bytes, v.name, core.predictor.max_ahead
                        ),
                    ));
                }
            }
            volumes.push(VolumeConfig { name: v.name.clone(), media, geometry, description: v.description.clone(), core });
        }
        let peer = match (&file.peer, &file.tls) {
            (None, None) => {
                if file.replication != ReplicationSection::default() {
                    return Err(invalid("replication", "replication settings need a [peer]".into()));
                }
                if file.admin != AdminSection::default() {
                    return Err(invalid(
                        "admin",
                        "the admin API needs a [peer] and [tls] (it serves HTTPS with the site's certificate)".into(),
                    ));
                }
                None
            }
            (None, Some(_)) => return Err(invalid("tls", "TLS settings need a [peer] to talk to".into())),
            (Some(_), None) => return Err(invalid("tls", "a [peer] needs [tls] with ca, cert and key".into())),
            (Some(p), Some(t)) => {
                check_site_name(&p.name).map_err(|e| invalid("peer.name", e.to_string()))?;
                if p.name == file.site.name {
                    return Err(invalid("peer.name", "the peer must be another site than this one".into()));
                }
                let addr = |f: &str, v: &str| -> Result<SocketAddr, ConfigError> {
                    v.parse().map_err(|_| invalid(f, format!("{v:?} is not an address like 10.0.0.2:7401")))
                };
                let state_dir = file
                    .site
                    .state_dir
                    .as_ref()
                    .ok_or_else(|| invalid("site.state_dir", "a site with a [peer] needs a state_dir for its stores".into()))?;
                let resolve = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };
                let l = &file.link;
                if l.bandwidth_mbps == 0 || l.bandwidth_mbps > 400_000 {
                    return Err(invalid("link.bandwidth_mbps", format!("must be between 1 and 400000, got {}", l.bandwidth_mbps)));
                }
                if l.rtt_ms > 2_000 {
                    return Err(invalid("link.rtt_ms", format!("must be at most 2000, got {}", l.rtt_ms)));
                }
                if l.keep_alive_ms == 0 || l.keep_alive_ms >= l.idle_timeout_ms {
                    return Err(invalid("link.keep_alive_ms", "must be above 0 and below link.idle_timeout_ms".into()));
                }
                if !(10..=100).contains(&l.bulk_pace_percent) {
                    return Err(invalid("link.bulk_pace_percent", format!("must be between 10 and 100, got {}", l.bulk_pace_percent)));
                }
                if l.idle_timeout_ms > 600_000 {
                    return Err(invalid("link.idle_timeout_ms", format!("must be at most 600000, got {}", l.idle_timeout_ms)));
                }
                Some(PeerConfig {
                    name: p.name.clone(),
                    address: addr("peer.address", &p.address)?,
                    listen: addr("peer.listen", &p.listen)?,
                    initial_role: p.initial_role,
                    state_dir: resolve(state_dir),
                    ca: resolve(&t.ca),
                    cert: resolve(&t.cert),
                    key: resolve(&t.key),
                    tuning: LinkTuning {
                        bandwidth_bytes_per_sec: l.bandwidth_mbps * 1_000_000 / 8,
                        rtt: Duration::from_millis(l.rtt_ms),
                        keep_alive: Duration::from_millis(l.keep_alive_ms),
                        idle_timeout: Duration::from_millis(l.idle_timeout_ms),
                        bulk_bytes_per_sec: Some(l.bandwidth_mbps * 1_000_000 / 8 * l.bulk_pace_percent / 100),
                    },
                })
            }
        };
        let admin = match &peer {
            None => None,
            Some(_) => Some(AdminSettings {
                listen: file
                    .admin
                    .listen
                    .parse()
                    .map_err(|_| invalid("admin.listen", format!("{:?} is not an address like 127.0.0.1:7300", file.admin.listen)))?,
                token_file: file.admin.token_file.as_ref().map(|t| base.join(t)),
                metrics_token_file: file.admin.metrics_token_file.as_ref().map(|t| base.join(t)),
            }),
        };
        Ok(SiteConfig {
            peer,
            admin,
            allow_insecure_key_permissions: file.site.allow_insecure_key_permissions,
            name: file.site.name,
            nbd: NbdConfig {
                listen,
                max_connections: n.max_connections as usize,
                handshake_timeout: Duration::from_millis(n.handshake_timeout_ms),
                max_inflight_bytes_per_connection: inflight,
                max_inflight_bytes: site_inflight,
            },
            volumes,
        })
    }
}

fn replication_core(r: &ReplicationSection) -> CoreConfig {
    let d = CoreConfig::default();
    CoreConfig {
        mode: r.mode,
        flush_policy: r.flush_policy,
        on_link_loss: r.on_link_loss,
        record_capacity_extents: r.record_capacity_extents,
        record_update_timeout: Duration::from_millis(r.record_update_timeout_ms),
        link_loss_deadline: Duration::from_millis(r.link_loss_deadline_ms),
        max_lag_bytes: r.max_lag_bytes.0,
        on_lag_full: r.on_lag_full,
        max_inflight_bytes: r.max_inflight_bytes.0,
        reorder_buffer_bytes: d.reorder_buffer_bytes.max(r.max_inflight_bytes.0 + geomirror_core::frame::MAX_FRAME_BYTES as u64),
        data_lanes: r.data_lanes,
        clean_generation_max_age: (r.clean_generation_max_age_ms > 0).then(|| Duration::from_millis(r.clean_generation_max_age_ms)),
        verify_failback: r.verify_failback,
        rebuild_auto: r.rebuild == RebuildPolicy::Auto,
        ..d
    }
}

/// A deserialization error, with the field it happened in (`volume[0].size`) and its line
/// where serde knows them; TOML syntax errors keep toml's own report, which shows the line.
fn parse_error(path: &Path, text: &str, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let field = e.path().to_string();
    let inner = e.into_inner();
    if field == "." {
        return ConfigError::Parse { path: path.to_owned(), message: inner.to_string() };
    }
    let message = match inner.span() {
        Some(span) => {
            let line = 1 + text.as_bytes()[..span.start.min(text.len())].iter().filter(|b| **b == b'\n').count();
            format!("{} (line {line})", inner.message())
        }
        None => inner.message().to_owned(),
    };
    ConfigError::Invalid { path: path.to_owned(), field, message }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
