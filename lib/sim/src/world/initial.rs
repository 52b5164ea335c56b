//! Volumes that start with data, and oracle O8.
//!
//! Owns: the adopted start (`Initial::Adopted`): a primary whose media holds data and whose
//! store owes its peer a full verified resync (as `geomirror adopt` creates it), beside a
//! new secondary store over blank or seeded media; and O8, which judges every full
//! verified resync, whatever started it (an adoption, an amnesia, a forced promotion):
//!
//! O8: from the moment a secondary has been told that its primary owes it a full verified
//! resync (a hello saying so was delivered to it) until that resync's end reaches it, no
//! promotion without force may succeed and report its image consistent. The image may
//! differ from the primary's anywhere not yet synced, and a consistent image is one the
//! host can be moved to without a word.
//!
//! O8 is checked after every event, while such a resync is owed, with a probe: a copy of
//! the secondary's state machine loses its link and is promoted without force. The probe
//! is the operator's promotion as it would go at that instant; the copy is thrown away.
//! Must not: let the probe touch the site (it runs on a clone), or hold the secondary to
//! O8 before it could know (no hello has told it).

use super::{SiteId, World, OTHER};
use crate::media::{Media, BLOCK};
use geomirror_core::frame::Apply;
use geomirror_core::{Frame, Machine, MemStore, Secondary, SiteState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Stamps of the data the primary held before the run (host writes count up from 1).
const PREFILLED: u64 = 1 << 62;
/// Stamps of blocks where a seeded copy differs from the primary's.
const SEEDED: u64 = 1 << 61;
/// Blocks per allocation run of the prefilled image: allocated or a hole, as a whole.
const RUN_BLOCKS: usize = 8;
/// Link cuts an adopted run makes while a full resync is owed, and their chance per host
/// request meanwhile.
const MID_SYNC_CUTS: u64 = 3;
const MID_SYNC_CUT_PPM: u32 = 40_000;

/// Per site: where O8 stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct SyncWatch {
    /// A hello told this site its primary owes it a full verified resync, and the end of
    /// that resync has not reached it.
    pub(super) owed: bool,
    /// The last resync begun on this site (as delivered) is a full one.
    full_begun: bool,
    /// On a primary: the connection on which a welcome named the peer's durable sync cursor,
    /// that cursor, and how many amnesias this primary had found before reading it. The
    /// first full resync begun on that connection resumes at or past the cursor unless the
    /// welcome showed a new amnesia: a restart or a link cut re-checks at most the sync
    /// replay window, never from the first extent.
    /// (And the last sequence number the primary had dispatched then: a begin retransmitted
    /// from before the welcome does not count.)
    welcome_cursor: Option<(u64, u64, u64, u64)>,
}

impl World {
    /// Sets up `Initial::Adopted`, before the sites boot: the primary's media prefilled and
    /// its store adopted, the secondary's media blank or a seeded copy, its store new (an
    /// amnesiac over media that holds data, as the node makes one), and the secondary under
    /// an amnesia watch (its image may differ anywhere until the full resync ends, so O2
    /// waits for that, as after a store fault).
    pub(super) fn adopt_start(&mut self, filled_permille: u32, seeded: bool, seed_diff_permille: u32) {
        let mut r = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ 0xad09_7ed0);
        let blocks = self.sites[0].media.blocks();
        let mut image = vec![0u64; blocks];
        for run in (0..blocks).step_by(RUN_BLOCKS) {
            if r.gen_range(0..1000) < filled_permille {
                for (b, v) in image.iter_mut().enumerate().skip(run).take(RUN_BLOCKS) {
                    *v = PREFILLED | b as u64;
                }
            }
        }
        let copy: Vec<u64> = if seeded {
            image
                .iter()
                .enumerate()
                .map(|(b, v)| match r.gen_range(0..1000) {
                    x if x < seed_diff_permille / 2 => 0,
                    x if x < seed_diff_permille => SEEDED | b as u64,
                    _ => *v,
                })
                .collect()
        } else {
            vec![0; blocks]
        };
        let primary = self.sites[0].store.durable().store_id;
        let secondary = self.sites[1].store.durable().store_id;
        self.sites[0].media = filled(self.cfg.volume_bytes, &image);
        self.sites[0].store = MemStore::new(SiteState::adopted(primary));
        self.sites[1].media = filled(self.cfg.volume_bytes, &copy);
        if copy.iter().any(|v| *v != 0) {
            self.sites[1].store = MemStore::new(SiteState::amnesiac(secondary));
        }
        self.bases = [vec![(0, image.clone())], vec![(0, copy)]];
        self.host.rebase(&image);
        self.amnesia[1] = Some(super::amnesia::AmnesiaWatch::new(false, false));
        self.report.adopted = true;
    }

    /// An adopted run cuts the link now and then while its secondary is owed a full resync
    /// (at most `MID_SYNC_CUTS` times): so that resyncs resume from their sync cursor often
    /// enough for the oracles to judge the resume (draws only in adopted runs, so that every
    /// other seed keeps its run).
    pub(super) fn maybe_cut_mid_sync(&mut self) {
        if !matches!(self.cfg.initial, super::Initial::Adopted { .. })
            || self.cut
            || self.report.sync_cuts >= MID_SYNC_CUTS
            || !self.sync_watch.iter().any(|w| w.owed)
        {
            return;
        }
        if self.rng.gen_range(0..1_000_000) < MID_SYNC_CUT_PPM {
            self.report.sync_cuts += 1;
            self.cut_link("link cut mid-sync", 20_000);
        }
    }

    /// Follows what O8 needs from a frame delivered to site `to`.
    pub(super) fn note_sync_frame(&mut self, to: SiteId, frame: &Frame) {
        let conn = self.conn;
        match frame {
            Frame::Welcome { amnesiac: true, sync_cursor: Some(c), .. } => {
                if let Some(Machine::Primary(p)) = &self.sites[to].core {
                    self.sync_watch[to].welcome_cursor = Some((conn, *c, p.stats().amnesiac_peers_detected, p.last_dispatched().0));
                }
            }
            Frame::Data { seq, apply: Apply::ResyncBegin { full: true, from, .. }, .. }
                if self.sync_watch[OTHER[to]].welcome_cursor.is_some_and(|w| seq.0 > w.3) =>
            {
                let primary = OTHER[to];
                if let Some((wconn, c, detected, _)) = self.sync_watch[primary].welcome_cursor.take() {
                    let same_debt =
                        matches!(&self.sites[primary].core, Some(Machine::Primary(p)) if p.stats().amnesiac_peers_detected == detected);
                    if wconn == conn && same_debt && *from < c {
                        self.violate(
                            "resume",
                            format!("the full resync resumed at extent {from} though the welcome named the peer's durable cursor {c}"),
                        );
                        return;
                    }
                }
            }
            _ => {}
        }
        let w = &mut self.sync_watch[to];
        match frame {
            Frame::Hello { owes_full_resync: true, .. } if matches!(self.sites[to].core, Some(Machine::Secondary(_))) => {
                w.owed = true;
            }
            Frame::Data { apply: Apply::ResyncBegin { full, from, .. }, .. } => {
                w.full_begun = *full;
                if *full && *from > 0 {
                    self.report.sync_resumes += 1;
                }
            }
            // The end of the full resync last begun; it may come again on a later connection
            // (retransmitted, not yet applied), after a hello that told the site again that
            // the resync is owed, and it ends the same full resync then.
            Frame::Data { apply: Apply::ResyncEnd, .. } if w.full_begun => w.owed = false,
            _ => {}
        }
    }

    /// Site `s` is primary now, or has a new store: nothing is owed to it any more (a new
    /// store is told again at its first hello).
    pub(super) fn forget_sync_owed(&mut self, s: SiteId) {
        self.sync_watch[s] = SyncWatch::default();
    }

    /// O8 (see the module's comment).
    pub(super) fn check_o8(&mut self) {
        for (s, primary) in OTHER.into_iter().enumerate() {
            if !self.sync_watch[s].owed {
                continue;
            }
            let Some(Machine::Secondary(x)) = &self.sites[s].core else { continue };
            self.report.o8_probes += 1;
            let mut probe = Secondary::clone(x);
            probe.handle_disconnected(self.now);
            if let Ok(r) = probe.promote(false) {
                if r.consistent {
                    self.violate(
                        "O8",
                        format!(
                            "site {s} was told that site {primary} owes it a full verified resync, which has not ended, and a \
                             promotion without force would succeed now and report its image consistent (epoch {}, applied {})",
                            r.new_epoch.0, r.applied.0
                        ),
                    );
                    return;
                }
            }
        }
    }
}

/// Media holding `image`, durable.
fn filled(volume_bytes: u64, image: &[u64]) -> Media {
    let mut m = Media::new(volume_bytes);
    m.write_stamps(0, image);
    m.make_durable(m.snapshot());
    debug_assert_eq!(m.blocks() as u64 * BLOCK, volume_bytes);
    m
}
