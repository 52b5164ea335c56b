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

use super::Store;
use geomirror_core::store::keys;
use geomirror_core::{Epoch, ExtentId, Generation, Meta, Role, Seq, SiteState, StoreWrite};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;

const CF_RECORD: &str = "record";
const CF_GENERATIONS: &str = "generations";
const CF_DIRTY: &str = "dirty";
const CF_META: &str = "meta";
const GENERATION_FAMILY: u8 = b'g';

type KeyValue = (Box<[u8]>, Box<[u8]>);

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open { path: PathBuf, source: rocksdb::Error },
    #[error("the store at {path} has schema version {found}; this build reads version {expected}. Use the geomirror release that wrote it, or move the store away to start afresh")]
    Schema { path: PathBuf, found: u8, expected: u8 },
    #[error("the store at {path} is damaged: {what}. Move it away and let the peer rebuild this site")]
    Corrupt { path: PathBuf, what: String },
    #[error("cannot read the store at {path}")]
    Read { path: PathBuf, source: rocksdb::Error },
    #[error("cannot write the store at {path}")]
    Write { path: PathBuf, source: rocksdb::Error },
}

pub struct RocksStore {
    db: DB,
    path: PathBuf,
    /// The durable state, as of the last successful write.
    state: SiteState,
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
    };
    (keys::meta_key(name), value)
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
    ]
    .into_iter()
    .map(StoreWrite::Meta)
    .collect()
}

impl RocksStore {
    /// Opens the store at `path`, creating it for a site of role `fresh_role` if it does not
    /// exist. Refuses another schema version, and a store whose record and generation log
    /// disagree.
    pub fn open(path: &Path, fresh_role: Role) -> Result<RocksStore, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [CF_RECORD, CF_GENERATIONS, CF_DIRTY, CF_META].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        let mut store = RocksStore { db, path: path.to_owned(), state: SiteState::fresh(fresh_role) };
        let schema = store.get(CF_META, &keys::meta_key("schema"))?;
        match schema.as_deref() {
            Some([v]) if *v == keys::SCHEMA_VERSION => store.state = store.read_state()?,
            Some([v]) => return Err(StoreError::Schema { path: path.to_owned(), found: *v, expected: keys::SCHEMA_VERSION }),
            Some(_) => return Err(store.corrupt("the schema marker is malformed")),
            None => {
                if store.db.iterator_cf(store.cf(CF_RECORD), IteratorMode::Start).next().is_some() {
                    return Err(store.corrupt("records exist but no schema marker"));
                }
                // A new store: the schema marker and the fresh state in one synced batch.
                let mut batch = WriteBatch::default();
                batch.put_cf(store.cf(CF_META), keys::meta_key("schema"), [keys::SCHEMA_VERSION]);
                store.encode(&mut batch, &all_meta(&store.state));
                store.commit(batch).map_err(|source| StoreError::Write { path: path.to_owned(), source })?;
            }
        }
        Ok(store)
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
