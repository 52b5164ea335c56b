//! Promotion: this secondary becomes the primary of a new epoch, its durable record the
//! failback set.
//!
//! Owns: `promote`, its refusals (`PromoteError`) and what it found (`PromoteReport`), the
//! epoch jump of a forced promotion.
//! Must not: promote over a live primary of its epoch, an amnesiac, or a store that never
//! paired, without force; persist anything of the secondary role after the promotion's batch.

use super::{PersistKind, Secondary};
use crate::action::Action;
use crate::frame::Role;
use crate::ids::{Epoch, Seq};
use crate::store::{Meta, StoreWrite};
use thiserror::Error;

/// How far a forced promotion of an amnesiac moves its epoch ahead. Its store does not know
/// how far its peer's epoch went while it was gone, and two primaries of one epoch cannot be
/// told apart (each would refuse the other forever). Normal promotions add one, so the peer
/// would need this many promotions meanwhile to meet it.
pub const AMNESIAC_EPOCH_JUMP: u64 = 1 << 20;

/// What a promotion found, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromoteReport {
    pub new_epoch: Epoch,
    pub record_extents: u64,
    /// False after a degrade: differences outside the record may exist. Said loudly.
    pub authoritative: bool,
    /// False mid-resync: the image is not a prefix of the old primary's history.
    pub consistent: bool,
    /// True when an amnesiac was promoted by force: its image may lack acknowledged writes
    /// anywhere, and its failback onto the old primary checks the whole volume.
    pub amnesiac: bool,
    pub applied: Seq,
    /// An amnesiac promoted mid-sync: the first extent its full verified resync had not
    /// synced durably (its sync cursor; 0 without one). Every extent from there to the end
    /// of the volume may hold anything; the failback checks the whole volume either way.
    pub unsynced_from: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PromoteError {
    #[error("the primary of epoch {0} is connected and alive; promoting now would make two writers (use force to override)")]
    PeerAlive(u64),
    #[error("a promotion is already being persisted")]
    InProgress,
    #[error("this site has never paired with a primary (its store is new and no handshake has completed): its image holds nothing known of the primary's data; promote it only if the primary is lost for good, with --force (force: true in the API)")]
    NeverPaired,
    #[error("this site's store lost state it had acknowledged to its primary (an amnesiac): its image may lack acknowledged writes anywhere, not only in recorded extents, until a full verified resync from the primary ends; promote it only if the primary is lost for good, with --force (force: true in the API)")]
    Amnesiac,
}

impl Secondary {
    /// Makes this site the primary of a new epoch. The failback set starts as the durable
    /// record: it is persisted as the new primary's dirty map in the same batch as the epoch.
    pub fn promote(&mut self, force: bool) -> Result<PromoteReport, PromoteError> {
        if self.promoting {
            return Err(PromoteError::InProgress);
        }
        if self.conn.connected && self.conn.welcomed && self.conn.peer_epoch == Some(self.epoch) && !force {
            return Err(PromoteError::PeerAlive(self.epoch.0));
        }
        if self.amnesiac && !force {
            assert!(!self.authoritative && !self.consistent, "an amnesiac claims nothing about its image");
            return Err(PromoteError::Amnesiac);
        }
        if self.peer.store.is_none() && !force {
            return Err(PromoteError::NeverPaired);
        }
        // Neither an amnesiac nor a store that never paired knows how far its peer's epoch
        // went, nor which extents differ from the peer's image.
        let untrusted = self.amnesiac || self.peer.store.is_none();
        self.promoting = true;
        let new_epoch = if untrusted { Epoch(self.epoch.0.saturating_add(AMNESIAC_EPOCH_JUMP)) } else { self.epoch.next() };
        let mut batch = vec![
            StoreWrite::Meta(Meta::Epoch(new_epoch)),
            StoreWrite::Meta(Meta::Role(Role::Primary)),
            StoreWrite::Meta(Meta::WroteAlone(false)),
            StoreWrite::Meta(Meta::FailbackPending(true)),
            // A request from an earlier fencing to save aside on the next resync: as the
            // primary, this site's image is the one kept, so nothing of it needs saving. Left
            // set, it would outlive this epoch and make a later failback onto this site save
            // aside every extent it overwrites.
            StoreWrite::Meta(Meta::SaveAsideOnResync(false)),
            StoreWrite::Meta(Meta::Peer(self.peer.across_role_change())),
            StoreWrite::Meta(Meta::PromotedFrom(crate::frame::Position {
                applied: self.durable_applied,
                next_generation: self.next_generation,
            })),
        ];
        if untrusted {
            // Promoted by force: nothing tells which extents may differ from the old primary,
            // so its failback (onto whatever peer it meets next) checks the whole volume.
            batch.push(StoreWrite::Meta(Meta::Amnesiac(false)));
            batch.push(StoreWrite::Meta(Meta::FullResyncOwed(true)));
        }
        batch.extend(self.record.iter().map(|(e, _)| StoreWrite::PutDirty(e)));
        batch.push(StoreWrite::ClearRecord);
        let report = PromoteReport {
            new_epoch,
            record_extents: self.record.len() as u64,
            authoritative: self.authoritative,
            consistent: self.consistent,
            amnesiac: untrusted,
            applied: self.applied,
            unsynced_from: untrusted.then(|| self.sync_cursor().map_or(0, |c| c.next)),
        };
        self.persist(PersistKind::Promote, batch);
        if self.conn.connected {
            self.actions.push_back(Action::Disconnect { reason: format!("promoted to epoch {}", new_epoch.0) });
        }
        Ok(report)
    }
}
