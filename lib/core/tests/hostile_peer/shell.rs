//! What one step of a site emitted, and how much it may emit.
//!
//! Owns: draining a state machine's actions into what the mini shells act on, the bound on
//! their number that every step is held to, and the two steps both shells take alike (time
//! passing, and a reconnection within the input's budget).
//! Must not: act on the actions; each site's shell does.

use super::{Input, MAX_RECONNECTS};
use geomirror_core::{Action, ExtentId, Frame, Time, Token};
use std::time::Duration;

/// What the site emitted in one step, sorted the way the shell would act on it.
#[derive(Default)]
pub(super) struct Drained {
    pub(super) count: usize,
    pub(super) sent: Vec<Frame>,
    pub(super) persists: Vec<Token>,
    pub(super) syncs: Vec<Token>,
    pub(super) disconnects: Vec<String>,
    pub(super) role_changed: bool,
    pub(super) verifies: Vec<(Token, usize)>,
    pub(super) reads: Vec<(Token, ExtentId)>,
    pub(super) local_writes: Vec<Token>,
}

pub(super) fn drain(mut next: impl FnMut() -> Option<Action>) -> Drained {
    let mut d = Drained::default();
    while let Some(a) = next() {
        d.count += 1;
        match a {
            Action::Send { frame, .. } => d.sent.push(frame),
            Action::Persist { token, .. } => d.persists.push(token),
            Action::SyncMedia { token } => d.syncs.push(token),
            Action::Disconnect { reason } => d.disconnects.push(reason),
            Action::RoleChanged { .. } => d.role_changed = true,
            Action::VerifyExtent { token, digests, .. } => d.verifies.push((token, digests.len())),
            Action::ReadExtent { token, extent } => d.reads.push((token, extent)),
            Action::LocalWrite { token, .. } => d.local_writes.push(token),
            Action::ApplyWrite { .. } | Action::SaveAside { .. } | Action::Ack { .. } => {}
        }
    }
    d
}

/// Most actions one step may emit, given what the site held before it: a frame may release
/// every item the site buffered (each item a media write and a save-aside per extent it
/// touches, plus stores and syncs), a snapshot of the whole record, and answers to every
/// queued record frame, but nothing in proportion to what the frame claims.
pub(super) fn action_bound(items_held: u64, extents: u64) -> usize {
    let per_item = extents + 4;
    ((items_held + 2) * per_item + 4 * geomirror_core::secondary::MAX_QUEUED_RECORD_FRAMES as u64 + 4 * extents + 64) as usize
}

/// Time passes, by up to 5 s as the input says: the new time.
pub(super) fn later(now: &mut Time, input: &mut Input) -> Time {
    *now = *now + Duration::from_millis(input.below(5000));
    *now
}

/// Counts one more reconnection; false once the input has spent them all.
pub(super) fn may_reconnect(reconnects: &mut u32) -> bool {
    if *reconnects >= MAX_RECONNECTS {
        return false;
    }
    *reconnects += 1;
    true
}
