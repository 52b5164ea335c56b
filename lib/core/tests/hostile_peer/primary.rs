//! A serving primary in a session with the input as its secondary (and its host).
//!
//! Owns: the mini shell around a `Primary` (the secondary's side of its handshake, host
//! requests, completions of stores, local writes, media syncs and reads, reconnects) and one
//! step of the input against it.
//! Must not: complete anything the input did not choose to complete.

use super::frames::{from_peer, write_op};
use super::shell::{action_bound, drain, later, may_reconnect};
use super::{config, geometry, Input, EXTENTS, EXTENT_BYTES, PRIMARY_STORE, SECONDARY_STORE};
use bytes::Bytes;
use geomirror_core::frame::{Frame, LinkLossPolicy, Remembered, Role};
use geomirror_core::{ExtentId, Generation, Primary, RequestId, Seq, SiteState, Time, Token, WriteOp};
use std::collections::VecDeque;
use std::time::Duration;

/// A primary serving, connected to the input, its handshake done.
pub struct PrimarySite {
    pub site: Primary,
    now: Time,
    persists: VecDeque<Token>,
    syncs: VecDeque<Token>,
    reads: VecDeque<(Token, ExtentId)>,
    local_writes: VecDeque<Token>,
    /// Record updates sent on this connection, by id, for answers that match.
    update_ids: Vec<u64>,
    /// Highest data item sent, and highest position acknowledged to the site.
    shipped: u64,
    acknowledged: u64,
    next_request: u64,
    reconnects: u32,
    /// Demoted or fenced: the shell would rebuild the machine; the run ends.
    pub ended: bool,
    pub sent: Vec<Frame>,
    pub disconnects: Vec<String>,
}

impl PrimarySite {
    pub fn new() -> PrimarySite {
        let state = SiteState::fresh(Role::Primary, PRIMARY_STORE);
        let now = Time(1_000_000);
        let mut p = PrimarySite {
            site: Primary::new(config(), geometry(), &state, now),
            now,
            persists: VecDeque::new(),
            syncs: VecDeque::new(),
            reads: VecDeque::new(),
            local_writes: VecDeque::new(),
            update_ids: Vec::new(),
            shipped: 0,
            acknowledged: 0,
            next_request: 1,
            reconnects: 0,
            ended: false,
            sent: Vec::new(),
            disconnects: Vec::new(),
        };
        p.settle();
        p.complete_persists(usize::MAX);
        p.handshake();
        p
    }

    /// The secondary's side of a handshake: hello, welcome at the position acknowledged so
    /// far, an empty snapshot, and every store completed.
    pub fn handshake(&mut self) {
        self.handshake_until(3);
    }

    /// The first `n` frames of the secondary's side of a handshake: hello, welcome, snapshot end.
    fn handshake_until(&mut self, n: usize) {
        self.site.handle_connected(self.now);
        self.settle();
        self.update_ids.clear();
        let epoch = self.site.epoch();
        let remembers = (self.reconnects > 0).then_some(Remembered { store: PRIMARY_STORE, applied: Seq(0), generation: Generation(0) });
        let frames = [
            Frame::Hello {
                epoch,
                role: Role::Secondary,
                volume_bytes: EXTENTS * EXTENT_BYTES,
                extent_bytes: EXTENT_BYTES,
                on_link_loss: LinkLossPolicy::Block,
                authoritative: true,
                wrote_alone: false,
                store: SECONDARY_STORE,
                remembers,
                promoted_from: None,
                owes_full_resync: false,
            },
            Frame::Welcome {
                epoch,
                applied: Seq(self.acknowledged),
                consistent: true,
                authoritative: true,
                store: SECONDARY_STORE,
                next_generation: Generation(1 << 20),
                amnesiac: false,
                sync_cursor: None,
            },
            Frame::SnapshotEnd { epoch, record_len: 0 },
        ];
        for f in frames.into_iter().take(n) {
            self.deliver(f);
        }
        self.complete_persists(usize::MAX);
    }

    fn held(&self) -> u64 {
        // Buffered items (each at least 64 bytes), host requests outstanding, reads.
        self.site.stats().lag_bytes / 64 + self.next_request + self.reads.len() as u64
    }

    fn settle_from(&mut self, items_held: u64) {
        let d = drain(|| self.site.poll_action());
        let bound = action_bound(items_held, EXTENTS);
        assert!(d.count <= bound, "one step emitted {} actions, more than {bound}", d.count);
        for f in &d.sent {
            match f {
                Frame::RecordUpdate { id, .. } => self.update_ids.push(*id),
                Frame::Data { seq, .. } => self.shipped = self.shipped.max(seq.0),
                _ => {}
            }
        }
        self.sent.extend(d.sent);
        self.persists.extend(d.persists);
        self.syncs.extend(d.syncs);
        self.reads.extend(d.reads);
        self.local_writes.extend(d.local_writes);
        self.disconnects.extend(d.disconnects);
        self.ended |= d.role_changed;
        assert!(self.site.record_copy().len() as u64 <= EXTENTS);
    }

    fn settle(&mut self) {
        let held = self.held();
        self.settle_from(held);
    }

    pub fn deliver(&mut self, f: Frame) {
        if let Frame::Applied { through, .. } = &f {
            if through.0 <= self.shipped {
                self.acknowledged = self.acknowledged.max(through.0);
            }
        }
        self.with_site(0, |p, now| p.handle_frame(now, f));
    }

    /// Gives the site one input at the current time, then drains what it emitted, bounded by
    /// what it held before plus `extra` items the input brings.
    fn with_site(&mut self, extra: u64, f: impl FnOnce(&mut Primary, Time)) {
        let held = self.held() + extra;
        f(&mut self.site, self.now);
        self.settle_from(held);
    }

    pub fn complete_persists(&mut self, n: usize) {
        for _ in 0..n {
            let Some(t) = self.persists.pop_front() else { return };
            self.with_site(0, |p, now| p.handle_persisted(now, t));
        }
    }

    /// A host write; its actions are drained.
    pub fn host_write(&mut self, op: WriteOp) {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        self.with_site(1, |p, now| p.handle_host_write(now, request, op, false));
    }

    pub fn reconnect(&mut self) {
        self.site.handle_disconnected(self.now);
        self.settle();
        self.now = self.now + Duration::from_millis(5);
        self.handshake();
    }

    /// A new connection where the secondary has welcomed the primary and not yet sent its
    /// snapshot: the link is in its handshake, taking record and divergent chunks.
    pub fn reconnect_without_snapshot(&mut self) {
        self.site.handle_disconnected(self.now);
        self.settle();
        self.handshake_until(2);
    }

    pub fn step(&mut self, input: &mut Input) -> bool {
        if input.is_empty() || self.ended {
            return false;
        }
        let held = self.held();
        let now = self.now;
        match input.below(16) {
            k @ 0..=6 => {
                let built = (k < 6).then(|| (self.site.epoch(), if input.bool() { self.shipped } else { self.acknowledged + 1 }));
                if let Some(f) = from_peer(input, built, &self.update_ids) {
                    self.deliver(f);
                }
            }
            7 => {
                // An answer that names exactly what an update asked for, so that writes get
                // through and data flows.
                if let Some(Frame::RecordUpdate { id, missed, .. }) =
                    self.sent.iter().rev().find(|f| matches!(f, Frame::RecordUpdate { id, .. } if self.update_ids.contains(id))).cloned()
                {
                    let f = Frame::RecordAnswer { epoch: self.site.epoch(), id, generation: Generation(input.below(64)), added: missed };
                    self.deliver(f);
                }
            }
            8 => {
                let request = RequestId(self.next_request);
                self.next_request += 1;
                let op = write_op(input);
                let fua = input.below(4) == 0;
                self.site.handle_host_write(now, request, op, fua);
                self.settle_from(held + 1);
            }
            9 => {
                let request = RequestId(self.next_request);
                self.next_request += 1;
                self.site.handle_host_flush(now, request);
                self.settle_from(held + 1);
            }
            10 => {
                let n = 1 + input.below(4) as usize;
                self.complete_persists(n);
            }
            11 => {
                let ok = input.below(8) != 0;
                while let Some(t) = self.local_writes.pop_front() {
                    self.site.handle_local_write_done(now, t, ok);
                }
                while let Some(t) = self.syncs.pop_front() {
                    self.site.handle_media_synced(now, t);
                }
                self.settle_from(held);
            }
            12 => {
                if let Some((t, e)) = self.reads.pop_front() {
                    let g = geometry();
                    let len = if e.0 < EXTENTS { g.extent_range(e).end - g.extent_range(e).start } else { 0 };
                    // A short read sometimes: the rest reads as zeros.
                    let n = if input.below(4) == 0 { input.below(len + 1) } else { len };
                    self.site.handle_read_done(now, t, Bytes::from(vec![input.u8(); n as usize]));
                    self.settle_from(held);
                }
            }
            13 => {
                // Applied through what was shipped: a return message an honest peer could send.
                let f = Frame::Applied { epoch: self.site.epoch(), through: Seq(self.shipped) };
                self.deliver(f);
            }
            14 => {
                let now = later(&mut self.now, input);
                self.site.handle_timeout(now);
                self.settle_from(held);
            }
            _ if may_reconnect(&mut self.reconnects) => self.reconnect(),
            _ => return false,
        }
        true
    }
}
