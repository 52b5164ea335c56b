//! Deliberate bugs for the mutation tests, compiled only with the `mutations` feature.
//!
//! Owns: per-thread switches that the state machines consult at the places where a
//! bug would break invariant R or prefix consistency. Must not: be enabled in any build
//! that serves hosts; the feature exists so the simulation can prove its oracles can fail.

use std::cell::Cell;

/// One deliberate bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The secondary answers a record update before its store is durable.
    AckBeforeDurable,
    /// The primary evicts generations whose extents are still dirty.
    EvictDirty,
    /// The secondary applies data in arrival order instead of sequence order.
    ApplyOutOfOrder,
    /// A failback check finds every extent equal, whatever the content.
    VerifyAlwaysEqual,
    /// The primary withdraws local dirty-map coverage from extents a waiting write needs.
    UndirtyWaiting,
    /// A failback check that finds an extent differing reports one differing block too few
    /// (the lowest), so the primary copies the rest and leaves that block stale.
    DiffersDropsBlock,
    /// Both sites skip the amnesia checks: a store that lost acknowledged state, or came back
    /// with another identity, is trusted as the store it was.
    TrustAmnesiac,
    /// The primary lets a write rest on a record answer before its memory of the peer holds
    /// that answer durably: after its crash, a secondary store gone back to before the
    /// answer is not found out.
    LazyPeerMemory,
    /// The primary counts each item it ships one byte short in its data window: caught by
    /// `check_invariants` at once, long before the window's drift could show.
    MiscountWindow,
    /// A secondary told at the hello that its primary owes it a full verified resync does not
    /// mark itself an amnesiac then, only when the resync's first item applies: until then a
    /// promotion without force calls its image consistent.
    UnmarkedAtHello,
    /// A full verified resync's sweep skips the volume's last extent and ends as if it had
    /// checked it.
    SweepSkipsLast,
    /// A full resync's sync mark follows the sweep alone, ahead of extents whose checks are
    /// unanswered or whose differing blocks are not yet copied: a resumed sweep skips them.
    MarkAheadOfChecks,
    /// An online verify's reads do not hold host writes to their extent (nor wait for local
    /// writes busy on it): a check can compare a write the peer has not yet applied.
    VerifyUnordered,
    /// A secondary whose check finds an extent different outside any resync keeps calling
    /// its image consistent.
    VerifyLeavesConsistent,
    /// `verify --repair` finds differences but never copies them.
    VerifyRepairSkipped,
    /// A primary resuming the full resync it owes ignores the peer's sync cursor and sweeps
    /// from the first extent again (correct, but unbounded: not the sync replay window).
    ResumeFromStart,
}

thread_local! {
    static ACTIVE: Cell<Option<Mutation>> = const { Cell::new(None) };
}

/// Switches a mutation on for this thread (None switches all off).
pub fn set(m: Option<Mutation>) {
    ACTIVE.with(|a| a.set(m));
}

pub(crate) fn ack_before_durable() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::AckBeforeDurable))
}

pub(crate) fn evict_dirty() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::EvictDirty))
}

pub(crate) fn apply_out_of_order() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::ApplyOutOfOrder))
}

pub(crate) fn verify_always_equal() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::VerifyAlwaysEqual))
}

pub(crate) fn undirty_waiting() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::UndirtyWaiting))
}

/// `differing` with its lowest set bit cleared while `DiffersDropsBlock` is on.
pub(crate) fn differs_drops_block(mut differing: Vec<u8>) -> Vec<u8> {
    if ACTIVE.with(|a| a.get() == Some(Mutation::DiffersDropsBlock)) {
        if let Some(b) = differing.iter_mut().find(|b| **b != 0) {
            *b &= *b - 1;
        }
    }
    differing
}

pub(crate) fn lazy_peer_memory() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::LazyPeerMemory))
}

pub(crate) fn miscount_window() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::MiscountWindow))
}

pub(crate) fn trust_amnesiac() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::TrustAmnesiac))
}

pub(crate) fn unmarked_at_hello() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::UnmarkedAtHello))
}

pub(crate) fn sweep_skips_last() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::SweepSkipsLast))
}

pub(crate) fn mark_ahead_of_checks() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::MarkAheadOfChecks))
}

pub(crate) fn verify_unordered() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::VerifyUnordered))
}

pub(crate) fn verify_leaves_consistent() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::VerifyLeavesConsistent))
}

pub(crate) fn verify_repair_skipped() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::VerifyRepairSkipped))
}

pub(crate) fn resume_from_start() -> bool {
    ACTIVE.with(|a| a.get() == Some(Mutation::ResumeFromStart))
}
