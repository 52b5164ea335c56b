//! Online verify in the simulation: an operator's verifies at random moments, bit rot on the
//! secondary's disk for them to find, and oracle O9.
//!
//! O9, online verify tells the truth:
//! - (a) no false difference: every extent a verify reports different holds a block that
//!   rot reached (a check ordered against in-flight writes never sees one of them as a
//!   difference). In a run without rot, a verify finds nothing.
//! - (b) nothing missed, and repair repairs: a run with rot or verifies ends with a verify of
//!   the whole volume with repair, once drained; O4 then finds the images identical (a rotted
//!   block that verify missed would differ).
//!
//! Rot is the one difference invariant R does not promise to cover (no write made it), so
//! O2 and O3 leave rotted blocks out, as they leave out a store fault until it is healed.
//! Rot is drawn only where no promotion can put a rotted image before the host (the steady
//! scenario, with no store faults).
//!
//! Owns: `rotted`, the operator's verify draws, the final verify.
//! Must not: change what a site's core decides.

use super::*;
use geomirror_core::{Machine, VerifyRefused, VerifyRequest};

/// Stamps of rotted blocks: no host write ever has one.
const ROT_STAMP: u64 = 0xdead_0000_0000_0000;

impl World {
    /// Draws this request's operator verify and bit rot (no draw for seeds without them).
    pub(super) fn maybe_verify_or_rot(&mut self) {
        let f = self.cfg.faults.clone();
        if f.verify_ppm > 0 && self.rng.gen_range(0..1_000_000) < f.verify_ppm {
            let n = self.geo.extent_count();
            let first = self.rng.gen_range(0..n);
            let end = self.rng.gen_range(first + 1..=n);
            let repair = self.rng.gen_bool(0.5);
            if !self.start_verify(first..end, repair) && self.rng.gen_bool(0.3) {
                // One runs: the operator cancels it instead.
                let (a, now) = (self.active, self.now);
                if self.primary(a).is_some_and(|p| p.cancel_verify(now)) {
                    self.report.verifies_cancelled += 1;
                    self.drain_actions(a);
                }
            }
        }
        if f.bit_rot_ppm > 0 && self.rng.gen_range(0..1_000_000) < f.bit_rot_ppm {
            let b = OTHER[self.active];
            let block = self.rng.gen_range(0..self.sites[b].media.blocks());
            self.rot_block(b, block);
        }
    }

    fn start_verify(&mut self, extents: std::ops::Range<u64>, repair: bool) -> bool {
        let a = self.active;
        let now = self.now;
        let Some(p) = self.primary(a) else { return false };
        match p.start_verify(now, VerifyRequest { extents, repair }) {
            Ok(()) => {
                self.report.verifies += 1;
                self.drain_actions(a);
                true
            }
            Err(VerifyRefused::Running { .. } | VerifyRefused::Fenced) => false,
            Err(e) => {
                self.violate("verify", format!("a valid verify was refused: {e}"));
                false
            }
        }
    }

    /// The disk of site `s` changes block `block` by itself, durably.
    fn rot_block(&mut self, s: SiteId, block: usize) {
        self.rot_count += 1;
        let stamp = ROT_STAMP + self.rot_count;
        self.sites[s].media.rot(block, stamp);
        self.rotted.insert(block);
        self.report.rotted_blocks += 1;
        if self.cfg.trace {
            eprintln!("{:>9}    bit rot: site {s} block {block}", self.now.0);
        }
    }

    /// Whether block `b` is exempt from O2 and O3 (rot reached it).
    pub(super) fn rotted(&self, b: usize) -> bool {
        self.rotted.contains(&b)
    }

    /// O9 (a), after every event.
    pub(super) fn check_o9(&mut self) {
        let a = self.active;
        let Some(Machine::Primary(p)) = &self.sites[a].core else { return };
        let Some(v) = p.verify_status() else { return };
        let per_extent = (self.geo.extent_bytes() / BLOCK) as usize;
        let false_find = v.found.keys().find(|e| !(0..per_extent).any(|i| self.rotted.contains(&(e.0 as usize * per_extent + i))));
        if let Some(e) = false_find {
            let e = e.0;
            self.violate("O9", format!("verify reported extent {e} different, but no rot reached it"));
            return;
        }
        // (c) A difference the primary knows and no resync has started to copy: its peer's
        // durable state must not call the image consistent.
        let unrepaired = p.verify_unrepaired().iter().next().copied();
        let b = OTHER[a];
        if let Some(e) = unrepaired {
            if matches!(self.sites[b].core, Some(Machine::Secondary(_))) && self.sites[b].store.durable().consistent {
                self.violate("O9", format!("verify found extent {} different, but the secondary's store calls its image consistent", e.0));
            }
        }
    }

    /// At the end of a run with verifies or rot, once the primary is drained: a verify of the
    /// whole volume without repair (its findings wait, as DRBD's out-of-sync bits do), then
    /// one with repair. True when one was started (the run goes on until it ends).
    pub(super) fn final_verify(&mut self) -> bool {
        let f = &self.cfg.faults;
        if self.final_verifies == 2 || (f.verify_ppm == 0 && f.bit_rot_ppm == 0) || !self.report.violations.is_empty() {
            return false;
        }
        let a = self.active;
        let drained = matches!(&self.sites[a].core, Some(Machine::Primary(p)) if p.is_drained());
        if !drained {
            return false;
        }
        let now = self.now;
        if let Some(p) = self.primary(a) {
            // One the operator started may still run: it is stopped, and the whole volume checked.
            p.cancel_verify(now);
        }
        self.drain_actions(a);
        self.final_verifies += 1;
        let n = self.geo.extent_count();
        self.start_verify(0..n, self.final_verifies == 2)
    }
}
