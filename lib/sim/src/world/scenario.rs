//! The scenario script: what happens at the middle of a run, run as an operator would run
//! it, and the random faults drawn around it.
//!
//! Owns: the scenarios (failover, split brain, switchover), the stages a drill goes through
//! and its steps, the random faults (link cuts, crashes; store faults are `amnesia.rs`'s),
//! promotion as an operator does it, and the operator on call who resolves a held split brain.
//! Must not: judge the outcome; the oracles do, from what the host and the media show.

use super::{Ev, SiteId, World, OTHER};
use geomirror_core::{ExtentId, LinkState, Machine, RequestId};
use rand::Rng;
use std::collections::BTreeSet;
use std::time::Duration;

/// What happens at the middle of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Faults only.
    Steady,
    /// `kill -9` the primary, promote the secondary, restart the old primary, fail back.
    Failover,
    /// Cut the link, promote the secondary, write on both, heal, detect, resolve.
    SplitBrain,
    /// Drain, demote the primary, promote the secondary, carry on: zero loss.
    Switchover,
}

/// How far the scenario's drill has come. A steady run stays `NotStarted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// The run has not reached its middle yet, or a switchover could not start its drain and
    /// the operator tries again.
    NotStarted,
    /// The operator's drill is running, up to the promoted site serving the host: random
    /// faults wait, a crashed site stays down until the drill brings it back, and the operator
    /// who recovers a lost primary stands aside.
    Underway,
    /// The promoted site serves the host; the rest is up to the sites (a failover's old
    /// primary restarts and fails back; after a split brain, the old primary joins or the
    /// split brain is detected). Random faults still wait.
    Promoted,
    /// The drill is over, or was given up (a crash during a switchover's drain): random
    /// faults resume.
    Over,
}

impl Stage {
    /// The drill is in progress: random faults wait, and a crashed site is not restarted
    /// unless the drill does it.
    fn choreographed(self) -> bool {
        matches!(self, Stage::Underway | Stage::Promoted)
    }

    /// The drill got as far as it goes: the promoted site serves, or the drill is over (or
    /// was given up). The report counts the scenario as done.
    pub(super) fn finished(self) -> bool {
        matches!(self, Stage::Promoted | Stage::Over)
    }
}

/// The operator's next step in a drill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Failover and split brain: promote the secondary (a failover kills the old primary
    /// again first if it came back). Switchover: promote the secondary once the primary has
    /// stepped down.
    Promote,
    /// Point the host at the promoted site once it serves.
    MoveHost,
    /// Split brain: a writer that still reaches the old primary writes there.
    RogueWrites,
    /// Split brain: heal the link.
    Heal,
    /// Split brain: wait until the old primary joins as a secondary or the split brain is
    /// detected.
    Settle,
    /// Switchover: wait for the primary to drain, then demote it.
    DemoteDrained,
}

impl World {
    /// Draws the random faults of one host request (none while a drill is in progress).
    pub(super) fn maybe_fault(&mut self) {
        let f = self.cfg.faults.clone();
        if self.stage.choreographed() {
            return; // the scenario is choreographed; random faults resume after it
        }
        if self.rng.gen_range(0..1_000_000) < f.link_cut_ppm && !self.cut {
            self.cut_link("link cut", 150_000);
        }
        if self.rng.gen_range(0..1_000_000) < f.crash_primary_ppm {
            let a = self.active;
            let d = self.us(0, 2_000);
            self.schedule(d, Ev::Crash { site: a });
        }
        if self.rng.gen_range(0..1_000_000) < f.crash_secondary_ppm {
            let b = OTHER[self.active];
            let d = self.us(0, 2_000);
            self.schedule(d, Ev::Crash { site: b });
        }
        self.maybe_store_fault();
        self.maybe_cut_mid_sync();
        self.maybe_verify_or_rot();
    }

    /// Cuts the link; it heals by itself after 1 ms to `heal_within_us`.
    pub(super) fn cut_link(&mut self, what: &str, heal_within_us: u64) {
        if self.cfg.trace {
            eprintln!("{:>9}    {what}", self.now.0);
        }
        self.report.link_cuts += 1;
        self.cut = true;
        self.cut_id += 1;
        self.disconnect(false);
        let d = self.us(1_000, heal_within_us);
        let cut_id = self.cut_id;
        self.schedule(d, Ev::Heal { cut_id });
    }

    // ----- the scenario, as an operator would run it -----

    /// Whether a site that crashed now restarts by itself: not while a drill is in progress
    /// (the drill restarts it), unless the run is ending.
    pub(super) fn restarts_after_crash(&self) -> bool {
        self.cfg.scenario == Scenario::Steady || !self.stage.choreographed() || self.quiescing
    }

    /// The middle of the run: the operator begins the scenario's drill.
    pub(super) fn scenario_start(&mut self) {
        if self.stage != Stage::NotStarted {
            return;
        }
        self.stage = Stage::Underway;
        let a = self.active;
        match self.cfg.scenario {
            Scenario::Steady => {}
            Scenario::Failover => {
                // kill -9 the primary; restart it only after the promotion.
                self.schedule(Duration::from_micros(1), Ev::Crash { site: a });
                self.schedule(Duration::from_millis(2), Ev::Step(Step::Promote));
            }
            Scenario::SplitBrain => {
                self.cut = true;
                self.cut_id += 1;
                self.report.link_cuts += 1;
                self.disconnect(false);
                self.schedule(Duration::from_millis(2), Ev::Step(Step::Promote));
            }
            Scenario::Switchover => {
                let started = match self.primary(a) {
                    Some(p) => p.begin_drain().is_ok(),
                    None => false,
                };
                if !started {
                    // Not serving yet (restarting) or down: the operator tries again shortly.
                    self.stage = Stage::NotStarted;
                    self.schedule(Duration::from_millis(2), Ev::Scenario);
                    return;
                }
                self.schedule(Duration::from_millis(1), Ev::Step(Step::DemoteDrained));
            }
        }
    }

    /// One step of the drill; a step whose moment has not come yet tries again shortly.
    pub(super) fn scenario_step(&mut self, step: Step) {
        let a = self.active;
        let b = OTHER[a];
        match (self.cfg.scenario, step) {
            (Scenario::Failover, Step::Promote) if self.sites[a].core.is_some() => {
                // The old primary came back before the promotion (a restart scheduled by an
                // earlier fault): kill it again, as the drill does.
                self.schedule(Duration::from_micros(1), Ev::Crash { site: a });
                self.schedule(Duration::from_millis(2), Ev::Step(Step::Promote));
            }
            (Scenario::Failover | Scenario::SplitBrain, Step::Promote) => {
                // Promote the secondary. It may be down itself; the operator retries.
                if self.sites[b].core.is_none() {
                    self.schedule(Duration::from_millis(5), Ev::Restart { site: b });
                    self.schedule(Duration::from_millis(10), Ev::Step(Step::Promote));
                    return;
                }
                self.promote(b, false);
                self.schedule(Duration::from_millis(3), Ev::Step(Step::MoveHost));
            }
            (Scenario::Failover | Scenario::SplitBrain, Step::MoveHost) => {
                if !self.is_primary(b) {
                    self.schedule(Duration::from_millis(2), Ev::Step(Step::MoveHost));
                    return;
                }
                self.switch_host_to(b, false);
                if self.cfg.scenario == Scenario::SplitBrain {
                    // A writer that still reaches the old primary keeps writing there.
                    if self.sites[a].core.is_none() {
                        self.schedule(Duration::from_millis(1), Ev::Restart { site: a });
                    }
                    self.schedule(Duration::from_millis(2), Ev::Step(Step::RogueWrites));
                } else {
                    let d = self.us(5_000, 40_000);
                    self.schedule(d, Ev::Restart { site: a });
                    self.stage = Stage::Promoted;
                }
            }
            (Scenario::SplitBrain, Step::RogueWrites) => {
                let old = OTHER[self.active];
                if self.is_primary(old) {
                    for _ in 0..4 {
                        if let Some(op) = self.next_op() {
                            let r = RequestId(self.next_request);
                            self.next_request += 1;
                            self.issue_write(old, r, op, true);
                        }
                    }
                }
                self.schedule(Duration::from_millis(30), Ev::Step(Step::Heal));
            }
            (Scenario::SplitBrain, Step::Heal) => {
                let cut_id = self.cut_id;
                self.schedule(Duration::from_micros(1), Ev::Heal { cut_id });
                self.stage = Stage::Promoted;
                self.schedule(Duration::from_millis(50), Ev::Step(Step::Settle));
            }
            (Scenario::SplitBrain, Step::Settle) => {
                // The old primary either joins as an ordinary secondary (it acknowledged
                // nothing alone) or the split brain is held for the operator (see `operator`).
                let new = self.active;
                let old = OTHER[new];
                let joined = matches!(&self.sites[old].core, Some(Machine::Secondary(_)))
                    && matches!(&self.sites[new].core, Some(Machine::Primary(p)) if p.link() == LinkState::Up);
                if joined || self.report.split_brains_detected > 0 {
                    self.stage = Stage::Over;
                } else {
                    self.schedule(Duration::from_millis(10), Ev::Step(Step::Settle));
                }
            }
            (Scenario::Switchover, Step::DemoteDrained) => {
                let drained = matches!(&self.sites[a].core, Some(Machine::Primary(p)) if p.is_drained());
                if !drained {
                    if self.sites[a].core.is_none() || self.sites[b].core.is_none() || !self.is_primary(a) {
                        // A crash during the drain (or the primary stepped down: its store was
                        // lost): give up the switchover, as an operator would.
                        let now = self.now;
                        if let Some(p) = self.primary(a) {
                            p.end_drain(now);
                        }
                        self.drain_actions(a);
                        for s in [a, b] {
                            if self.sites[s].core.is_none() {
                                self.schedule(Duration::from_millis(5), Ev::Restart { site: s });
                            }
                        }
                        self.stage = Stage::Over;
                        return;
                    }
                    self.schedule(Duration::from_millis(1), Ev::Step(Step::DemoteDrained));
                    return;
                }
                let equal = self.sites[a].media.current() == self.sites[b].media.current();
                if !equal {
                    self.violate("O4", "switchover: drained primary and secondary differ".into());
                    return;
                }
                if let Some(p) = self.primary(a) {
                    if p.demote().is_err() {
                        self.violate("switchover", "drained primary refused to demote".into());
                        return;
                    }
                }
                self.drain_actions(a);
                self.schedule(Duration::from_millis(2), Ev::Step(Step::Promote));
            }
            (Scenario::Switchover, Step::Promote) => {
                if self.is_primary(a) {
                    self.schedule(Duration::from_millis(1), Ev::Step(Step::Promote));
                    return;
                }
                self.promote(b, true);
                self.report.switchovers += 1;
                self.schedule(Duration::from_millis(2), Ev::Step(Step::MoveHost));
            }
            (Scenario::Switchover, Step::MoveHost) => {
                if !self.is_primary(b) {
                    self.schedule(Duration::from_millis(1), Ev::Step(Step::MoveHost));
                    return;
                }
                self.switch_host_to(b, true);
                self.disconnect(true);
                self.stage = Stage::Over;
            }
            _ => {}
        }
    }

    /// The operator on call: a held split brain must be reported on both sides; then the
    /// operator keeps the promoted site's data and the loser is failed back with save-aside.
    pub(super) fn operator(&mut self) {
        self.recover_primary();
        let new = self.active;
        let old = OTHER[new];
        let held = matches!(&self.sites[new].core, Some(Machine::Primary(p)) if p.split_brain());
        if !held {
            return;
        }
        let evidence = matches!(&self.sites[old].core, Some(Machine::Secondary(x)) if x.split_brain_evidence());
        if !evidence {
            self.violate("split-brain", "held by the primary but not reported by its peer".into());
            return;
        }
        self.report.split_brains_detected += 1;
        let now = self.now;
        if let Some(p) = self.primary(new) {
            p.resolve_split_brain(now);
        }
        self.drain_actions(new);
    }

    fn promote(&mut self, s: SiteId, force: bool) {
        if let Err(e) = self.try_promote(s, force) {
            self.violate("promote", format!("promotion refused: {e}"));
        }
    }

    /// Promotes site `s` as an operator would: an amnesiac is refused, and the operator, whose
    /// primary is gone, forces it (the promotion is then loud).
    pub(super) fn try_promote(&mut self, s: SiteId, force: bool) -> Result<(), geomirror_core::PromoteError> {
        let record: BTreeSet<ExtentId> = self.sites[s].store.durable().record.keys().copied().collect();
        let dirty: BTreeSet<ExtentId> = self.sites[s].store.durable().dirty.clone();
        let res = match &mut self.sites[s].core {
            Some(Machine::Secondary(x)) => match x.promote(force) {
                Err(geomirror_core::PromoteError::Amnesiac | geomirror_core::PromoteError::NeverPaired) => x.promote(true),
                other => other,
            },
            _ => return Ok(()),
        };
        match res {
            Ok(report) => {
                self.report.promotions += 1;
                self.forget_sync_owed(s);
                if !report.authoritative || !report.consistent || report.amnesiac {
                    self.report.loud_promotions += 1;
                    self.promoted_record = None;
                } else {
                    let mut r = record;
                    r.extend(dirty);
                    self.promoted_record = Some(r);
                }
            }
            Err(e) => return Err(e),
        }
        self.drain_actions(s);
        // Idempotence: promoting again while it is persisted is refused, not repeated.
        if let Some(Machine::Secondary(x)) = &mut self.sites[s].core {
            if x.promote(true).is_ok() {
                self.violate("promote", "a second promotion was accepted".into());
            }
        }
        Ok(())
    }
}
