//! Online verify: comparing the two images by digest while the host keeps writing.
//!
//! Owns: the verify run (its range, cursor, reads and unanswered checks), what it found,
//! and the found extents not yet repaired.
//! Must not: report a difference that an in-flight write explains (checks are ordered like
//! resync reads, see below), run while the pair is not in sync (a resync's own differences
//! are not findings), or let any resync end on the peer before every check dispatched ahead
//! of it is answered (`checks_answered`).
//!
//! Ordering. A check's read is issued only when no local write is busy on the extent, and
//! host writes to an extent being read wait (`being_read`), so the read holds exactly the
//! writes dispatched before it. The check (`Apply::Verify`) takes the next sequence number,
//! and the peer compares at that point of its apply order, having applied exactly the items
//! before it. Both sides therefore compare the same history; a difference is real.
//!
//! What a difference does. The peer persists the extent in its divergent set and marks its
//! image inconsistent before it answers (`Differs`), so it no longer reports clean and a
//! promotion's failback set covers the extent. This site persists the extent in its local
//! dirty map, durable debt that every later resync copies (as DRBD's out-of-sync bitmap):
//! at once with `repair`, else at the next resync (a reconnect, a restart, or a verify with
//! `repair`).

use super::*;

/// An operator's verify request, in extents: `[first, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyRequest {
    pub extents: Range<u64>,
    pub repair: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyRefused {
    #[error("the range is empty or reaches past the end of the volume ({extents} extents)")]
    Range { extents: u64 },
    #[error("a verify is already running (extents {from}..{to}); wait for it or cancel it")]
    Running { from: u64, to: u64 },
    #[error("this site is fenced: it no longer holds the volume's current image")]
    Fenced,
    #[error("this site runs standalone: it has no peer to compare with")]
    Standalone,
}

/// Why a verify waits instead of reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyWait {
    LinkDown,
    FullResyncOwed,
    Resyncing,
    /// Host writes fill the lag budget (`max_lag_bytes`): checks wait until the peer has
    /// applied enough of them (a catch-up after a reconnect, or writes faster than the link).
    Paced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyStatus {
    pub extents: Range<u64>,
    pub repair: bool,
    /// The next extent to read.
    pub next: u64,
    /// Extents compared (equal or found different).
    pub checked: u64,
    /// Extents found different, and how many 4 KiB blocks of each.
    pub found: BTreeMap<ExtentId, u32>,
    pub done: bool,
    /// An operator stopped it: extents from `next` on were not compared (checks already on
    /// their way were, and their findings count).
    pub cancelled: bool,
    pub waiting: Option<VerifyWait>,
}

#[derive(Default)]
pub(super) struct Verify {
    pub(super) run: Option<Run>,
    /// Extents a verify found different and no resync has copied yet: kept in the local
    /// dirty map (so not cleaned), and added to the next resync.
    pub(super) unrepaired: BTreeSet<ExtentId>,
}

pub(super) struct Run {
    extents: Range<u64>,
    repair: bool,
    next: u64,
    pub(super) reading: BTreeMap<Token, ExtentId>,
    /// Checks dispatched and not yet answered, by sequence number.
    pub(super) checks: BTreeMap<Seq, ExtentId>,
    checked: u64,
    found: BTreeMap<ExtentId, u32>,
    done: bool,
    cancelled: bool,
}

impl Run {
    fn rewind_to(&mut self, e: ExtentId) {
        self.next = self.next.min(e.0);
    }
}

impl Primary {
    /// Starts comparing `req.extents` with the peer. Replaces a finished verify's result.
    pub fn start_verify(&mut self, now: Time, req: VerifyRequest) -> Result<(), VerifyRefused> {
        let count = self.geo.extent_count();
        if req.extents.is_empty() || req.extents.end > count {
            return Err(VerifyRefused::Range { extents: count });
        }
        if self.phase == Phase::Fenced {
            return Err(VerifyRefused::Fenced);
        }
        if self.cfg.mode == Mode::Standalone {
            return Err(VerifyRefused::Standalone);
        }
        if let Some(r) = self.verify.run.as_ref().filter(|r| !r.done) {
            return Err(VerifyRefused::Running { from: r.extents.start, to: r.extents.end });
        }
        #[cfg(feature = "mutations")]
        let req = VerifyRequest { repair: req.repair && !crate::mutations::verify_repair_skipped(), ..req };
        self.stats.verifies_started += 1;
        let repair = req.repair;
        self.verify.run = Some(Run {
            next: req.extents.start,
            extents: req.extents,
            repair: req.repair,
            reading: BTreeMap::new(),
            checks: BTreeMap::new(),
            checked: 0,
            found: BTreeMap::new(),
            done: false,
            cancelled: false,
        });
        if repair {
            // What an earlier verify found and left: copied now.
            let earlier: Vec<ExtentId> = self.verify.unrepaired.iter().copied().collect();
            self.resync.needs_copy.extend(earlier);
        }
        self.progress(now);
        Ok(())
    }

    /// Stops a running verify: no extent is read from now on. The checks already on their way
    /// are answered (they are in the peer's apply order), and the verify is done once they
    /// are, their findings counted; reads in flight are dropped.
    pub fn cancel_verify(&mut self, now: Time) -> bool {
        let Some(r) = self.verify.run.as_mut().filter(|r| !r.done && !r.cancelled) else { return false };
        r.cancelled = true;
        if let Some(e) = r.reading.values().min() {
            r.next = r.next.min(e.0);
        }
        r.reading.clear();
        self.progress(now);
        true
    }

    pub fn verify_status(&self) -> Option<VerifyStatus> {
        let r = self.verify.run.as_ref()?;
        Some(VerifyStatus {
            extents: r.extents.clone(),
            repair: r.repair,
            next: r.next,
            checked: r.checked,
            found: r.found.clone(),
            done: r.done,
            cancelled: r.cancelled,
            waiting: if r.done {
                None
            } else {
                self.verify_wait().or_else(|| {
                    let paced = r.reading.is_empty()
                        && !r.cancelled
                        && r.next < r.extents.end
                        && self.buffer_bytes > 0
                        && self.buffer_bytes + self.geo.extent_bytes() > self.cfg.max_lag_bytes;
                    paced.then_some(VerifyWait::Paced)
                })
            },
        })
    }

    /// Extents found different by a verify and not yet repaired.
    pub fn verify_unrepaired(&self) -> &BTreeSet<ExtentId> {
        &self.verify.unrepaired
    }

    fn verify_wait(&self) -> Option<VerifyWait> {
        if self.conn.link != LinkState::Up {
            Some(VerifyWait::LinkDown)
        } else if self.ident.full_resync_owed {
            Some(VerifyWait::FullResyncOwed)
        } else if self.resync_in_progress() || self.resync.failback_pending {
            Some(VerifyWait::Resyncing)
        } else {
            None
        }
    }

    pub(super) fn verify_invariants(&self) -> Result<(), String> {
        if let Some(e) = self.verify.unrepaired.iter().find(|e| !self.dirty.local.contains(e) && !self.dirty.persisting.contains(e)) {
            return Err(format!("extent {} a verify found different is not in the local dirty map", e.0));
        }
        if self.resync.running && !self.verify.unrepaired.is_empty() {
            return Err("a resync runs while a verify's findings are left out of it".into());
        }
        if let Some(r) = &self.verify.run {
            if let Some(s) = r.checks.keys().find(|s| !self.buffer.contains_key(s)) {
                return Err(format!("verify check {} is not buffered", s.0));
            }
            if (r.done || r.cancelled) && !r.reading.is_empty() {
                return Err("a finished or cancelled verify still reads".into());
            }
            if r.found.keys().any(|e| !r.extents.contains(&e.0)) || r.next > r.extents.end {
                return Err("a verify found or reads outside its range".into());
            }
        }
        Ok(())
    }

    /// An extent a resync or a verify is reading: host writes to it wait.
    pub(super) fn being_read(&self, e: u64) -> bool {
        #[cfg(feature = "mutations")]
        let verify_holds = !crate::mutations::verify_unordered();
        #[cfg(not(feature = "mutations"))]
        let verify_holds = true;
        self.resync.reading.values().any(|r| r.0 == e)
            || (verify_holds && self.verify.run.as_ref().is_some_and(|r| r.reading.values().any(|x| x.0 == e)))
    }

    /// Every verify check dispatched so far is answered: a resync may end on the peer only
    /// then, since the end clears the peer's divergent set, and a difference a check found
    /// must reach this site (and its copy be owed) before that.
    pub(super) fn verify_checks_answered(&self) -> bool {
        self.verify.run.as_ref().and_then(|r| r.checks.keys().next_back()).is_none_or(|s| *s <= self.applied_ack)
    }

    /// A finished verify read: dispatched as a check, in order, unless the pair fell out of
    /// sync meanwhile (then the extent is read again later).
    pub(super) fn verify_read_done(&mut self, now: Time, token: Token, data: &Bytes) -> bool {
        let wait = self.verify_wait();
        let Some(r) = self.verify.run.as_mut() else { return false };
        let Some(e) = r.reading.remove(&token) else { return false };
        if wait.is_some() {
            r.rewind_to(e);
            self.progress(now);
            return true;
        }
        let range = self.geo.extent_range(e);
        let digests = block_digests(data, range.end - range.start);
        let seq = self.dispatch_resync_item(Apply::Verify { extent: e, digests });
        let r = self.verify.run.as_mut().expect("present");
        r.checks.insert(seq, e);
        self.stats.verify_bytes_checked += range.end - range.start;
        self.progress(now);
        true
    }

    /// The peer's answer to a check that found blocks different. False when `seq` is not a
    /// verify check (a resync's, handled by the caller).
    pub(super) fn verify_differs(&mut self, seq: Seq, extent: ExtentId, blocks: &[u8]) -> bool {
        let Some(r) = self.verify.run.as_mut() else { return false };
        if r.checks.remove(&seq).is_none() {
            return false;
        }
        debug_assert!(r.extents.contains(&extent.0), "a check answers for an extent of its verify");
        let n = blocks.iter().map(|b| b.count_ones()).sum::<u32>();
        r.checked += 1;
        r.found.insert(extent, n);
        self.stats.verify_extents_found += 1;
        self.stats.verify_blocks_found += u64::from(n);
        let repair = r.repair;
        self.add_local_dirty(vec![extent]);
        #[cfg(feature = "mutations")]
        let repair = repair && !crate::mutations::verify_repair_skipped();
        // A resync under way must copy it whatever the verify asked: its end clears the
        // peer's divergent set and vouches for the image (found by O9 (c)).
        if repair || self.resync.running {
            self.resync.needs_copy.insert(extent);
        } else {
            self.verify.unrepaired.insert(extent);
        }
        true
    }

    /// The peer dropped (or this site abandoned) unsent checks: their extents are read again.
    pub(super) fn verify_forget_from(&mut self, from: Seq) {
        if let Some(r) = self.verify.run.as_mut() {
            let dropped = r.checks.split_off(&from);
            if let Some(e) = dropped.values().min() {
                r.rewind_to(*e);
            }
        }
    }

    /// A resync has started: it copies what verifies found, which is then no longer owed.
    pub(super) fn verify_resync_started(&mut self) {
        let found: Vec<ExtentId> = std::mem::take(&mut self.verify.unrepaired).into_iter().collect();
        self.resync.needs_copy.extend(found);
    }

    pub(super) fn drive_verify(&mut self) {
        let wait = self.verify_wait();
        let applied = self.applied_ack;
        let Some(r) = self.verify.run.as_mut() else { return };
        // Checks the peer applied without a difference were equal.
        let answered = r.checks.len();
        r.checks = r.checks.split_off(&applied.next());
        r.checked += (answered - r.checks.len()) as u64;
        if r.cancelled && !r.done && r.checks.is_empty() {
            r.done = true;
        }
        // A draining site issues nothing new: the drain waits for reads in flight.
        if r.done || r.cancelled || wait.is_some() || self.phase != Phase::Serving {
            return;
        }
        let extent_bytes = self.geo.extent_bytes();
        loop {
            let r = self.verify.run.as_ref().expect("present");
            if r.reading.len() >= self.cfg.resync_reads_in_flight || r.next >= r.extents.end {
                break;
            }
            // Checks share the lag budget with host writes (and pace with them).
            let pending = (r.reading.len() as u64 + 1) * extent_bytes;
            if self.buffer_bytes > 0 && self.buffer_bytes + pending > self.cfg.max_lag_bytes {
                break;
            }
            let e = ExtentId(r.next);
            #[cfg(feature = "mutations")]
            let busy = self.local_busy.contains_key(&e) && !crate::mutations::verify_unordered();
            #[cfg(not(feature = "mutations"))]
            let busy = self.local_busy.contains_key(&e);
            if busy {
                break;
            }
            let token = self.token();
            let r = self.verify.run.as_mut().expect("present");
            r.next += 1;
            r.reading.insert(token, e);
            self.actions.push_back(Action::ReadExtent { token, extent: e });
        }
        let r = self.verify.run.as_mut().expect("present");
        if r.next >= r.extents.end && r.reading.is_empty() && r.checks.is_empty() {
            r.done = true;
            self.stats.verifies_completed += 1;
        }
    }
}
