//! The simulated host: the writes and flushes it issues to the active site, and what it
//! was told about them.
//!
//! Owns: the host's requests in flight (a host never has two overlapping writes in flight),
//! the stamps its writes carry, what it makes of each answer (recorded in `HostView`, which
//! the oracles judge the sites against), and its moves: to a promoted site, and past a crash.
//! Must not: read the sites' media to decide what it was told; it knows only the answers.

use super::{Ev, Scenario, SiteId, World, OTHER};
use crate::media::{encode_stamps, BLOCK};
use crate::workload::{HostOp, OpKind};
use geomirror_core::{ExtentId, HostError, Machine, RequestId, WriteOp};
use rand::Rng;
use std::time::Duration;

/// A host request in flight.
#[derive(Clone, Debug)]
pub(super) struct Outstanding {
    site: SiteId,
    /// None for a flush.
    write: Option<(usize, Vec<u64>)>,
    /// Written on the old primary while split: the host does not count on it.
    pub(super) rogue: bool,
    flush_marks: Option<Vec<usize>>,
    /// For a write issued while the link was up: what must stay unchanged for a `LinkDown`
    /// failure to be a liveness bug (see `Calm`).
    calm: Option<Calm>,
}

/// The state at a write's issue that excuses its failing with `LinkDown` if it changes: the
/// link went down or came back, writes were throttled (a full lag can hold one past the
/// deadline), a resync started, or a miss waited for room in a full record.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Calm {
    link_changes: u64,
    throttled_writes: u64,
    resyncs_started: u64,
    record_full_waits: u64,
}

impl World {
    pub(super) fn host_issue(&mut self) {
        if self.quiescing || self.issued >= self.cfg.writes {
            return;
        }
        let site = self.active;
        if !self.is_primary(site) {
            // No primary to talk to (crashed, or promotion pending): try again later.
            let d = self.us(1_000, 5_000);
            self.schedule(d, Ev::HostIssue);
            return;
        }
        self.issued += 1;
        self.maybe_fault();
        if self.issued == self.cfg.writes / 2 && self.cfg.scenario != Scenario::Steady {
            self.schedule(Duration::from_micros(1), Ev::Scenario);
        }
        let request = RequestId(self.next_request);
        self.next_request += 1;
        if self.rng.gen_range(0..1_000_000) < self.cfg.faults.flush_ppm {
            let marks: Vec<usize> = (0..self.host.history.len()).map(|b| self.host.history[b].len() - 1).collect();
            self.outstanding.insert(request, Outstanding { site, write: None, rogue: false, flush_marks: Some(marks), calm: None });
            self.with_core(site, |c, now| {
                if let Machine::Primary(p) = c {
                    p.handle_host_flush(now, request)
                }
            });
            return;
        }
        let op = self.next_op();
        let Some(op) = op else {
            self.schedule(Duration::from_micros(200), Ev::HostIssue);
            return;
        };
        self.issue_write(site, request, op, false);
    }

    pub(super) fn next_op(&mut self) -> Option<HostOp> {
        for _ in 0..8 {
            let op = match &self.cfg.ops {
                Some(ops) => {
                    let op = ops[self.ops_cursor % ops.len()];
                    self.ops_cursor += 1;
                    op
                }
                None => self.generator.next(&mut self.rng),
            };
            let first = (op.offset / BLOCK) as usize;
            let n = (op.len / BLOCK) as usize;
            // A host never has two overlapping writes in flight (as with fio's verify).
            if (first..first + n).all(|b| self.host.busy[b] == 0) {
                return Some(op);
            }
        }
        None
    }

    pub(super) fn issue_write(&mut self, site: SiteId, request: RequestId, op: HostOp, rogue: bool) {
        let first = (op.offset / BLOCK) as usize;
        let n = (op.len / BLOCK) as usize;
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let stamps: Vec<u64> = match op.kind {
            OpKind::Write => (0..n as u64).map(|i| (stamp << 16) | (i & 0xffff)).collect(),
            OpKind::Zero | OpKind::Trim => vec![0; n],
        };
        let wop = match op.kind {
            OpKind::Write => WriteOp::data(op.offset, encode_stamps(&stamps)),
            OpKind::Zero => WriteOp::zero(op.offset, op.len),
            OpKind::Trim => WriteOp::trim(op.offset, op.len),
        };
        for b in first..first + n {
            self.host.busy[b] += 1;
        }
        let calm = self.calm(site);
        self.outstanding.insert(request, Outstanding { site, write: Some((first, stamps)), rogue, flush_marks: None, calm });
        let fua = self.rng.gen_range(0..50) == 0;
        self.with_core(site, |c, now| {
            if let Machine::Primary(p) = c {
                p.handle_host_write(now, request, wop, fua)
            }
        });
    }

    /// The state a write's `LinkDown` failure is judged against, when the link is up now.
    fn calm(&self, s: SiteId) -> Option<Calm> {
        let Some(Machine::Primary(p)) = &self.sites[s].core else { return None };
        (self.link_up && p.link() == geomirror_core::LinkState::Up).then(|| {
            let st = p.stats();
            Calm {
                link_changes: self.link_changes,
                throttled_writes: st.throttled_writes,
                resyncs_started: st.resyncs_started,
                record_full_waits: st.record_full_waits,
            }
        })
    }

    pub(super) fn on_ack(&mut self, s: SiteId, request: RequestId, result: Result<(), HostError>) {
        if self.abandoned.remove(&request) {
            return;
        }
        let Some(o) = self.outstanding.remove(&request) else {
            self.violate("host", format!("ack for unknown request {request:?} from site {s}"));
            return;
        };
        if o.site != s {
            self.violate("host", format!("request {request:?} sent to site {} acked by site {s}", o.site));
            return;
        }
        // Liveness: a write issued on an up link, which stayed up, fails only for a reason
        // (throttling, a resync, a full record). Without one, it was starved.
        if result == Err(HostError::LinkDown) && o.calm.is_some() && o.calm == self.calm(s) {
            self.violate(
                "liveness",
                format!("write {request:?} failed with LinkDown although the link stayed up and nothing held it back"),
            );
            return;
        }
        match (&o.write, result) {
            (Some((first, stamps)), res) => {
                for (i, v) in stamps.iter().enumerate() {
                    let b = first + i;
                    self.host.busy[b] -= 1;
                    if o.rogue {
                        continue;
                    }
                    match res {
                        Ok(()) => {
                            self.host.history[b].push(*v);
                            self.host.indeterminate[b] = false;
                        }
                        // Never dispatched: the block must keep its old value.
                        Err(HostError::LinkDown) | Err(HostError::OutOfRange) | Err(HostError::NotServing) => {}
                        // It may be on media: a possible value from now on, and unknown until
                        // the next acknowledged write (which a crash may still undo).
                        Err(_) => {
                            self.host.history[b].push(*v);
                            self.host.indeterminate[b] = true;
                        }
                    }
                }
                if o.rogue {
                    if res.is_ok() {
                        let exts = self.geo.extents_of((*first as u64) * BLOCK, stamps.len() as u64 * BLOCK);
                        self.rogue_extents.extend(exts.map(ExtentId));
                    }
                } else if res.is_ok() {
                    self.report.writes_acked += 1;
                    if let Some(p) = self.primary(s) {
                        let len = p.record_copy().len() as u64;
                        self.report.max_record_len = self.report.max_record_len.max(len);
                        let t = self.now.0;
                        self.report.record_samples.push((t, len));
                    }
                } else {
                    self.report.writes_failed += 1;
                }
            }
            (None, Ok(())) => {
                self.report.flushes_acked += 1;
                if let Some(marks) = &o.flush_marks {
                    for (b, m) in marks.iter().enumerate() {
                        if *m < self.host.history[b].len() {
                            self.host.flushed[b] = self.host.flushed[b].max(*m);
                        }
                    }
                }
            }
            (None, Err(_)) => {}
        }
        if !o.rogue {
            let d = if result == Err(HostError::NotServing) {
                // Refused during a switchover's drain: the host retries later, and the refused
                // request does not count against the workload.
                self.issued -= 1;
                Duration::from_millis(1)
            } else {
                self.us(10, 500)
            };
            self.schedule(d, Ev::HostIssue);
        }
    }

    /// The host's side of site `s` crashing: its requests there fail, and their blocks may
    /// or may not have landed. When it was the primary, the image that survived becomes the
    /// host's new baseline, once O1 has held it to what flushes made durable. False when O1
    /// failed (the run ends).
    pub(super) fn host_sees_crash(&mut self, s: SiteId) -> bool {
        let dead: Vec<RequestId> = self.outstanding.iter().filter(|(_, o)| o.site == s).map(|(r, _)| *r).collect();
        for r in dead {
            let o = self.outstanding.remove(&r).expect("present");
            if let Some((first, stamps)) = &o.write {
                for b in *first..*first + stamps.len() {
                    self.host.busy[b] -= 1;
                    if !o.rogue {
                        self.host.indeterminate[b] = true;
                    }
                }
            }
            self.schedule(Duration::from_micros(10), Ev::HostIssue);
        }
        // (A site whose store a fault took back may have lost what a flush made durable, and
        // one whose media was replaced holds none of the host's data: the host finds it on
        // the peer, checked at the promotion.)
        if s == self.active && !self.amnesia[s].is_some_and(|w| w.blanked) {
            let image = self.sites[s].media.current().to_vec();
            if !self.check_o1_after_crash(s, &image) {
                return false;
            }
            self.host.rebase(&image);
        }
        true
    }

    /// The host moves to the promoted site, once O1 has held the site to what the host was
    /// acknowledged.
    pub(super) fn switch_host_to(&mut self, s: SiteId, planned: bool) {
        let image = self.sites[s].media.current().to_vec();
        if !self.check_o1_after_switch(s, &image, planned) {
            return;
        }
        // Outstanding requests to the old site fail from the host's point of view.
        let old = OTHER[s];
        let stale: Vec<RequestId> = self.outstanding.iter().filter(|(_, o)| o.site == old && !o.rogue).map(|(r, _)| *r).collect();
        for r in stale {
            self.abandoned.insert(r);
            let o = self.outstanding.remove(&r).expect("present");
            if let Some((first, stamps)) = &o.write {
                for b in *first..*first + stamps.len() {
                    self.host.busy[b] -= 1;
                }
            }
            self.schedule(Duration::from_micros(10), Ev::HostIssue);
        }
        self.active = s;
        self.host.rebase(&image);
        // The host's data is on this site from now on, whatever a fault did to its media.
        if let Some(w) = &mut self.amnesia[s] {
            w.blanked = false;
        }
        for b in 0..image.len() {
            if self.host.busy[b] > 0 {
                self.host.indeterminate[b] = true;
            }
        }
    }
}
