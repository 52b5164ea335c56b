//! What a site persists, and an in-memory store that can lose unsynced writes.
//!
//! Owns: `StoreWrite`, the vocabulary of durable changes the state machines ask for; the
//! `SiteState` a site restarts from; the on-disk key layout (versioned, big-endian so that
//! scans come out in extent order); and `MemStore`, the store the simulation uses.
//! Must not: touch a disk. The RocksDB store in the node shell encodes the same writes with
//! `keys` and must pass the same tests.

use crate::frame::Role;
use crate::ids::{Epoch, ExtentId, Generation, Seq, StoreId};
use std::collections::{BTreeMap, BTreeSet};

/// One durable change. A batch of these is written atomically and synced before the core
/// is told it is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreWrite {
    /// Secondary: the extent is in the record, in this generation.
    PutRecord(ExtentId, Generation),
    DelRecord(ExtentId),
    /// Secondary: remove every record entry (a site that becomes primary keeps its record as
    /// the start of the failback set, so this is used only when an image is rebuilt).
    ClearRecord,
    /// Primary: the extent may differ from the peer and the peer's record may not know it
    /// (degrade mode, async and sync modes, and a promoted site's failback set).
    PutDirty(ExtentId),
    DelDirty(ExtentId),
    Meta(Meta),
}

/// Single-valued metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meta {
    Epoch(Epoch),
    Role(Role),
    /// Secondary: highest sequence durably applied to media.
    Applied(Seq),
    /// Secondary: highest sequence that may have reached media (written ahead of the media
    /// writes). After a crash, media may hold writes up to here that `Applied` does not
    /// cover; the image is a prefix again only once re-applied through it.
    ApplyHighWater(Seq),
    /// Secondary: next generation number to hand out.
    NextGeneration(Generation),
    /// Secondary: the image is a prefix of the primary's history (false during resync).
    Consistent(bool),
    /// Secondary: the record covers every difference (false after a degrade, until resync).
    Authoritative(bool),
    /// Either: this site accepted host writes that its peer may not have seen in any record:
    /// evidence for split-brain detection when it meets a site of a newer epoch.
    WroteAlone(bool),
    /// Secondary: its primary's link-loss policy is `degrade`, so a lost link may mean
    /// writes outside the record.
    PeerMayDegrade(bool),
    /// Primary: promoted, and the failback onto the old primary has not completed. While
    /// the link is down such a primary writes alone, tracking every miss in its dirty map
    /// (the failback set), whatever `on_link_loss` says: no secondary holds a record that
    /// could be relied on, so there is nothing for `block` to protect.
    FailbackPending(bool),
    /// Secondary: fenced before it could name the extents where it may differ from the new
    /// primary (a primary restarted and superseded before it learned its record), so the
    /// next resync saves aside everything it overwrites.
    SaveAsideOnResync(bool),
    /// Primary: bumped at every start, so sequence numbers of a new incarnation
    /// (`incarnation << 40` onwards) never collide with those of an earlier one.
    Incarnation(u64),
    /// Either: this store's identity, drawn when it was created. Written once.
    StoreId(StoreId),
    /// Either: what this site remembers of its peer's store (see `PeerMemory`).
    Peer(PeerMemory),
    /// Secondary: this store lost state it had acknowledged (or was created over media that
    /// already held data): its record, position and flags are not trusted. Promotion needs
    /// `force`; only the end of a full verified resync clears it.
    Amnesiac(bool),
    /// Primary: the peer's store is an amnesiac (or this site's own was), so the peer needs
    /// a full verified resync of the whole volume before its record is trusted again.
    FullResyncOwed(bool),
    /// Primary: the full resync owed is onto a store that replaced the one this site paired
    /// with (a rebuilt site), and waits for an operator's approval (`approve_rebuild`) unless
    /// the config allows it (`CoreConfig::rebuild_auto`).
    RebuildPending(bool),
    /// Primary: where this store stood when it was promoted (see `Frame::Hello`).
    PromotedFrom(crate::frame::Position),
    /// Secondary (an amnesiac): how far the full verified resync of the named primary, in the
    /// named epoch, has durably synced this image (`Apply::SyncMark`); None when no sweep has
    /// marked one, or a new sweep from the first extent began.
    SyncCursor(Option<SyncCursor>),
}

/// A full verified resync's durable position on the receiving store: every extent below
/// `next` equals the image of primary store `primary` as of a point the store has durably
/// applied, and every later write of that primary in `epoch` reaches it in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncCursor {
    pub primary: StoreId,
    pub epoch: Epoch,
    pub next: u64,
}

/// What a site remembers of its peer's store: DRBD's generation identifiers, reduced to
/// what geomirror needs. At every handshake a peer whose store presents another identity,
/// or less than it acknowledged, is an amnesiac: never trusted as it is.
///
/// The positions are a lower bound of what the peer acknowledged: kept exactly in memory,
/// persisted at most every `CoreConfig::peer_memory_persist_interval`, except that no write
/// reaches the primary's media resting on a generation the persisted memory lacks (see
/// `Primary::remembered_durably`). A lower bound only makes the check less sensitive, never
/// wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerMemory {
    /// The peer's store identity; None until the first handshake of a new pair.
    pub store: Option<StoreId>,
    /// Primary: the highest sequence the peer acknowledged as durably applied (`Applied`),
    /// in this site's present role. Reset when the role changes.
    pub applied: Seq,
    /// Primary: the highest generation the peer answered a record update with.
    pub generation: Generation,
}

impl PeerMemory {
    /// The memory kept across a role change: the peer's identity only, since positions are
    /// counted in the sequence space of the role that ends.
    pub fn across_role_change(self) -> PeerMemory {
        PeerMemory { store: self.store, applied: Seq(0), generation: Generation(0) }
    }
}

/// Everything a site reloads at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteState {
    pub epoch: Epoch,
    pub role: Role,
    pub applied: Seq,
    pub apply_high_water: Seq,
    pub next_generation: Generation,
    pub consistent: bool,
    pub authoritative: bool,
    pub wrote_alone: bool,
    pub incarnation: u64,
    pub peer_may_degrade: bool,
    pub failback_pending: bool,
    pub save_aside_on_resync: bool,
    pub store_id: StoreId,
    pub peer: PeerMemory,
    pub amnesiac: bool,
    pub full_resync_owed: bool,
    pub rebuild_pending: bool,
    pub promoted_from: Option<crate::frame::Position>,
    pub sync_cursor: Option<SyncCursor>,
    pub record: BTreeMap<ExtentId, Generation>,
    pub dirty: BTreeSet<ExtentId>,
}

impl SiteState {
    /// A site that has never run: epoch 1, empty record, consistent (both images start equal,
    /// which the operator guarantees by starting from identical or zeroed volumes), and not
    /// authoritative: only a primary in predictive mode can vouch that the record covers
    /// everything it writes, and it says so with `Frame::Authoritative` once connected.
    pub fn fresh(role: Role, store_id: StoreId) -> SiteState {
        SiteState {
            epoch: Epoch(1),
            role,
            applied: Seq(0),
            apply_high_water: Seq(0),
            next_generation: Generation(1),
            consistent: true,
            authoritative: false,
            wrote_alone: false,
            incarnation: 0,
            peer_may_degrade: false,
            failback_pending: false,
            save_aside_on_resync: false,
            store_id,
            peer: PeerMemory::default(),
            amnesiac: false,
            full_resync_owed: false,
            rebuild_pending: false,
            promoted_from: None,
            sync_cursor: None,
            record: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// A store created over media that already holds data: the state that described the
    /// media is gone (a lost or emptied state directory), so nothing about the media can be
    /// trusted. The site starts as a secondary, whatever its configured role, since a site
    /// without state cannot know whether its media is older or newer than its peer's: an
    /// amnesiac, inconsistent and not authoritative, until a full verified resync from a
    /// primary ends, or an operator promotes it with `force`.
    pub fn amnesiac(store_id: StoreId) -> SiteState {
        SiteState { consistent: false, amnesiac: true, ..SiteState::fresh(Role::Secondary, store_id) }
    }

    /// A store an operator created over media that already holds the volume's data, to put
    /// that data under protection (`geomirror adopt`): a primary that owes its peer, whoever
    /// it turns out to be, a full verified resync. Nothing on the peer's media is trusted:
    /// the peer marks itself an amnesiac at the first hello, every extent is compared by
    /// digest and the differing blocks copied, and only the durable end of that sync makes
    /// the peer consistent and its record authoritative. Epoch 1, as a new pair, so that an
    /// adoption never outranks a live primary: one of epoch 1 refuses it (two primaries in
    /// one epoch), and one of a newer epoch fences it.
    pub fn adopted(store_id: StoreId) -> SiteState {
        SiteState { full_resync_owed: true, ..SiteState::fresh(Role::Primary, store_id) }
    }

    /// Applies one batch of writes, in order.
    pub fn apply(&mut self, batch: &[StoreWrite]) {
        for w in batch {
            match *w {
                StoreWrite::PutRecord(e, g) => {
                    self.record.insert(e, g);
                }
                StoreWrite::DelRecord(e) => {
                    self.record.remove(&e);
                }
                StoreWrite::ClearRecord => self.record.clear(),
                StoreWrite::PutDirty(e) => {
                    self.dirty.insert(e);
                }
                StoreWrite::DelDirty(e) => {
                    self.dirty.remove(&e);
                }
                StoreWrite::Meta(m) => match m {
                    Meta::Epoch(v) => self.epoch = v,
                    Meta::Role(v) => self.role = v,
                    Meta::Applied(v) => self.applied = v,
                    Meta::ApplyHighWater(v) => self.apply_high_water = v,
                    Meta::NextGeneration(v) => self.next_generation = v,
                    Meta::Consistent(v) => self.consistent = v,
                    Meta::Authoritative(v) => self.authoritative = v,
                    Meta::WroteAlone(v) => self.wrote_alone = v,
                    Meta::Incarnation(v) => self.incarnation = v,
                    Meta::PeerMayDegrade(v) => self.peer_may_degrade = v,
                    Meta::FailbackPending(v) => self.failback_pending = v,
                    Meta::SaveAsideOnResync(v) => self.save_aside_on_resync = v,
                    Meta::StoreId(v) => self.store_id = v,
                    Meta::Peer(v) => self.peer = v,
                    Meta::Amnesiac(v) => self.amnesiac = v,
                    Meta::FullResyncOwed(v) => self.full_resync_owed = v,
                    Meta::RebuildPending(v) => self.rebuild_pending = v,
                    Meta::PromotedFrom(v) => self.promoted_from = Some(v),
                    Meta::SyncCursor(v) => self.sync_cursor = v,
                },
            }
        }
    }
}

/// In-memory store for the simulation. Batches are staged, then made durable one by one in
/// order; a crash discards everything staged and not yet durable.
#[derive(Clone, Debug)]
pub struct MemStore {
    durable: SiteState,
    staged: std::collections::VecDeque<(u64, Vec<StoreWrite>)>,
    next_batch: u64,
}

impl MemStore {
    pub fn new(initial: SiteState) -> MemStore {
        MemStore { durable: initial, staged: std::collections::VecDeque::new(), next_batch: 1 }
    }

    /// Queues a batch; returns its number, for `sync_through`.
    pub fn stage(&mut self, batch: Vec<StoreWrite>) -> u64 {
        let n = self.next_batch;
        self.next_batch += 1;
        self.staged.push_back((n, batch));
        n
    }

    /// Makes batch `n` and every older staged batch durable, in order (a store syncs a
    /// write-ahead log in order). Returns false when `n` is no longer staged (lost in a crash,
    /// or already durable).
    pub fn sync_through(&mut self, n: u64) -> bool {
        let mut found = false;
        while self.staged.front().is_some_and(|(m, _)| *m <= n) {
            let (m, batch) = self.staged.pop_front().expect("checked");
            self.durable.apply(&batch);
            found |= m == n;
        }
        found
    }

    /// Only what has been synced: the state the oracles judge and a restart reloads.
    pub fn durable(&self) -> &SiteState {
        &self.durable
    }

    /// Power loss: unsynced batches vanish.
    pub fn crash(&mut self) {
        self.staged.clear();
    }
}

/// On-disk key layout shared by every persistent store. Every key starts with the schema
/// version, then a one-byte family tag, then big-endian fields, so that a prefix scan of a
/// family returns extents in ascending order.
pub mod keys {
    use crate::ids::ExtentId;

    pub const SCHEMA_VERSION: u8 = 1;
    pub const RECORD: u8 = b'r';
    pub const DIRTY: u8 = b'd';
    pub const META: u8 = b'm';

    pub fn extent_key(family: u8, e: ExtentId) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[0] = SCHEMA_VERSION;
        k[1] = family;
        k[2..].copy_from_slice(&e.0.to_be_bytes());
        k
    }

    /// Parses a key written by `extent_key`; anything else (another version, another family,
    /// a wrong length) is refused rather than guessed at.
    pub fn parse_extent_key(family: u8, k: &[u8]) -> Option<ExtentId> {
        if k.len() != 10 || k[0] != SCHEMA_VERSION || k[1] != family {
            return None;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&k[2..]);
        Some(ExtentId(u64::from_be_bytes(b)))
    }

    pub fn meta_key(name: &str) -> Vec<u8> {
        let mut k = vec![SCHEMA_VERSION, META];
        k.extend_from_slice(name.as_bytes());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_loses_only_unsynced_batches() {
        let mut s = MemStore::new(SiteState::fresh(Role::Secondary, StoreId(1)));
        let a = s.stage(vec![StoreWrite::PutRecord(ExtentId(1), Generation(1))]);
        let b = s.stage(vec![StoreWrite::PutRecord(ExtentId(2), Generation(2))]);
        assert!(s.sync_through(a));
        s.crash();
        assert_eq!(s.durable().record.keys().copied().collect::<Vec<_>>(), vec![ExtentId(1)]);
        assert!(!s.sync_through(b), "a batch lost in the crash never becomes durable");
        let c = s.stage(vec![StoreWrite::DelRecord(ExtentId(1))]);
        assert!(s.sync_through(c));
        assert!(s.durable().record.is_empty());
    }

    #[test]
    fn keys_sort_by_extent_and_carry_the_version() {
        let a = keys::extent_key(keys::RECORD, ExtentId(2));
        let b = keys::extent_key(keys::RECORD, ExtentId(256));
        assert!(a < b, "big-endian keys scan in extent order");
        assert_eq!(a[0], keys::SCHEMA_VERSION);
        assert_eq!(keys::parse_extent_key(keys::RECORD, &b), Some(ExtentId(256)));
        assert_eq!(keys::parse_extent_key(keys::DIRTY, &b), None);
        let m = keys::meta_key("epoch");
        assert_eq!(&m[..2], &[keys::SCHEMA_VERSION, keys::META]);
        assert!(m > keys::extent_key(keys::DIRTY, ExtentId(u64::MAX)).to_vec(), "families do not interleave");
        let mut other_version = b;
        other_version[0] = 2;
        assert_eq!(keys::parse_extent_key(keys::RECORD, &other_version), None);
    }
}
