//! The secondary's side of the handshake: a connection comes and goes, the primary's hello
//! is checked (geometry, roles, epoch, identity) and its epoch adopted, and the welcome with
//! the record snapshot answers it once what the hello changed is durable.
//!
//! Owns: `Conn`, the state of the connection to the primary; the hello's checks; epoch
//! adoption; the welcome, the record snapshot and the divergent extents sent with it.
//! Must not: send a snapshot while a record batch is being persisted (it could name an
//! eviction or addition that is not yet durable), or answer a second hello on one connection.

use super::{PersistKind, Secondary};
use crate::frame::{Frame, LinkLossPolicy, RecordEntries, Refusal, Remembered, Role, MAX_LIST_LEN};
use crate::ids::{Epoch, Generation, Seq, StoreId};
use crate::record::{to_runs, ExtentRun};
use crate::store::{Meta, StoreWrite};
use crate::time::Time;

/// The connection to the primary, as the handshake left it.
#[derive(Clone, Default)]
pub(super) struct Conn {
    pub(super) connected: bool,
    /// Peer's hello processed and welcome sent.
    pub(super) welcomed: bool,
    pub(super) welcome_due: bool,
    pub(super) peer_epoch: Option<Epoch>,
    /// When the link to the primary was lost; None while connected.
    pub(super) link_down_since: Option<Time>,
    /// The primary's hello on this connection was processed: a second one is refused.
    pub(super) hello_seen: bool,
}

/// A primary's hello, as `on_hello` reads it.
pub(super) struct PeerHello {
    epoch: Epoch,
    role: Role,
    volume_bytes: u64,
    extent_bytes: u64,
    policy: LinkLossPolicy,
    authoritative: bool,
    store: StoreId,
    remembers: Option<Remembered>,
    owes_full_resync: bool,
}

impl PeerHello {
    /// The hello's fields, when the frame is one.
    pub(super) fn of(frame: &Frame) -> Option<PeerHello> {
        match *frame {
            Frame::Hello {
                epoch,
                role,
                volume_bytes,
                extent_bytes,
                on_link_loss,
                authoritative,
                store,
                remembers,
                owes_full_resync,
                ..
            } => Some(PeerHello {
                epoch,
                role,
                volume_bytes,
                extent_bytes,
                policy: on_link_loss,
                authoritative,
                store,
                remembers,
                owes_full_resync,
            }),
            _ => None,
        }
    }
}

impl Secondary {
    pub fn handle_connected(&mut self, _now: Time) {
        self.conn.connected = true;
        self.conn.welcomed = false;
        self.conn.welcome_due = false;
        self.conn.hello_seen = false;
        self.send(Frame::Hello {
            epoch: self.epoch,
            role: Role::Secondary,
            volume_bytes: self.geo.volume_bytes(),
            extent_bytes: self.geo.extent_bytes(),
            on_link_loss: self.cfg.on_link_loss,
            authoritative: self.authoritative,
            wrote_alone: self.wrote_alone,
            store: self.store_id,
            remembers: self.peer.store.map(|store| Remembered { store, applied: Seq(0), generation: Generation(0) }),
            promoted_from: None,
            owes_full_resync: false,
        });
    }

    pub fn handle_disconnected(&mut self, now: Time) {
        self.conn.connected = false;
        self.conn.welcomed = false;
        self.conn.welcome_due = false;
        self.conn.link_down_since = Some(now);
        if self.cfg.record_update_timeout <= self.cfg.link_loss_detection_skew {
            self.lose_authority();
        }
        // Frames of a dead connection are not answered; the primary resends what matters.
        self.conn.hello_seen = false;
        self.records.queue.clear();
        self.ordered.reorder.clear();
        self.ordered.reorder_bytes = 0;
    }

    pub(super) fn on_hello(&mut self, hello: PeerHello) {
        let PeerHello { epoch, role, volume_bytes, extent_bytes, policy, authoritative, store, remembers, owes_full_resync } = hello;
        if volume_bytes != self.geo.volume_bytes() || extent_bytes != self.geo.extent_bytes() {
            self.refuse(Some(Refusal::Geometry), "peer volume geometry differs");
            return;
        }
        if role != Role::Primary {
            self.refuse(Some(Refusal::Roles), "both sites are secondaries");
            return;
        }
        if epoch < self.epoch {
            self.refuse(Some(Refusal::StaleEpoch), &format!("primary of stale epoch {} (this site is at {})", epoch.0, self.epoch.0));
            return;
        }
        if self.promoting {
            self.refuse(Some(Refusal::Roles), "this site is being promoted");
            return;
        }
        let mut batch = Vec::new();
        if self.check_identity(epoch, store, remembers, owes_full_resync, &mut batch).is_err() {
            return;
        }
        self.conn.peer_epoch = Some(epoch);
        self.conn.link_down_since = None;
        let degrades = policy == LinkLossPolicy::Degrade;
        if degrades != self.peer_may_degrade {
            self.peer_may_degrade = degrades;
            batch.push(StoreWrite::Meta(Meta::PeerMayDegrade(degrades)));
        }
        if epoch > self.epoch {
            self.epoch = epoch;
            batch.push(StoreWrite::Meta(Meta::Epoch(epoch)));
            // A primary of a newer epoch numbers its writes in a sequence space of its own:
            // what this site applied before counts nothing there. (A fenced or demoted site
            // starts its new epoch so already; a secondary that saw its peer promoted while it
            // was a secondary too, after the primary's store was lost, gets here. Kept, a
            // position above the new primary's numbers would make this site drop its writes
            // as already applied.) Its resync marker bridges the gap.
            if self.applied > Seq(0) || self.high_water > Seq(0) {
                self.applied = Seq(0);
                self.durable_applied = Seq(0);
                self.high_water = Seq(0);
                self.catch_up_to = None;
                batch.push(StoreWrite::Meta(Meta::Applied(Seq(0))));
                batch.push(StoreWrite::Meta(Meta::ApplyHighWater(Seq(0))));
            }
        }
        if !authoritative && self.authoritative {
            self.authoritative = false;
            batch.push(StoreWrite::Meta(Meta::Authoritative(false)));
        }
        self.conn.welcomed = false;
        if batch.is_empty() {
            self.conn.welcome_due = true;
        } else {
            self.persist(PersistKind::Handshake, batch);
        }
    }

    /// Welcome and snapshot, once nothing record-related is being persisted: a snapshot must
    /// never include an eviction or addition that is not yet durable.
    pub(super) fn send_welcome(&mut self) {
        if !self.conn.welcome_due || !self.conn.connected || self.records.persisting.is_some() {
            return;
        }
        self.conn.welcome_due = false;
        self.conn.welcomed = true;
        self.send(Frame::Welcome {
            epoch: self.epoch,
            applied: self.applied,
            consistent: self.consistent,
            authoritative: self.authoritative,
            store: self.store_id,
            next_generation: self.next_generation,
            amnesiac: self.amnesiac,
            sync_cursor: self.sync_cursor_for_welcome(),
        });
        let mut entries: Vec<RecordEntries> = Vec::new();
        for (e, g) in self.record.iter() {
            match entries.last_mut() {
                Some(last) if last.generation == g && last.run.start + last.run.len as u64 == e.0 && last.run.len < u32::MAX => {
                    last.run.len += 1
                }
                _ => entries.push(RecordEntries { run: ExtentRun { start: e.0, len: 1 }, generation: g }),
            }
        }
        for chunk in entries.chunks(MAX_LIST_LEN) {
            self.send(Frame::RecordChunk { epoch: self.epoch, entries: chunk.to_vec() });
        }
        let runs = to_runs(self.divergent.iter().copied());
        for chunk in runs.chunks(MAX_LIST_LEN) {
            self.send(Frame::DivergentChunk { epoch: self.epoch, extents: chunk.to_vec() });
        }
        self.send(Frame::SnapshotEnd { epoch: self.epoch, record_len: self.record.len() as u64 });
    }
}
