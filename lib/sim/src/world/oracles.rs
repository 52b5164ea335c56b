//! The oracles (docs/architecture.md, "The oracles"), and the host's record of what it was told that they judge by.
//!
//! Owns: `HostView`; O1 (what the host was acknowledged is on the primary, survives a crash
//! as far as flushes made it durable, and is lost at a promotion only inside the durable
//! record), O2 (invariant R, on synced store contents), O3 (a consistent secondary is a
//! prefix of the primary's history), save-aside, and the checks at the end of a run (O4, O6).
//! O5 is checked where the media is written (`shells.rs`), O7 in `amnesia.rs`. Before them,
//! after every event (`check_every_event`, on for every seed), each core's own
//! `check_invariants` (through `Machine`), reported under its own name, "invariants", so
//! that a bookkeeping bug is named at the step that made it.
//! Must not: ask the core whether it is right; only the host's view, the media and the
//! synced store count for the oracles (the core's self-check is no oracle's evidence).

use super::{Scenario, SiteId, World, OTHER};
use crate::media::BLOCK;
use geomirror_core::{ExtentId, Machine, Role};
use std::collections::BTreeSet;

/// The host's record of what it was told: kept outside the system under test.
pub(super) struct HostView {
    /// Acknowledged values of each block, oldest first; index 0 is the value at the last
    /// baseline (start, restart or promotion).
    pub(super) history: Vec<Vec<u64>>,
    /// Index into `history[b]` of the value a completed flush made durable.
    pub(super) flushed: Vec<usize>,
    /// Blocks whose value is unknown (a write failed after it may have reached media).
    pub(super) indeterminate: Vec<bool>,
    /// Per block, the host's writes in flight that cover it.
    pub(super) busy: Vec<u32>,
}

impl HostView {
    pub(super) fn new(blocks: usize) -> HostView {
        HostView { history: vec![vec![0]; blocks], flushed: vec![0; blocks], indeterminate: vec![false; blocks], busy: vec![0; blocks] }
    }
    pub(super) fn current(&self, b: usize) -> u64 {
        *self.history[b].last().expect("never empty")
    }
    /// A new baseline: the host takes `image` as what each block holds.
    pub(super) fn rebase(&mut self, image: &[u64]) {
        for (b, v) in image.iter().enumerate() {
            self.history[b] = vec![*v];
            self.flushed[b] = 0;
            self.indeterminate[b] = false;
        }
    }
}

impl World {
    // ----- the oracles, after every event -----

    /// The oracles checked after every event.
    pub(super) fn check_all(&mut self) {
        self.check_invariants();
        self.watch_amnesia();
        if self.amnesia.iter().all(Option::is_none) {
            self.check_r();
        }
        self.check_o7();
        self.check_o8();
        self.check_o9();
        self.check_o1();
        self.check_o3();
        self.check_save_aside();
    }

    /// The cores' own invariants (`check_invariants`), in every build: a broken one is a bug
    /// in the core, named at the step that broke it, before any oracle sees its effect.
    fn check_invariants(&mut self) {
        for s in 0..2 {
            let broken = self.sites[s].core.as_ref().and_then(|c| {
                let role = match c.role() {
                    Role::Primary => "primary",
                    Role::Secondary => "secondary",
                };
                c.check_invariants().err().map(|e| format!("{role} (site {s}): {e}"))
            });
            if let Some(detail) = broken {
                self.violate("invariants", detail);
                return;
            }
        }
    }

    /// O2, invariant R: every extent where the media may differ is in a durable record (or a
    /// durable dirty map, which in predictive mode exists only after a degrade or promotion).
    /// Judged on synced store contents only, for every combination of what a crash would keep.
    fn check_r(&mut self) {
        let (sa, sb) = (&self.sites[0], &self.sites[1]);
        let mut covered: BTreeSet<u64> = BTreeSet::new();
        for s in [sa, sb] {
            covered.extend(s.store.durable().record.keys().map(|e| e.0));
            covered.extend(s.store.durable().dirty.iter().map(|e| e.0));
        }
        let per_extent = (self.geo.extent_bytes() / BLOCK) as usize;
        let images = [
            (sa.media.current(), sb.media.current()),
            (sa.media.durable(), sb.media.durable()),
            (sa.media.current(), sb.media.durable()),
            (sa.media.durable(), sb.media.current()),
        ];
        let mut bad = None;
        'outer: for (x, y) in images {
            if x == y {
                continue;
            }
            for (i, (p, q)) in x.iter().zip(y.iter()).enumerate() {
                if p != q && !covered.contains(&((i / per_extent) as u64)) && !self.rotted(i) {
                    let e = i / per_extent;
                    bad = Some(format!(
                        "block {i} (extent {e}) differs between the sites ({p} vs {q}) but no durable record or dirty map holds extent {e}"
                    ));
                    break 'outer;
                }
            }
        }
        if let Some(detail) = bad {
            self.violate("O2", detail);
        }
    }

    /// O1 while the primary lives: what the host was acknowledged is on the primary's media.
    fn check_o1(&mut self) {
        let a = self.active;
        // A site whose store or media a fault took is not the primary that acknowledged the
        // host's writes; the host finds them on its peer (checked at the promotion).
        if !self.is_primary(a) || self.amnesia[a].is_some_and(|w| w.blanked) {
            return;
        }
        let img = self.sites[a].media.current();
        for (b, v) in img.iter().enumerate() {
            if self.host.busy[b] == 0 && !self.host.indeterminate[b] && *v != self.host.current(b) {
                let want = self.host.current(b);
                self.violate("O1", format!("primary block {b} holds {v} but the host was acknowledged {want}"));
                return;
            }
        }
    }

    /// O3: a consistent secondary image equals the primary's history up to the last write
    /// it applied.
    fn check_o3(&mut self) {
        let a = self.active;
        let b = OTHER[a];
        // A store a fault took back in time claims what it no longer knows until the
        // handshake finds it out, and a primary's may hand out sequence numbers again (the
        // history the model replays is then ambiguous) until it steps down: see `amnesia.rs`.
        let consistent = self.sites[b].store.durable().consistent
            && matches!(self.sites[b].core, Some(Machine::Secondary(_)))
            && self.amnesia.iter().all(Option::is_none);
        if !consistent || !self.sites[b].was_consistent {
            self.sites[b].was_consistent = consistent && self.sites[b].core.is_some();
            return;
        }
        let k = self.last_applied_write[b];
        if k == 0 {
            return;
        }
        let model = self.model_at(a, k);
        let img = self.sites[b].media.current();
        if let Some(i) = (0..img.len()).find(|i| img[*i] != model[*i] && !self.rotted(*i)) {
            self.violate(
                "O3",
                format!(
                    "secondary image is not a prefix of the history at seq {k}: block {i} holds {} where the history has {}",
                    img[i], model[i]
                ),
            );
        }
    }

    /// The image site `s`'s history gives at sequence `k`: the base of the incarnation that
    /// issued `k`, plus that incarnation's writes through `k`.
    fn model_at(&mut self, s: SiteId, k: u64) -> Vec<u64> {
        let (base_idx, base_seq) =
            self.bases[s].iter().enumerate().filter(|(_, (b, _))| *b <= k).map(|(i, (b, _))| (i, *b)).next_back().unwrap_or((0, 0));
        let (from, mut img) = match self.model_cache.take() {
            Some((cs, ci, ck, img)) if cs == s && ci == base_idx && ck <= k => (ck, img),
            _ => (base_seq, self.bases[s][base_idx].1.clone()),
        };
        if from < k {
            for (_, (first, stamps)) in self.history[s].range(from + 1..=k) {
                img[*first..*first + stamps.len()].copy_from_slice(stamps);
            }
        }
        self.model_cache = Some((s, base_idx, k, img.clone()));
        img
    }

    /// O1 across a primary crash: what survived (`image`) must be at least what a flush made
    /// durable. False when it is not (the run ends).
    pub(super) fn check_o1_after_crash(&mut self, s: SiteId, image: &[u64]) -> bool {
        for (b, v) in image.iter().enumerate() {
            if self.host.indeterminate[b] || self.amnesia[s].is_some() {
                continue;
            }
            if !self.host.history[b][self.host.flushed[b]..].contains(v) {
                self.violate(
                    "O1",
                    format!(
                        "block {b} lost flushed data in a primary crash: holds {v}, flushed history {:?}",
                        &self.host.history[b][self.host.flushed[b]..]
                    ),
                );
                return false;
            }
        }
        true
    }

    /// O1 when the host moves to promoted site `s`, whose media holds `image`: what the host
    /// lost must lie in the record the promotion found (counted and reported), or, `planned`
    /// (a switchover), nothing at all. False when it does not (the run ends).
    pub(super) fn check_o1_after_switch(&mut self, s: SiteId, image: &[u64], planned: bool) -> bool {
        if !planned {
            let mut lost = 0;
            for (b, v) in image.iter().enumerate() {
                if self.host.indeterminate[b] || self.host.busy[b] > 0 {
                    continue;
                }
                if *v != self.host.current(b) {
                    let e = ExtentId(b as u64 * BLOCK / self.geo.extent_bytes());
                    // A site whose store went back, promoted before any handshake could find it
                    // out (its only witness, the primary, was lost too): it cannot know what it
                    // lost. The old primary finds out when it returns (`promoted_from`), and
                    // its failback saves aside whatever differs; O7 and O4 hold it to that.
                    let unknowing = self.amnesia[s].is_some_and(|w| !w.flagged);
                    match &self.promoted_record {
                        _ if unknowing => lost += 1,
                        Some(r) if r.contains(&e) => lost += 1,
                        Some(_) => {
                            self.violate("O1", format!("after promotion block {b} (extent {}) holds {v}, host was acked {}, and the extent is not in the durable record", e.0, self.host.current(b)));
                            return false;
                        }
                        None => lost += 1, // reported loudly at promotion
                    }
                }
            }
            self.report.lost_acked_blocks_reported += lost;
        } else if (0..image.len()).any(|b| !self.host.indeterminate[b] && self.host.busy[b] == 0 && image[b] != self.host.current(b)) {
            self.violate("O1", "switchover lost acknowledged data".into());
            return false;
        }
        true
    }

    /// A demoted site saves aside what it held before the failback overwrites it: checked
    /// when it becomes consistent again.
    fn check_save_aside(&mut self) {
        for s in 0..2 {
            let consistent = self.sites[s].store.durable().consistent;
            let Some(pre) = self.sites[s].pre_demotion.clone() else {
                continue;
            };
            if !consistent || !matches!(self.sites[s].core, Some(Machine::Secondary(_))) {
                continue;
            }
            let per_extent = (self.geo.extent_bytes() / BLOCK) as usize;
            let img = self.sites[s].media.current().to_vec();
            for e in 0..self.geo.extent_count() as usize {
                let (f, n) = (e * per_extent, per_extent.min(pre.len() - e * per_extent));
                if pre[f..f + n] == img[f..f + n] {
                    continue;
                }
                // Changed since demotion: its old content must be saved, unless that content
                // was already on the winning side's history (nothing of the loser's own).
                if let Some(saved) = self.sites[s].side.get(&ExtentId(e as u64)) {
                    if saved[..] != pre[f..f + n] {
                        self.violate("save-aside", format!("site {s} saved extent {e} with content other than it held at demotion"));
                        return;
                    }
                } else if self.rogue_extents.contains(&ExtentId(e as u64)) {
                    self.violate("save-aside", format!("site {s} overwrote extent {e}, written while split, without saving it aside"));
                    return;
                }
            }
            self.sites[s].pre_demotion = None;
        }
    }

    // ----- at the end of a run -----

    /// O4 and O6 once the faults have stopped and the sites had time to drain: both up, the
    /// active site primary and drained, the images identical, the record within its capacity,
    /// and what the split brain's loser wrote saved aside. Fills in the report from the
    /// primary's statistics.
    pub(super) fn final_checks(&mut self) {
        let a = self.active;
        let b = OTHER[a];
        if self.sites.iter().any(|s| s.core.is_none()) {
            self.violate("O6", "a site is still down after faults stopped".into());
            return;
        }
        let (stats, drained, split, copy_len) = match &self.sites[a].core {
            Some(Machine::Primary(p)) => (p.stats().clone(), p.is_drained(), p.split_brain(), p.record_copy().len() as u64),
            _ => {
                self.violate("O6", "the active site is not primary at the end".into());
                return;
            }
        };
        if split {
            self.violate("O6", "split brain still held at the end".into());
            return;
        }
        self.report.hits = stats.hits;
        self.report.misses = stats.misses;
        self.report.resyncs = stats.resyncs_started;
        self.report.evicted_generations = stats.evicted_generations;
        self.report.degraded_writes = stats.degraded_writes;
        self.report.failback_bytes = stats.resync_bytes_copied;
        self.report.verify_found = stats.verify_extents_found;
        self.report.final_record_len = copy_len;
        self.report.scenario_done = self.cfg.scenario == Scenario::Steady || self.stage.finished();
        if !drained {
            self.violate("O6", format!("not drained after faults stopped: lag {} bytes, {} writes waiting", stats.lag_bytes, stats.writes));
            return;
        }
        // O4: byte-identical images once drained.
        if self.sites[a].media.current() != self.sites[b].media.current() {
            let diff = (0..self.sites[a].media.blocks()).find(|i| self.sites[a].media.current()[*i] != self.sites[b].media.current()[*i]);
            self.violate("O4", format!("images differ after drain, first at block {diff:?}"));
            return;
        }
        let cap = self.cfg.core.record_capacity_extents;
        // The record stays within its capacity, or one write's span when a single write is
        // larger than the whole capacity (the largest write here is twice `write_bytes`).
        let span = (2 * self.cfg.write_bytes).div_ceil(self.cfg.extent_bytes) + 1;
        if self.cfg.core.mode == geomirror_core::Mode::Predictive && self.report.max_record_len > cap.max(span) {
            self.violate("record", format!("record reached {} extents, capacity {cap}", self.report.max_record_len));
            return;
        }
        if self.cfg.core.mode == geomirror_core::Mode::Predictive && copy_len > cap {
            self.violate("O6", format!("record holds {copy_len} extents after faults stopped, capacity {cap}"));
            return;
        }
        if self.cfg.scenario == Scenario::SplitBrain && self.report.split_brains_detected > 0 {
            let old = OTHER[self.active];
            for e in &self.rogue_extents {
                if !self.sites[old].side.contains_key(e) && self.sites[old].pre_demotion.is_some() {
                    let r = self.geo.extent_range(*e);
                    let pre = self.sites[old].pre_demotion.as_ref().expect("checked");
                    let (f, n) = ((r.start / BLOCK) as usize, ((r.end - r.start) / BLOCK) as usize);
                    if pre[f..f + n] != self.sites[old].media.current()[f..f + n] {
                        self.violate(
                            "split-brain",
                            format!("extent {} written on the losing side was overwritten without being saved aside", e.0),
                        );
                        return;
                    }
                }
            }
        }
    }
}
