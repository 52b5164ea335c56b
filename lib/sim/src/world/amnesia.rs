//! Store faults and what the oracles hold the sites to while one is unhealed.
//!
//! Owns: the faults that take a site's store (lost whole, with or without its
//! media, or gone back to an earlier durable state), the operator who promotes a site when
//! no site is primary any more, and oracle O7: no pair of sites reports clean (linked,
//! drained, authoritative, consistent, no debt, no flag) while their images differ.
//!
//! A lost or rolled-back store breaks invariant R by itself: the record that covered the
//! differences is gone. So O2 is suspended from the fault until the pair has healed it
//! (the damaged store flagged as an amnesiac, then a full verified resync ended), and O7
//! holds throughout. Faults are injected one at a time: a second store fault before the
//! first is healed can destroy the only witness of what the first one lost.
//!
//! Rollbacks go only to states the design promises to detect: for a secondary, states
//! older than an acknowledgement its primary has made durable in its memory of the peer;
//! for a primary, states whose next incarnation the secondary has already seen applied.
//! A rollback that loses only what nobody outside the store saw is, by construction,
//! invisible to the peer; the RocksDB shell's checks at open (absolute-consistency log
//! recovery, the checkpoint in the identity file) are what catch its file-level causes.
//! docs/protocol.md, "Store identity and amnesia", says so too.
//!
//! Such a hidden rollback must also be harmless, and one is injected to show it: a
//! secondary's store goes back to the oldest state its primary's *durable* memory cannot
//! tell from the present, and the primary crashes at the same instant (it forgets whatever
//! it knew better in memory). No write may have reached the primary's media resting on a
//! record answer that state lacks, so invariant R and O7 hold with no excuse.

use super::{SiteId, World, OTHER};
use crate::media::Media;
use geomirror_core::{Machine, Role, SiteState, StoreId};
use rand::Rng;

/// Durable states kept per site for rollbacks.
const HISTORY: usize = 48;

/// An unhealed store fault of one site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AmnesiaWatch {
    /// The store is flagged durably: an amnesiac, or its primary owes it a full resync.
    pub(super) flagged: bool,
    /// The site's media was replaced too: it holds none of the host's data.
    pub(super) blanked: bool,
    /// A primary's store went back: the peer finds out only while the incarnation it hands
    /// out again is the one it saw, so the site does not crash again until it is flagged
    /// (one fault at a time).
    pub(super) primary_rollback: bool,
}

impl AmnesiaWatch {
    pub(super) fn new(blanked: bool, primary_rollback: bool) -> AmnesiaWatch {
        AmnesiaWatch { flagged: false, blanked, primary_rollback }
    }
}

impl World {
    /// Keeps the store's new durable state for later rollbacks.
    pub(super) fn remember_durable(&mut self, s: SiteId) {
        let site = &mut self.sites[s];
        let state = site.store.durable().clone();
        if site.history.back() != Some(&state) {
            site.history.push_back(state);
            if site.history.len() > HISTORY {
                site.history.pop_front();
            }
        }
    }

    /// Draws the store faults of this request (no draw when the seed has none, so that the
    /// other draws of such seeds stay as they were).
    pub(super) fn maybe_store_fault(&mut self) {
        let f = self.cfg.faults.clone();
        if self.amnesia.iter().any(Option::is_some) || self.recovery.is_some() {
            return;
        }
        if f.store_loss_ppm > 0 && self.rng.gen_range(0..1_000_000) < f.store_loss_ppm {
            let site = self.rng.gen_range(0..2);
            let blank = self.rng.gen_bool(0.5);
            let d = self.us(0, 2_000);
            self.schedule(d, super::Ev::StoreLoss { site, blank });
        }
        if f.store_rollback_ppm > 0 && self.rng.gen_range(0..1_000_000) < f.store_rollback_ppm {
            let site = self.rng.gen_range(0..2);
            let d = self.us(0, 2_000);
            self.schedule(d, super::Ev::StoreRollback { site });
        }
        if f.hidden_rollback_ppm > 0 && self.rng.gen_range(0..1_000_000) < f.hidden_rollback_ppm {
            let site = self.rng.gen_range(0..2);
            let d = self.us(0, 200);
            self.schedule(d, super::Ev::HiddenRollback { site });
        }
    }

    /// The site crashes and its store is gone: it restarts from a new one (a new identity).
    /// Over media that holds data, the new store is an amnesiac secondary, as the shell makes
    /// it; with `blank` the media was replaced too, and the new store is as new.
    pub(super) fn store_loss(&mut self, s: SiteId, blank: bool) {
        if self.amnesia.iter().any(Option::is_some) {
            return;
        }
        if self.cfg.trace {
            eprintln!("{:>9}    site {s}: store lost{}", self.now.0, if blank { " with its media" } else { "" });
        }
        self.crash(s);
        self.report.store_faults += 1;
        let id = StoreId(self.id_rng.gen());
        if blank {
            self.sites[s].media = Media::new(self.cfg.volume_bytes);
            self.sites[s].side.clear();
            self.sites[s].pre_demotion = None;
        }
        // The sequence numbers this site handed out as a primary went with its store: a new
        // store may hand them out again, so the history the O3 model replays starts over, and
        // a peer's position in the old numbering means nothing any more.
        for x in [s, OTHER[s]] {
            self.last_applied_write[x] = 0;
            self.synced_applied_write[x] = 0;
        }
        self.history[s].clear();
        self.bases[s] = vec![(0, self.sites[s].media.current().to_vec())];
        // The epochs this store wrote in went with it: nothing can present them again, so the
        // other site taking one of those numbers later (it never heard of it) makes no second
        // writer. O5 holds for the epochs a store still knows; a witness that hands out epochs
        // (etcd) is what makes the numbers unique across such losses.
        self.writers.retain(|_, w| *w != s);
        self.model_cache = None;
        let site = &mut self.sites[s];
        let holds_data = site.media.current().iter().any(|v| *v != 0);
        let state = if holds_data { SiteState::amnesiac(id) } else { SiteState::fresh(site.home_role, id) };
        site.store = geomirror_core::MemStore::new(state);
        site.history.clear();
        self.amnesia[s] = Some(AmnesiaWatch::new(blank, false));
        self.forget_sync_owed(s);
        self.ensure_restart(s);
    }

    /// The site crashes and its store comes back holding an earlier durable state, when
    /// there is one the design promises to detect.
    pub(super) fn store_rollback(&mut self, s: SiteId) {
        if self.amnesia.iter().any(Option::is_some) {
            return;
        }
        let Some(i) = self.rollback_target(s) else { return };
        if self.cfg.trace {
            eprintln!("{:>9}    site {s}: store rolled back by {} states", self.now.0, self.sites[s].history.len() - i);
        }
        self.crash(s);
        self.report.store_faults += 1;
        let site = &mut self.sites[s];
        let state = site.history[i].clone();
        site.history.truncate(i + 1);
        let primary_rollback = state.role == Role::Primary;
        site.store = geomirror_core::MemStore::new(state);
        self.amnesia[s] = Some(AmnesiaWatch::new(false, primary_rollback));
        self.ensure_restart(s);
    }

    /// Secondary `s`'s store goes back to its state `i`, which its primary's durable memory
    /// cannot tell apart from the present, and the primary crashes at the same instant.
    pub(super) fn hidden_rollback(&mut self, s: SiteId) {
        if self.amnesia.iter().any(Option::is_some) || self.sites[s].store.durable().role != Role::Secondary {
            return;
        }
        let Some(i) = self.hidden_rollback_target(s) else { return };
        let p = OTHER[s];
        if self.cfg.trace {
            eprintln!(
                "{:>9}    site {s}: store rolled back by {} states, hidden from its primary, which crashes",
                self.now.0,
                self.sites[s].history.len() - i
            );
        }
        self.crash(s);
        self.crash(p);
        self.report.store_faults += 1;
        self.report.hidden_rollbacks += 1;
        let site = &mut self.sites[s];
        let state = site.history[i].clone();
        site.history.truncate(i + 1);
        site.store = geomirror_core::MemStore::new(state);
        self.ensure_restart(s);
        self.ensure_restart(p);
    }

    /// The oldest earlier durable state of secondary `s` (same store, role, epoch and applied
    /// position) that its primary's durable memory of the peer does not show as less than
    /// acknowledged.
    fn hidden_rollback_target(&self, s: SiteId) -> Option<usize> {
        let me = self.sites[s].store.durable();
        let other = self.sites[OTHER[s]].store.durable();
        if other.role != Role::Primary || other.peer.store != Some(me.store_id) || other.epoch != me.epoch {
            return None;
        }
        let history = &self.sites[s].history;
        (0..history.len().saturating_sub(1)).find(|&i| {
            let t = &history[i];
            t.store_id == me.store_id
                && t.role == me.role
                && t.epoch == me.epoch
                && t.next_generation > other.peer.generation
                // Its applied position as now: only record entries went back (a primary whose
                // shipping lags makes many such states). The media is not rolled back, so a
                // store that went back in applied position too would claim a prefix its
                // media is past, which no peer can check either.
                && t.applied == me.applied
                && t.apply_high_water == me.apply_high_water
        })
    }

    /// A crash restarts the site only at quiet moments of the scenario; a store fault always
    /// brings it back, as an operator would.
    fn ensure_restart(&mut self, s: SiteId) {
        let d = self.us(1_000, 30_000);
        self.schedule(d, super::Ev::Restart { site: s });
    }

    /// An index into the site's history of durable states that the peer will find out, drawn
    /// among them; None when there is none.
    fn rollback_target(&mut self, s: SiteId) -> Option<usize> {
        let me = self.sites[s].store.durable().clone();
        let other = self.sites[OTHER[s]].store.durable().clone();
        let history = &self.sites[s].history;
        let candidates: Vec<usize> = (0..history.len().saturating_sub(1))
            .filter(|&i| {
                let t = &history[i];
                if t.store_id != me.store_id || t.role != me.role || t.epoch != me.epoch || other.epoch != me.epoch {
                    return false;
                }
                match me.role {
                    // The primary made durable that this store acknowledged more than `t` holds.
                    Role::Secondary => {
                        other.role == Role::Primary
                            && other.peer.store == Some(me.store_id)
                            && (t.applied < other.peer.applied || t.next_generation <= other.peer.generation)
                    }
                    // The secondary applied writes of the incarnation `t` would hand out again.
                    Role::Primary => {
                        let next = t.incarnation.max(t.applied.0 >> 40) + 1;
                        other.role == Role::Secondary && other.applied.0 >> 40 >= next && t.incarnation < me.incarnation
                    }
                }
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[self.rng.gen_range(0..candidates.len())])
    }

    /// Moves each unhealed fault along: flagged once the damaged store is durably known for
    /// what it is; healed once a full resync has ended (or the pair is clean and equal).
    pub(super) fn watch_amnesia(&mut self) {
        for (s, &o) in OTHER.iter().enumerate() {
            let Some(w) = self.amnesia[s] else { continue };
            let me = self.sites[s].store.durable();
            let other = self.sites[o].store.durable();
            let flagged = me.amnesiac || (other.role == Role::Primary && other.full_resync_owed);
            if !w.flagged && flagged {
                self.amnesia[s] = Some(AmnesiaWatch { flagged: true, ..w });
                continue;
            }
            let healed = w.flagged
                && !me.amnesiac
                && me.consistent
                && !other.full_resync_owed
                && !me.full_resync_owed
                && self.sites[s].core.is_some();
            if healed || self.clean_pair().is_some_and(|(p, q)| self.sites[p].media.current() == self.sites[q].media.current()) {
                self.amnesia[s] = None;
                if healed {
                    self.report.amnesias_healed += 1;
                }
            }
        }
    }

    /// The primary and secondary, when the pair reports clean: linked, drained, authoritative,
    /// consistent, no debt, no flag, on both sides.
    fn clean_pair(&self) -> Option<(SiteId, SiteId)> {
        if !self.link_up {
            return None;
        }
        (0..2).find_map(|p| {
            let q = OTHER[p];
            match (&self.sites[p].core, &self.sites[q].core) {
                (Some(Machine::Primary(x)), Some(Machine::Secondary(y))) => {
                    let primary = x.is_drained()
                        && x.local_dirty().is_empty()
                        && !x.split_brain()
                        && !x.resync_in_progress()
                        && !x.full_resync_owed();
                    let secondary =
                        y.is_connected() && y.is_authoritative() && y.is_consistent() && !y.is_amnesiac() && !y.split_brain_evidence();
                    (primary && secondary).then_some((p, q))
                }
                _ => None,
            }
        })
    }

    /// O7: no pair reports clean while the images differ.
    pub(super) fn check_o7(&mut self) {
        let Some((p, q)) = self.clean_pair() else { return };
        let (a, b) = (self.sites[p].media.current(), self.sites[q].media.current());
        if let Some(i) = (0..a.len()).find(|i| a[*i] != b[*i] && !self.rotted(*i)) {
            let detail = format!(
                "both sites report clean (linked, drained, authoritative, consistent, no flag) but block {i} differs: primary {} holds {}, secondary {} holds {}",
                p, a[i], q, b[i]
            );
            self.violate("O7", detail);
        }
    }

    /// The operator on call when no site is primary (a primary's store was lost or went back,
    /// and it stepped down): promote the site whose store is trusted, or, when neither is,
    /// one of them by force; then point the host at it.
    pub(super) fn recover_primary(&mut self) {
        self.maybe_schedule_approval();
        if let Some(r) = self.recovery {
            if self.is_primary(r) {
                self.recovery = None;
                self.switch_host_to(r, false);
            } else if self.sites[r].core.is_none() {
                self.recovery = None;
            }
            return;
        }
        // The scenario's own promotions come first; once the promoted site serves (or the
        // drill is over), the operator steps in.
        let choreographed = self.cfg.scenario != super::Scenario::Steady && self.stage == super::Stage::Underway;
        let both_secondaries = (0..2).all(|s| matches!(self.sites[s].core, Some(Machine::Secondary(_))));
        if choreographed || !both_secondaries {
            return;
        }
        let trusted = |w: &World, s: SiteId| !w.sites[s].store.durable().amnesiac && w.amnesia[s].is_none();
        let s = [self.active, OTHER[self.active]].into_iter().find(|s| trusted(self, *s)).unwrap_or(self.active);
        if self.cfg.trace {
            eprintln!("{:>9}    operator: no primary; promoting site {s}", self.now.0);
        }
        if self.try_promote(s, false).is_ok() {
            self.report.recoveries += 1;
            self.recovery = Some(s);
        }
    }

    /// A primary waits for an operator to approve a full sync onto a replaced peer store
    /// (`CoreConfig::rebuild_auto` off): the operator looks at it a while later.
    fn maybe_schedule_approval(&mut self) {
        let a = self.active;
        let pending = matches!(&self.sites[a].core, Some(Machine::Primary(p)) if p.rebuild_pending().is_some());
        if pending && !self.approval_scheduled {
            self.approval_scheduled = true;
            let d = self.us(1_000, 60_000);
            self.schedule(d, super::Ev::ApproveRebuild { site: a });
        }
    }

    /// The operator approves the rebuild, naming the peer's store as its status shows it;
    /// first with a wrong one, which must change nothing.
    pub(super) fn approve_rebuild(&mut self, s: SiteId) {
        self.approval_scheduled = false;
        let now = self.now;
        let Some(Machine::Primary(p)) = self.sites[s].core.as_mut() else { return };
        let Some(store) = p.rebuild_pending() else { return };
        let wrong = geomirror_core::StoreId(store.0 ^ 1);
        if p.approve_rebuild(now, wrong).is_ok() || p.rebuild_pending() != Some(store) {
            self.violate("rebuild", format!("an approval naming store {wrong} was taken for the pending {store}"));
            return;
        }
        if let Err(e) = p.approve_rebuild(now, store) {
            self.violate("rebuild", format!("the approval of the pending store was refused: {e}"));
            return;
        }
        if self.cfg.trace {
            eprintln!("{:>9}    operator: approved the rebuild onto store {store}", self.now.0);
        }
        self.report.rebuilds_approved += 1;
        self.drain_actions(s);
    }
}
