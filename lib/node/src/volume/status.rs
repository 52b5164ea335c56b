//! A volume's status: the snapshot operators, tests and metrics read.
//!
//! Owns: `VolumeStatus`, its phase, and reading them off the core's state machine.
//!
//! Must not: change the machine; a status is read on the driver's thread between inputs.

use geomirror_core::{Epoch, LinkState, Machine, Phase, Role, Seq, Time};

/// What a volume is doing: a primary's phase, or secondary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumePhase {
    /// A primary persisting its new incarnation (after a start or a promotion): writes wait.
    Starting,
    Serving,
    /// A primary's new writes wait, for a switchover or a demotion.
    Draining,
    /// A primary that found a newer epoch: every write fails while it demotes itself.
    Fenced,
    Secondary,
}

impl VolumePhase {
    /// Its name in the admin API's status and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumePhase::Starting => "starting",
            VolumePhase::Serving => "serving",
            VolumePhase::Draining => "draining",
            VolumePhase::Fenced => "fenced",
            VolumePhase::Secondary => "secondary",
        }
    }
}

impl From<Phase> for VolumePhase {
    fn from(p: Phase) -> VolumePhase {
        match p {
            Phase::Starting => VolumePhase::Starting,
            Phase::Serving => VolumePhase::Serving,
            Phase::Draining => VolumePhase::Draining,
            Phase::Fenced => VolumePhase::Fenced,
        }
    }
}

/// A snapshot of a volume for status, tests and metrics.
#[derive(Clone, Debug)]
pub struct VolumeStatus {
    pub role: Role,
    pub epoch: Epoch,
    pub phase: VolumePhase,
    /// Primary: the link has finished its handshake. Secondary: a primary is connected.
    pub link_up: bool,
    /// Primary: nothing waits, is in flight or unapplied; both images hold the same data.
    pub drained: bool,
    /// Primary: highest sequence the peer has durably applied. Secondary: its own.
    pub durable_applied: Seq,
    /// Extents in the record (the primary's copy, or the secondary's durable record).
    pub record_extents: u64,
    pub extent_bytes: u64,
    /// Secondary: the record covers every difference (no degrade since the last resync).
    /// Primary: no local dirty map outside the peer's record.
    pub authoritative: bool,
    /// Secondary: its image is a prefix of the primary's history (not mid-resync).
    pub consistent: bool,
    pub split_brain: bool,
    /// Primary: bytes written and not yet durably applied on the peer.
    pub lag_bytes: u64,
    /// Primary: age of the oldest write the peer may lack (the RPO now), in milliseconds.
    pub lag_ms: u64,
    /// Primary: what a failover now would copy back to this site afterwards.
    pub failback_debt_bytes: u64,
    /// Primary: what a resync onto the peer still has to copy (failback progress).
    pub resync_remaining_bytes: u64,
    pub resync_in_progress: bool,
    pub resync_bytes_copied: u64,
    /// Primary: failback extents checked by digest instead of copied, in bytes and extents,
    /// and how many of those the peer found different (copied after all).
    pub resync_bytes_verified: u64,
    pub resync_extents_verified: u64,
    pub resync_extents_mismatched: u64,
    pub writes: u64,
    pub hits: u64,
    pub misses: u64,
    pub record_updates: u64,
    pub record_rtt_avg_us: u64,
    /// Secondary: extents saved aside before a resync overwrote them.
    pub extents_saved_aside: u64,
    pub failed: bool,
    /// The record's bound (`record_capacity_extents`).
    pub record_capacity_extents: u64,
    /// This site's store identity, and its peer's as remembered (None before the first
    /// handshake of a new pair).
    pub store_id: geomirror_core::StoreId,
    pub peer_store: Option<geomirror_core::StoreId>,
    /// Secondary: this store lost state it had acknowledged and is not trusted until a full
    /// verified resync ends. Primary: the peer's store is such an amnesiac, and is owed that
    /// resync.
    pub amnesiac: bool,
    /// Why the last handshake found a store an amnesiac, when it did.
    pub amnesia_reason: Option<String>,
    /// Primary: the full resync under way, as extents checked of the volume's.
    pub full_resync: Option<(u64, u64)>,
    /// Primary: the full resync's bytes left to check or copy, and the time left at its rate
    /// so far.
    pub full_resync_left: Option<(u64, Option<std::time::Duration>)>,
    /// Secondary: the full resync's durable sync cursor (extents below it are synced; a
    /// resumed resync starts there). Primary: the extent the full resync under way resumed
    /// at, when it did.
    pub sync_cursor: Option<u64>,
    /// Primary: the last online verify (running or done), and extents found different by a
    /// verify that no resync has copied yet.
    pub verify: Option<geomirror_core::VerifyStatus>,
    pub verify_unrepaired: u64,
    /// Primary: the peer store a full sync waits for an operator's approval onto.
    pub rebuild_pending: Option<geomirror_core::StoreId>,
    /// The state machine's own counters, whole, for metrics.
    pub primary_stats: Option<geomirror_core::stats::PrimaryStats>,
    pub secondary_stats: Option<geomirror_core::stats::SecondaryStats>,
}

/// The status of `machine` at `now`, on a volume that has `failed` or not.
pub(super) fn of(machine: &Machine, now: Time, failed: bool, extent_bytes: u64, record_capacity_extents: u64) -> VolumeStatus {
    match machine {
        Machine::Primary(p) => {
            let st = p.stats();
            VolumeStatus {
                role: Role::Primary,
                epoch: p.epoch(),
                phase: p.phase().into(),
                link_up: p.link() == LinkState::Up,
                drained: p.is_drained(),
                durable_applied: p.applied_ack(),
                record_extents: p.record_copy().len() as u64,
                extent_bytes,
                authoritative: p.local_dirty().is_empty() && !p.full_resync_owed(),
                consistent: true,
                split_brain: p.split_brain(),
                lag_bytes: st.lag_bytes,
                lag_ms: p.behind_since().map_or(0, |t| now.since(t).as_millis() as u64),
                failback_debt_bytes: p.failback_debt().bytes,
                resync_remaining_bytes: p.resync_plan().bytes,
                resync_in_progress: p.resync_in_progress(),
                resync_bytes_copied: st.resync_bytes_copied,
                resync_bytes_verified: st.resync_bytes_verified,
                resync_extents_verified: st.resync_extents_verified,
                resync_extents_mismatched: st.resync_extents_mismatched,
                writes: st.writes,
                hits: st.hits,
                misses: st.misses,
                record_updates: st.record_updates_sent,
                record_rtt_avg_us: st.record_rtt_us_total.checked_div(st.record_rtt_count).unwrap_or(0),
                extents_saved_aside: 0,
                failed,
                record_capacity_extents,
                store_id: p.store_id(),
                peer_store: p.peer_store(),
                amnesiac: p.full_resync_owed(),
                amnesia_reason: p.peer_amnesia().map(str::to_owned),
                full_resync: p.full_resync_progress(),
                full_resync_left: p.full_resync_left(now),
                sync_cursor: (p.full_resync_progress().is_some() && st.full_resync_resumed_at > 0).then_some(st.full_resync_resumed_at),
                verify: p.verify_status(),
                verify_unrepaired: p.verify_unrepaired().len() as u64,
                rebuild_pending: p.rebuild_pending(),
                primary_stats: Some(st.clone()),
                secondary_stats: None,
            }
        }
        Machine::Secondary(s) => {
            let st = s.stats();
            VolumeStatus {
                role: Role::Secondary,
                epoch: s.epoch(),
                phase: VolumePhase::Secondary,
                link_up: s.is_connected(),
                drained: false,
                durable_applied: s.durable_applied(),
                record_extents: s.record().len() as u64,
                extent_bytes,
                authoritative: s.is_authoritative(),
                consistent: s.is_consistent(),
                split_brain: s.split_brain_evidence(),
                lag_bytes: 0,
                lag_ms: 0,
                failback_debt_bytes: 0,
                resync_remaining_bytes: 0,
                resync_in_progress: false,
                resync_bytes_copied: 0,
                resync_bytes_verified: 0,
                resync_extents_verified: 0,
                resync_extents_mismatched: 0,
                writes: 0,
                hits: 0,
                misses: 0,
                record_updates: st.record_updates,
                record_rtt_avg_us: 0,
                extents_saved_aside: st.extents_saved_aside,
                failed,
                record_capacity_extents,
                store_id: s.store_id(),
                peer_store: s.peer_store(),
                amnesiac: s.is_amnesiac(),
                amnesia_reason: s.amnesia_reason().map(str::to_owned),
                full_resync: None,
                full_resync_left: None,
                sync_cursor: s.sync_cursor().map(|c| c.next),
                verify: None,
                verify_unrepaired: 0,
                rebuild_pending: None,
                primary_stats: None,
                secondary_stats: Some(st.clone()),
            }
        }
    }
}
