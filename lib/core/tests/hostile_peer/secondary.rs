//! A secondary in a session with the input as its primary.
//!
//! Owns: the mini shell around a `Secondary` (its handshake, completions of stores, media
//! syncs and failback checks, reconnects) and one step of the input against it.
//! Must not: complete anything the input did not choose to complete.

use super::frames::from_peer;
use super::shell::{action_bound, drain, later, may_reconnect};
use super::{config, geometry, Input, PRIMARY_STORE, SECONDARY_STORE};
use geomirror_core::frame::{Frame, LinkLossPolicy, Role};
use geomirror_core::{CoreConfig, Geometry, Secondary, SiteState, Time, Token};
use std::collections::VecDeque;
use std::time::Duration;

/// A secondary connected to the input, its handshake done.
pub struct SecondarySite {
    pub site: Secondary,
    cfg: CoreConfig,
    geo: Geometry,
    now: Time,
    persists: VecDeque<Token>,
    syncs: VecDeque<Token>,
    verifies: VecDeque<(Token, usize)>,
    reconnects: u32,
    /// Every frame the site sent, and why it closed connections, for the tests to read.
    pub sent: Vec<Frame>,
    pub disconnects: Vec<String>,
}

impl SecondarySite {
    pub fn new() -> SecondarySite {
        SecondarySite::with(config(), geometry())
    }

    pub fn with(cfg: CoreConfig, geo: Geometry) -> SecondarySite {
        let state = SiteState::fresh(Role::Secondary, SECONDARY_STORE);
        let mut s = SecondarySite {
            site: Secondary::new(cfg.clone(), geo, &state),
            cfg,
            geo,
            now: Time(1_000_000),
            persists: VecDeque::new(),
            syncs: VecDeque::new(),
            verifies: VecDeque::new(),
            reconnects: 0,
            sent: Vec::new(),
            disconnects: Vec::new(),
        };
        s.settle();
        s.handshake();
        assert!(s.sent.iter().any(|f| matches!(f, Frame::Welcome { .. })), "the handshake ends with a welcome");
        s
    }

    /// The primary's side of a handshake: connect, hello, and every store completed, so that
    /// the welcome has gone out.
    pub fn handshake(&mut self) {
        self.site.handle_connected(self.now);
        self.settle();
        let hello = Frame::Hello {
            epoch: self.site.epoch(),
            role: Role::Primary,
            volume_bytes: self.geo.volume_bytes(),
            extent_bytes: self.geo.extent_bytes(),
            on_link_loss: LinkLossPolicy::Block,
            authoritative: true,
            wrote_alone: false,
            store: PRIMARY_STORE,
            remembers: None,
            promoted_from: None,
            owes_full_resync: false,
        };
        self.site.handle_frame(self.now, hello);
        self.settle();
        self.complete_persists(usize::MAX);
    }

    /// Drains the site's actions, checking their number against what it held before.
    fn settle_from(&mut self, items_held: u64) {
        let d = drain(|| self.site.poll_action());
        let bound = action_bound(items_held, self.geo.extent_count());
        assert!(d.count <= bound, "one step emitted {} actions, more than {bound}", d.count);
        self.persists.extend(d.persists);
        self.syncs.extend(d.syncs);
        self.verifies.extend(d.verifies);
        self.sent.extend(d.sent);
        self.disconnects.extend(d.disconnects);
        let stats = self.site.stats();
        assert!(stats.reorder_bytes <= self.cfg.reorder_buffer_bytes, "the reorder buffer holds {} bytes", stats.reorder_bytes);
        assert!(self.site.record().len() as u64 <= self.geo.extent_count());
    }

    fn settle(&mut self) {
        let held = self.held();
        self.settle_from(held);
    }

    fn held(&self) -> u64 {
        self.site.stats().reorder_bytes / 64
    }

    /// Gives the site one input at the current time, then drains what it emitted, bounded by
    /// what it held before plus `extra` items the input brings.
    fn with_site(&mut self, extra: u64, f: impl FnOnce(&mut Secondary, Time)) {
        let held = self.held() + extra;
        f(&mut self.site, self.now);
        self.settle_from(held);
    }

    pub fn deliver(&mut self, f: Frame) {
        self.with_site(1, |s, now| s.handle_frame(now, f));
    }

    pub fn complete_persists(&mut self, n: usize) {
        for _ in 0..n {
            let Some(t) = self.persists.pop_front() else { return };
            self.with_site(0, |s, now| s.handle_persisted(now, t));
        }
    }

    fn complete_syncs(&mut self) {
        while let Some(t) = self.syncs.pop_front() {
            self.with_site(0, |s, now| s.handle_media_synced(now, t));
        }
    }

    /// Pending store batches (not yet reported durable).
    pub fn pending_persists(&self) -> usize {
        self.persists.len()
    }

    /// A new connection on which the primary has sent nothing yet.
    pub fn reconnect_without_hello(&mut self) {
        self.site.handle_disconnected(self.now);
        self.site.handle_connected(self.now);
        self.settle();
    }

    /// The transport reports the connection closed, and the primary connects again.
    pub fn reconnect(&mut self) {
        self.site.handle_disconnected(self.now);
        self.settle();
        self.now = self.now + Duration::from_millis(5);
        self.handshake();
    }

    /// Runs one step of the input; false when the input is spent.
    pub fn step(&mut self, input: &mut Input) -> bool {
        if input.is_empty() {
            return false;
        }
        match input.below(12) {
            k @ 0..=6 => {
                let built = (k < 6).then(|| (self.site.epoch(), self.site.applied().0 + 1));
                if let Some(f) = from_peer(input, built, &[]) {
                    self.deliver(f);
                }
            }
            7 => {
                let n = 1 + input.below(4) as usize;
                self.complete_persists(n);
            }
            8 => self.complete_syncs(),
            9 => {
                if let Some((t, n)) = self.verifies.pop_front() {
                    let bitmap = if input.bool() { vec![0; n.div_ceil(8)] } else { vec![input.u8(); n.div_ceil(8)] };
                    let held = self.held();
                    let now = self.now;
                    self.site.handle_verified(now, t, bitmap);
                    self.settle_from(held);
                }
            }
            10 => {
                let now = later(&mut self.now, input);
                let held = self.held();
                self.site.handle_timeout(now);
                self.settle_from(held);
            }
            // The transport closes the connection (the site asked, or the link broke).
            _ if may_reconnect(&mut self.reconnects) => self.reconnect(),
            _ => return false,
        }
        true
    }
}
