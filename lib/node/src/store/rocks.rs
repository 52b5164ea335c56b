//! The RocksDB store: what a site must remember across restarts.
//!
//! Owns: the on-disk layout (column families `record`, `generations`, `dirty`, `meta`; keys
//! from `geomirror_core::store::keys`, versioned and big-endian), the schema check at open,
//! and synced write batches: `write` returns only after RocksDB has synced the batch.
//!
//! Must not: interpret the state. `SiteState::apply` gives a batch its meaning; this file
//! only encodes the same writes so that a reopen yields what `apply` would.
//!
//! The generation log (`generations`: generation, extent) is the record indexed by age, the
//! order eviction walks. It is written in the same batch as the record and checked against
//! the record at every open, so a damaged store is refused instead of trusted.
//!
//! Never trusting a store that lost state. A store that forgot what it acknowledged, and is
//! trusted as it is, makes two sites that differ while both report clean: the worst outcome
//! this product has. So:
//! - RocksDB recovers its write-ahead log in absolute-consistency mode: any corruption in
//!   the log refuses the open, never a silent truncation to the last good record (RocksDB's
//!   default, point-in-time recovery, rolls the state back without a word). Paranoid checks
//!   are on, and every table file the MANIFEST names must be there, at its size.
//! - Checkpoints. The memtables are flushed into table files at creation, every
//!   `CHECKPOINT_INTERVAL` and at a clean stop, so the state does not live only in a log.
//!   After each flush a checkpoint number is written into the store (into the new log) and
//!   then into the identity file beside it (`identity_file.rs`). At open, the store's
//!   identity must be the file's and its checkpoint at least the file's: a store whose
//!   newest log was deleted or lost comes back with an older checkpoint, and is refused.
//! - What no check at open can see (a whole state directory restored from an older backup,
//!   a disk that acknowledged a sync it never made) the peer sees: the store's identity and
//!   positions are compared at every handshake with what it acknowledged (see the core's
//!   `identity.rs` files).

use super::identity_file::{self, Identity};
use super::Store;
use geomirror_core::store::keys;
use geomirror_core::{Epoch, ExtentId, Generation, Meta, PeerMemory, Role, Seq, SiteState, StoreId, StoreWrite};
use rocksdb::{ColumnFamilyDescriptor, DBRecoveryMode, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// How often the store thread flushes the memtables and records a checkpoint. Bounds how
/// much state lives only in a log between checkpoints; each costs a table-file write and
/// two fsyncs, nothing on the write path.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

const CF_RECORD: &str = "record";
const CF_GENERATIONS: &str = "generations";
const CF_DIRTY: &str = "dirty";
const CF_META: &str = "meta";
const CF_ALL: [&str; 4] = [CF_RECORD, CF_GENERATIONS, CF_DIRTY, CF_META];
const GENERATION_FAMILY: u8 = b'g';

type KeyValue = (Box<[u8]>, Box<[u8]>);

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open { path: PathBuf, source: rocksdb::Error },
    #[error("the store at {path} has schema version {found}; this build reads version {expected}. Use the geomirror release that wrote it, or move the store away to start afresh")]
    Schema { path: PathBuf, found: u8, expected: u8 },
    #[error("the store at {path} is damaged: {what}. It is not opened, so that nothing it forgot is trusted. Move it away (mv {path} {path}.damaged) and start the site: it comes back as an amnesiac, and its peer rebuilds it with a full verified resync (docs/operations.md, \"Amnesia\")", path = path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("the store at {path} lost state it had made durable: {what}. It is not opened, so that nothing it forgot is trusted. Move it away (mv {path} {path}.lost) and start the site: it comes back as an amnesiac, and its peer rebuilds it with a full verified resync (docs/operations.md, \"Amnesia\")", path = path.display())]
    Lost { path: PathBuf, what: String },
    #[error("cannot read the store at {path}")]
    Read { path: PathBuf, source: rocksdb::Error },
    #[error("cannot write the store at {path}")]
    Write { path: PathBuf, source: rocksdb::Error },
    #[error("cannot write the store at {path}")]
    Io { path: PathBuf, source: io::Error },
}

/// RocksDB's refusal to open, with what it means when it found corruption.
fn open_error(path: &Path, source: rocksdb::Error) -> StoreError {
    let text = source.to_string();
    if text.contains("Corruption") || text.contains("No such file") || text.contains("file size mismatch") {
        StoreError::Corrupt { path: path.to_owned(), what: format!("RocksDB refuses to recover it: {text}") }
    } else {
        StoreError::Open { path: path.to_owned(), source }
    }
}

pub struct RocksStore {
    db: DB,
    path: PathBuf,
    /// The durable state, as of the last successful write.
    state: SiteState,
    /// The last checkpoint recorded in the store and the identity file.
    checkpoint: u64,
    /// This open created the store.
    created: bool,
}

fn generation_key(g: Generation, e: ExtentId) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[0] = keys::SCHEMA_VERSION;
    k[1] = GENERATION_FAMILY;
    k[2..10].copy_from_slice(&g.0.to_be_bytes());
    k[10..].copy_from_slice(&e.0.to_be_bytes());
    k
}

fn parse_generation_key(k: &[u8]) -> Option<(Generation, ExtentId)> {
    if k.len() != 18 || k[0] != keys::SCHEMA_VERSION || k[1] != GENERATION_FAMILY {
        return None;
    }
    Some((Generation(u64::from_be_bytes(k[2..10].try_into().ok()?)), ExtentId(u64::from_be_bytes(k[10..].try_into().ok()?))))
}

/// The meta key and value of one `Meta` write.
fn encode_meta(m: Meta) -> (Vec<u8>, Vec<u8>) {
    let (name, value): (&str, Vec<u8>) = match m {
        Meta::Epoch(v) => ("epoch", v.0.to_be_bytes().to_vec()),
        Meta::Role(r) => ("role", vec![role_byte(r)]),
        Meta::Applied(v) => ("applied", v.0.to_be_bytes().to_vec()),
        Meta::ApplyHighWater(v) => ("apply_high_water", v.0.to_be_bytes().to_vec()),
        Meta::NextGeneration(v) => ("next_generation", v.0.to_be_bytes().to_vec()),
        Meta::Consistent(b) => ("consistent", vec![b as u8]),
        Meta::Authoritative(b) => ("authoritative", vec![b as u8]),
        Meta::WroteAlone(b) => ("wrote_alone", vec![b as u8]),
        Meta::PeerMayDegrade(b) => ("peer_may_degrade", vec![b as u8]),
        Meta::FailbackPending(b) => ("failback_pending", vec![b as u8]),
        Meta::SaveAsideOnResync(b) => ("save_aside_on_resync", vec![b as u8]),
        Meta::Incarnation(v) => ("incarnation", v.to_be_bytes().to_vec()),
        Meta::StoreId(v) => ("store_id", v.0.to_be_bytes().to_vec()),
        Meta::Peer(p) => ("peer", encode_peer(p)),
        Meta::Amnesiac(b) => ("amnesiac", vec![b as u8]),
        Meta::FullResyncOwed(b) => ("full_resync_owed", vec![b as u8]),
        Meta::RebuildPending(b) => ("rebuild_pending", vec![b as u8]),
        Meta::PromotedFrom(p) => ("promoted_from", [p.applied.0.to_be_bytes(), p.next_generation.0.to_be_bytes()].concat()),
        // Empty when there is none; else the primary's store (16 bytes), epoch and next (8 each).
        Meta::SyncCursor(c) => (
            "sync_cursor",
            c.map_or(Vec::new(), |c| {
                [c.primary.0.to_be_bytes().to_vec(), c.epoch.0.to_be_bytes().to_vec(), c.next.to_be_bytes().to_vec()].concat()
            }),
        ),
    };
    (keys::meta_key(name), value)
}

/// A peer memory: a presence byte, the peer's store identity (16 bytes, zero when absent),
/// then applied and generation (8 bytes each), big-endian.
fn encode_peer(p: PeerMemory) -> Vec<u8> {
    let mut v = Vec::with_capacity(33);
    v.push(p.store.is_some() as u8);
    v.extend_from_slice(&p.store.map_or(0, |s| s.0).to_be_bytes());
    v.extend_from_slice(&p.applied.0.to_be_bytes());
    v.extend_from_slice(&p.generation.0.to_be_bytes());
    v
}

fn decode_peer(v: &[u8]) -> Option<PeerMemory> {
    if v.len() != 33 || v[0] > 1 {
        return None;
    }
    let store = StoreId(u128::from_be_bytes(v[1..17].try_into().ok()?));
    Some(PeerMemory {
        store: (v[0] == 1).then_some(store),
        applied: Seq(u64::from_be_bytes(v[17..25].try_into().ok()?)),
        generation: Generation(u64::from_be_bytes(v[25..33].try_into().ok()?)),
    })
}

fn role_byte(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}

/// Every meta value of a state, written when a store is created.
fn all_meta(s: &SiteState) -> Vec<StoreWrite> {
    [
        Meta::Epoch(s.epoch),
        Meta::Role(s.role),
        Meta::Applied(s.applied),
        Meta::ApplyHighWater(s.apply_high_water),
        Meta::NextGeneration(s.next_generation),
        Meta::Consistent(s.consistent),
        Meta::Authoritative(s.authoritative),
        Meta::WroteAlone(s.wrote_alone),
        Meta::PeerMayDegrade(s.peer_may_degrade),
        Meta::FailbackPending(s.failback_pending),
        Meta::SaveAsideOnResync(s.save_aside_on_resync),
        Meta::Incarnation(s.incarnation),
        Meta::StoreId(s.store_id),
        Meta::Peer(s.peer),
        Meta::Amnesiac(s.amnesiac),
        Meta::FullResyncOwed(s.full_resync_owed),
        Meta::RebuildPending(s.rebuild_pending),
    ]
    .into_iter()
    .chain(s.promoted_from.map(Meta::PromotedFrom))
    .chain(s.sync_cursor.map(|c| Meta::SyncCursor(Some(c))))
    .map(StoreWrite::Meta)
    .collect()
}

/// What `examine` found in a store directory that passed its checks.
enum Found {
    /// A store of this schema whose identity file vouches for it.
    Store,
    /// A store made before store identities (no identity in it, no identity file).
    WithoutIdentity,
    /// No store: a new one is made.
    Nothing,
}

impl RocksStore {
    /// Opens the store at `path`, or creates it with the state `create` gives (drawn only
    /// when the store does not exist yet: its identity is new). Refuses another schema
    /// version, a store whose record and generation log disagree, a corrupt log, a missing
    /// table file, and a store that lost state it had made durable (see "Checkpoints").
    pub fn open(path: &Path, create: impl FnOnce() -> io::Result<SiteState>) -> Result<RocksStore, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_wal_recovery_mode(DBRecoveryMode::AbsoluteConsistency);
        opts.set_skip_checking_sst_file_sizes_on_db_open(false);
        let file = identity_file::read(path).map_err(|e| StoreError::Corrupt { path: path.to_owned(), what: e.to_string() })?;
        // An existing store is examined read-only first. Opening for writing rewrites the
        // MANIFEST and starts a new log even when the checks that follow refuse the store;
        // a refused store must stay exactly as it was found, for forensics and for the
        // operator's `mv` (and a supervisor restarting the site must not churn it).
        let existing = DB::list_cf(&opts, path).ok();
        if existing.as_ref().is_some_and(|cfs| CF_ALL.iter().all(|n| cfs.iter().any(|c| c == n))) {
            let db = DB::open_cf_for_read_only(&opts, path, CF_ALL, false).map_err(|source| open_error(path, source))?;
            let mut probe = RocksStore::over(db, path);
            probe.examine(file)?;
        }
        let cfs = CF_ALL.map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| open_error(path, source))?;
        let mut store = RocksStore::over(db, path);
        match store.examine(file)? {
            Found::Store => {}
            Found::WithoutIdentity => {
                // A store made before identities: it gets one now. Its peer has no memory of
                // it either, so the next handshake pairs them afresh.
                let id = super::new_store_id().map_err(|e| store.write_error(e))?;
                tracing::warn!(path = %path.display(), store = %id, "a store without an identity (made by an older geomirror) gets one");
                store.write(&[StoreWrite::Meta(Meta::StoreId(id))]).map_err(|e| store.write_error(e))?;
            }
            Found::Nothing => {
                // A new store: the schema marker and the fresh state in one synced batch.
                store.state = create().map_err(|e| store.write_error(e))?;
                store.created = true;
                let mut batch = WriteBatch::default();
                batch.put_cf(store.cf(CF_META), keys::meta_key("schema"), [keys::SCHEMA_VERSION]);
                store.encode(&mut batch, &all_meta(&store.state));
                store.commit(batch).map_err(|source| StoreError::Write { path: path.to_owned(), source })?;
            }
        }
        // Every open starts from a checkpoint: what the last run left in a log is in table
        // files now, and the identity file moves on.
        store.checkpoint().map_err(|e| store.write_error(e))?;
        Ok(store)
    }

    fn over(db: DB, path: &Path) -> RocksStore {
        RocksStore { db, path: path.to_owned(), state: SiteState::fresh(Role::Secondary, StoreId(0)), checkpoint: 0, created: false }
    }

    /// Reads the store's state and checks it against its identity file, writing nothing:
    /// what is there, or why it is refused.
    fn examine(&mut self, file: Option<Identity>) -> Result<Found, StoreError> {
        let schema = self.get(CF_META, &keys::meta_key("schema"))?;
        match schema.as_deref() {
            Some([v]) if *v == keys::SCHEMA_VERSION => {
                self.state = self.read_state()?;
                self.checkpoint = self.read_checkpoint()?;
                self.check_identity(file)
            }
            Some([v]) => Err(StoreError::Schema { path: self.path.clone(), found: *v, expected: keys::SCHEMA_VERSION }),
            Some(_) => Err(self.corrupt("the schema marker is malformed")),
            None => {
                if let Some(f) = file {
                    // The identity file says a store was made here; RocksDB holds none of it.
                    return Err(self.lost(format!(
                        "its identity file ({}) names store {}, and the database holds nothing of it: its logs or table files are gone",
                        identity_file::FILE_NAME,
                        f.store
                    )));
                }
                if self.db.iterator_cf(self.cf(CF_RECORD), IteratorMode::Start).next().is_some() {
                    return Err(self.corrupt("records exist but no schema marker"));
                }
                Ok(Found::Nothing)
            }
        }
    }

    /// Whether this open created the store (it did not exist).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The store's own record of its identity and checkpoint against the identity file's.
    fn check_identity(&self, file: Option<Identity>) -> Result<Found, StoreError> {
        let id_in_store = self.get(CF_META, &keys::meta_key("store_id"))?.is_some();
        match file {
            None if !id_in_store => Ok(Found::WithoutIdentity),
            None => Err(self.corrupt(format!(
                "its identity file {} is missing, so nothing vouches that its newest log is all there",
                identity_file::FILE_NAME
            ))),
            Some(f) if f.store != self.state.store_id => Err(self.corrupt(format!(
                "it is store {} and its identity file names store {}: the directory mixes two stores",
                self.state.store_id, f.store
            ))),
            Some(f) if self.checkpoint < f.checkpoint => Err(self.lost(format!(
                "it holds checkpoint {} and its identity file says it reached checkpoint {}: a write-ahead log is missing or was cut short",
                self.checkpoint, f.checkpoint
            ))),
            Some(_) => Ok(Found::Store),
        }
    }

    fn read_checkpoint(&self) -> Result<u64, StoreError> {
        match self.get(CF_META, &keys::meta_key("checkpoint"))? {
            None => Ok(0),
            Some(v) => Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(|_| self.corrupt("the checkpoint is not 8 bytes"))?)),
        }
    }

    fn lost(&self, what: impl Into<String>) -> StoreError {
        StoreError::Lost { path: self.path.clone(), what: what.into() }
    }

    fn write_error(&self, e: io::Error) -> StoreError {
        StoreError::Io { path: self.path.clone(), source: e }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(cf), key).map_err(|source| StoreError::Read { path: self.path.clone(), source })
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt { path: self.path.clone(), what: what.into() }
    }

    fn scan(&self, cf: &str) -> Result<Vec<KeyValue>, StoreError> {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::Start)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| StoreError::Read { path: self.path.clone(), source })
    }

    fn read_state(&self) -> Result<SiteState, StoreError> {
        let mut s = self.state.clone();
        let u64_of = |name: &str, v: &[u8]| -> Result<u64, StoreError> {
            Ok(u64::from_be_bytes(v.try_into().map_err(|_| self.corrupt(format!("{name} is not 8 bytes")))?))
        };
        let bool_of = |name: &str, v: &[u8]| -> Result<bool, StoreError> {
            match v {
                [0] => Ok(false),
                [1] => Ok(true),
                _ => Err(self.corrupt(format!("meta {name} is not a boolean"))),
            }
        };
        for (k, v) in self.scan(CF_META)? {
            if k.len() < 2 || k[0] != keys::SCHEMA_VERSION || k[1] != keys::META {
                return Err(self.corrupt("a meta key of another layout"));
            }
            let name = std::str::from_utf8(&k[2..]).unwrap_or("?");
            match name {
                "schema" => {}
                "epoch" => s.epoch = Epoch(u64_of(name, &v)?),
                "role" => {
                    s.role = match &*v {
                        [1] => Role::Primary,
                        [2] => Role::Secondary,
                        _ => return Err(self.corrupt("meta role is unknown")),
                    }
                }
                "applied" => s.applied = Seq(u64_of(name, &v)?),
                "apply_high_water" => s.apply_high_water = Seq(u64_of(name, &v)?),
                "next_generation" => s.next_generation = Generation(u64_of(name, &v)?),
                "consistent" => s.consistent = bool_of(name, &v)?,
                "authoritative" => s.authoritative = bool_of(name, &v)?,
                "wrote_alone" => s.wrote_alone = bool_of(name, &v)?,
                "peer_may_degrade" => s.peer_may_degrade = bool_of(name, &v)?,
                // Absent in stores made before it existed: false.
                "failback_pending" => s.failback_pending = bool_of(name, &v)?,
                "save_aside_on_resync" => s.save_aside_on_resync = bool_of(name, &v)?,
                "incarnation" => s.incarnation = u64_of(name, &v)?,
                "store_id" => {
                    s.store_id = StoreId(u128::from_be_bytes(v.as_ref().try_into().map_err(|_| self.corrupt("store_id is not 16 bytes"))?))
                }
                "peer" => s.peer = decode_peer(&v).ok_or_else(|| self.corrupt("meta peer is malformed"))?,
                "amnesiac" => s.amnesiac = bool_of(name, &v)?,
                "full_resync_owed" => s.full_resync_owed = bool_of(name, &v)?,
                "rebuild_pending" => s.rebuild_pending = bool_of(name, &v)?,
                "promoted_from" => {
                    let (a, g) =
                        v.split_at_checked(8).filter(|(_, g)| g.len() == 8).ok_or_else(|| self.corrupt("promoted_from is not 16 bytes"))?;
                    s.promoted_from = Some(geomirror_core::frame::Position {
                        applied: Seq(u64_of(name, a)?),
                        next_generation: Generation(u64_of(name, g)?),
                    });
                }
                // Absent in stores made before it existed: none.
                "sync_cursor" => {
                    s.sync_cursor = match v.len() {
                        0 => None,
                        32 => Some(geomirror_core::SyncCursor {
                            primary: StoreId(u128::from_be_bytes(v[..16].try_into().expect("16 bytes"))),
                            epoch: geomirror_core::Epoch(u64_of(name, &v[16..24])?),
                            next: u64_of(name, &v[24..])?,
                        }),
                        _ => return Err(self.corrupt("sync_cursor is neither empty nor 32 bytes")),
                    }
                }
                "checkpoint" => {}
                other => return Err(self.corrupt(format!("unknown meta key {other:?}"))),
            }
        }
        s.record = BTreeMap::new();
        for (k, v) in self.scan(CF_RECORD)? {
            let e = keys::parse_extent_key(keys::RECORD, &k).ok_or_else(|| self.corrupt("a record key of another layout"))?;
            s.record.insert(e, Generation(u64_of("a record generation", &v)?));
        }
        let mut log = BTreeMap::new();
        for (k, _) in self.scan(CF_GENERATIONS)? {
            let (g, e) = parse_generation_key(&k).ok_or_else(|| self.corrupt("a generation key of another layout"))?;
            if log.insert(e, g).is_some() {
                return Err(self.corrupt(format!("extent {} is in two generations", e.0)));
            }
        }
        if log != s.record {
            return Err(self.corrupt("the generation log and the record disagree"));
        }
        s.dirty = self
            .scan(CF_DIRTY)?
            .into_iter()
            .map(|(k, _)| keys::parse_extent_key(keys::DIRTY, &k).ok_or_else(|| self.corrupt("a dirty key of another layout")))
            .collect::<Result<_, _>>()?;
        Ok(s)
    }

    /// Encodes writes in order. `changed` tracks each record entry as the batch changes it,
    /// so that the generation log loses exactly the entries the record loses.
    fn encode(&self, batch: &mut WriteBatch, writes: &[StoreWrite]) {
        let mut changed: BTreeMap<ExtentId, Option<Generation>> = BTreeMap::new();
        let mut cleared = false;
        let generation_of = |changed: &BTreeMap<ExtentId, Option<Generation>>, cleared: bool, e: ExtentId| match changed.get(&e) {
            Some(g) => *g,
            None if cleared => None,
            None => self.state.record.get(&e).copied(),
        };
        for w in writes {
            match *w {
                StoreWrite::PutRecord(e, g) => {
                    if let Some(old) = generation_of(&changed, cleared, e) {
                        batch.delete_cf(self.cf(CF_GENERATIONS), generation_key(old, e));
                    }
                    batch.put_cf(self.cf(CF_RECORD), keys::extent_key(keys::RECORD, e), g.0.to_be_bytes());
                    batch.put_cf(self.cf(CF_GENERATIONS), generation_key(g, e), []);
                    changed.insert(e, Some(g));
                }
                StoreWrite::DelRecord(e) => {
                    if let Some(old) = generation_of(&changed, cleared, e) {
                        batch.delete_cf(self.cf(CF_GENERATIONS), generation_key(old, e));
                    }
                    batch.delete_cf(self.cf(CF_RECORD), keys::extent_key(keys::RECORD, e));
                    changed.insert(e, None);
                }
                StoreWrite::ClearRecord => {
                    let mut live: BTreeMap<ExtentId, Generation> = if cleared { BTreeMap::new() } else { self.state.record.clone() };
                    for (e, g) in &changed {
                        match g {
                            Some(g) => live.insert(*e, *g),
                            None => live.remove(e),
                        };
                    }
                    for (e, g) in live {
                        batch.delete_cf(self.cf(CF_RECORD), keys::extent_key(keys::RECORD, e));
                        batch.delete_cf(self.cf(CF_GENERATIONS), generation_key(g, e));
                    }
                    changed.clear();
                    cleared = true;
                }
                StoreWrite::PutDirty(e) => batch.put_cf(self.cf(CF_DIRTY), keys::extent_key(keys::DIRTY, e), []),
                StoreWrite::DelDirty(e) => batch.delete_cf(self.cf(CF_DIRTY), keys::extent_key(keys::DIRTY, e)),
                StoreWrite::Meta(m) => {
                    let (k, v) = encode_meta(m);
                    batch.put_cf(self.cf(CF_META), k, v);
                }
            }
        }
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)
    }
}

impl Store for RocksStore {
    fn load(&self) -> SiteState {
        self.state.clone()
    }

    /// Checkpoints: flush every column family's memtable into table files (the logs that
    /// held them become obsolete), write the next checkpoint number into the store (so into
    /// the newest log) with a synced write, then into the identity file. A later loss of
    /// that newest log takes the number with it, and the open that follows sees a store
    /// behind its identity file. A crash between the two writes leaves the store one ahead
    /// of the file, which is accepted.
    fn checkpoint(&mut self) -> io::Result<()> {
        for name in CF_ALL {
            self.db.flush_cf(self.cf(name)).map_err(io::Error::other)?;
        }
        let next = self.checkpoint + 1;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), keys::meta_key("checkpoint"), next.to_be_bytes());
        self.commit(batch).map_err(io::Error::other)?;
        self.checkpoint = next;
        identity_file::write(&self.path, Identity { store: self.state.store_id, checkpoint: next })
    }

    fn write(&mut self, writes: &[StoreWrite]) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        self.encode(&mut batch, writes);
        self.commit(batch).map_err(io::Error::other)?;
        self.state.apply(writes);
        Ok(())
    }

    /// One RocksDB write batch and one sync for all: each batch is encoded against the state
    /// the ones before it leave, and the whole is atomic, which keeps each one atomic.
    fn write_group(&mut self, batches: &[Vec<StoreWrite>]) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        for writes in batches {
            self.encode(&mut batch, writes);
            self.state.apply(writes);
        }
        // On an error the in-memory state is ahead of the disk; the caller fails the volume
        // and never uses this store again (see `Store::write_group`).
        self.commit(batch).map_err(io::Error::other)
    }
}
