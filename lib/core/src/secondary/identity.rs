//! The secondary's side of store identity (DRBD's generation identifiers, reduced to what
//! geomirror needs): at a primary's hello, is this store the one the primary paired with,
//! holding at least what it acknowledged, and is the primary's store the one this site
//! paired with?
//!
//! Owns: the checks on `Hello { store, remembers }` and the transition into amnesia.
//! Must not: trust this store's own flags once it is an amnesiac: `consistent` and
//! `authoritative` are then false until a full resync's end is durable.

use super::Secondary;
use crate::frame::{Refusal, Remembered};
use crate::ids::{Epoch, StoreId};
use crate::store::{Meta, StoreWrite};

impl Secondary {
    /// Compares a primary's hello with this store. On `Err` the primary was refused (its
    /// store is unknown here and it does not know this one); otherwise `batch` holds what
    /// the handshake must persist before the welcome: the primary's identity, and this
    /// store's amnesia when the primary remembers more than it holds.
    pub(super) fn check_identity(
        &mut self,
        epoch: Epoch,
        primary: StoreId,
        remembers: Option<Remembered>,
        owes_full_resync: bool,
        batch: &mut Vec<StoreWrite>,
    ) -> Result<(), ()> {
        let lost = remembers.and_then(|r| self.lost_state(r));
        #[cfg(feature = "mutations")]
        let lost = if crate::mutations::trust_amnesiac() { None } else { lost };
        let primary_knows_me = remembers.is_some_and(|r| r.store == self.store_id);
        if let Some(known) = self.peer.store {
            if known != primary && !primary_knows_me && !owes_full_resync && lost.is_none() && !self.amnesiac {
                // Neither side knows the other: a rebuilt or replaced primary. It must not serve
                // over this site's data; an operator promotes this site or resyncs from scratch.
                // (A primary that knows this store paired with it, even if this site never
                // learned its identity: a handshake cut short. A primary that owes a full
                // resync was chosen by an operator over whatever this site holds, and checks
                // all of it.)
                self.stats.frames_refused += 1;
                // In the primary's epoch (never older than this site's here), so that it reads it.
                self.send(crate::frame::Frame::Refused { epoch, reason: Refusal::UnknownStore });
                self.actions.push_back(crate::action::Action::Disconnect {
                    reason: format!(
                        "the primary's store {primary} is not the one this site paired with ({known}) and does not know this store: \
                         refused; promote this site, or move its state aside to rebuild it from that primary"
                    ),
                });
                return Err(());
            }
        }
        let was_lost = lost.is_some();
        if let Some(why) = lost {
            // Whatever this store lost, its sync cursor may vouch for it: a new full resync
            // starts from the first extent.
            self.forget_sync_cursor(batch);
            if !self.amnesiac {
                self.stats.amnesia_detected += 1;
                self.last_amnesia = Some(why);
                self.mark_amnesiac(batch);
            }
        } else if owes_full_resync && !self.amnesiac && !unmarked_at_hello() {
            // The primary checks all of this site's image against its own before trusting it
            // (it was promoted by force, or found this store untrustworthy): until that full
            // resync ends, durably, this site claims nothing about its image. Marked before
            // the welcome, not when the resync's first item applies: a link lost in between
            // would otherwise leave a site that a promotion without force calls consistent,
            // whatever its media holds (a fresh store on a blank disk, say).
            self.last_amnesia = Some("the primary owes this site a full verified resync".to_owned());
            self.mark_amnesiac(batch);
        }
        if self.peer.store != Some(primary) {
            self.peer.store = Some(primary);
            if was_lost {
                batch.push(StoreWrite::Meta(Meta::Peer(self.peer)));
            } else {
                // Remembering the primary needs no wait: until it is durable, a restart only
                // pairs with the same primary afresh. The welcome is not held back for it.
                self.persist(super::PersistKind::PeerMemory, vec![StoreWrite::Meta(Meta::Peer(self.peer))]);
            }
        }
        Ok(())
    }

    /// Why this store is not what the primary remembers of it, if it is not.
    fn lost_state(&self, r: Remembered) -> Option<String> {
        if r.store != self.store_id {
            Some(format!("the primary paired with store {}, and this store is {}: its state was lost or replaced", r.store, self.store_id))
        } else if r.applied > self.durable_applied {
            Some(format!(
                "the primary was told this store applied through sequence {}, and it holds {}: it lost acknowledged writes",
                r.applied.0, self.durable_applied.0
            ))
        } else if r.generation >= self.next_generation {
            Some(format!(
                "the primary was answered generation {}, and this store's next is {}: it lost acknowledged record entries",
                r.generation.0, self.next_generation.0
            ))
        } else {
            None
        }
    }

    /// Nothing this store says about its image can be trusted: it is an amnesiac, its record
    /// is not authoritative and its image not consistent until a full resync ends, durably.
    pub(super) fn mark_amnesiac(&mut self, batch: &mut Vec<StoreWrite>) {
        assert!(!self.promoting, "a site being promoted is not marked an amnesiac");
        self.forget_sync_cursor(batch);
        self.amnesiac = true;
        self.resyncing = true;
        batch.push(StoreWrite::Meta(Meta::Amnesiac(true)));
        if self.consistent {
            self.consistent = false;
            batch.push(StoreWrite::Meta(Meta::Consistent(false)));
        }
        if self.authoritative {
            self.authoritative = false;
            batch.push(StoreWrite::Meta(Meta::Authoritative(false)));
        }
    }

    /// A new amnesia: the sync cursor of an earlier full resync vouches for nothing now.
    fn forget_sync_cursor(&mut self, batch: &mut Vec<StoreWrite>) {
        self.pending_mark = None;
        if self.sync_cursor.take().is_some() {
            batch.push(StoreWrite::Meta(Meta::SyncCursor(None)));
        }
    }

    /// Why the last handshake found this store an amnesiac, for the operator.
    pub fn amnesia_reason(&self) -> Option<&str> {
        self.last_amnesia.as_deref()
    }
}

/// The `UnmarkedAtHello` mutation (always false outside the mutation tests).
fn unmarked_at_hello() -> bool {
    #[cfg(feature = "mutations")]
    if crate::mutations::unmarked_at_hello() {
        return true;
    }
    false
}
