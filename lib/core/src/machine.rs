//! The state machine of a site's current role: a `Primary` or a `Secondary`, behind one
//! dispatch.
//!
//! Owns: choosing the role's machine from what the store holds (`Machine::new`), and passing
//! the inputs both roles take (`handle_*` and `poll_*`) to the one present. A completion only
//! one role asks for (a local write, a resync read, a failback check) reaches the machine of
//! that role; given to the other, it is stale (asked for by the machine a role change
//! replaced) and is dropped.
//!
//! Must not: decide anything itself. Every shell, the node's driver and the simulation's
//! sites, holds one of these so that neither repeats the dispatch. Inputs only one role
//! takes from the host or the operator (host writes and flushes, promotion, drains) are the
//! shell's to route, since what it answers at the other role is the shell's own.

use crate::{Action, CoreConfig, Epoch, Frame, Geometry, Primary, Role, Secondary, SiteState, Time, Token};
use bytes::Bytes;

/// A site's state machine for its current role. Boxed: both are large, and a shell moves
/// the enum when the role changes.
pub enum Machine {
    Primary(Box<Primary>),
    Secondary(Box<Secondary>),
}

impl Machine {
    /// The machine of the role the store holds, rebuilt from its state.
    pub fn new(cfg: CoreConfig, geo: Geometry, state: &SiteState, now: Time) -> Machine {
        match state.role {
            Role::Primary => Machine::Primary(Box::new(Primary::new(cfg, geo, state, now))),
            Role::Secondary => Machine::Secondary(Box::new(Secondary::new(cfg, geo, state))),
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Machine::Primary(_) => Role::Primary,
            Machine::Secondary(_) => Role::Secondary,
        }
    }

    pub fn epoch(&self) -> Epoch {
        match self {
            Machine::Primary(p) => p.epoch(),
            Machine::Secondary(s) => s.epoch(),
        }
    }

    pub fn primary(&self) -> Option<&Primary> {
        match self {
            Machine::Primary(p) => Some(p),
            Machine::Secondary(_) => None,
        }
    }

    pub fn primary_mut(&mut self) -> Option<&mut Primary> {
        match self {
            Machine::Primary(p) => Some(p),
            Machine::Secondary(_) => None,
        }
    }

    pub fn secondary(&self) -> Option<&Secondary> {
        match self {
            Machine::Secondary(s) => Some(s),
            Machine::Primary(_) => None,
        }
    }

    pub fn secondary_mut(&mut self) -> Option<&mut Secondary> {
        match self {
            Machine::Secondary(s) => Some(s),
            Machine::Primary(_) => None,
        }
    }

    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        match self {
            Machine::Primary(p) => p.poll_action(),
            Machine::Secondary(s) => s.poll_action(),
        }
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        match self {
            Machine::Primary(p) => p.poll_timeout(),
            Machine::Secondary(s) => s.poll_timeout(),
        }
    }

    /// The role's own invariants (`Primary::check_invariants`, `Secondary::check_invariants`):
    /// the first broken one, described.
    pub fn check_invariants(&self) -> Result<(), String> {
        match self {
            Machine::Primary(p) => p.check_invariants(),
            Machine::Secondary(s) => s.check_invariants(),
        }
    }

    pub fn handle_timeout(&mut self, now: Time) {
        match self {
            Machine::Primary(p) => p.handle_timeout(now),
            Machine::Secondary(s) => s.handle_timeout(now),
        }
    }

    pub fn handle_persisted(&mut self, now: Time, token: Token) {
        match self {
            Machine::Primary(p) => p.handle_persisted(now, token),
            Machine::Secondary(s) => s.handle_persisted(now, token),
        }
    }

    pub fn handle_media_synced(&mut self, now: Time, token: Token) {
        match self {
            Machine::Primary(p) => p.handle_media_synced(now, token),
            Machine::Secondary(s) => s.handle_media_synced(now, token),
        }
    }

    pub fn handle_connected(&mut self, now: Time) {
        match self {
            Machine::Primary(p) => p.handle_connected(now),
            Machine::Secondary(s) => s.handle_connected(now),
        }
    }

    pub fn handle_disconnected(&mut self, now: Time) {
        match self {
            Machine::Primary(p) => p.handle_disconnected(now),
            Machine::Secondary(s) => s.handle_disconnected(now),
        }
    }

    pub fn handle_frame(&mut self, now: Time, frame: Frame) {
        match self {
            Machine::Primary(p) => p.handle_frame(now, frame),
            Machine::Secondary(s) => s.handle_frame(now, frame),
        }
    }

    /// A primary's `LocalWrite` done; dropped by a secondary (see the module's note).
    pub fn handle_local_write_done(&mut self, now: Time, token: Token, ok: bool) {
        if let Machine::Primary(p) = self {
            p.handle_local_write_done(now, token, ok);
        }
    }

    /// A primary's `ReadExtent` done; dropped by a secondary.
    pub fn handle_read_done(&mut self, now: Time, token: Token, data: Bytes) {
        if let Machine::Primary(p) = self {
            p.handle_read_done(now, token, data);
        }
    }

    /// A secondary's `VerifyExtent` done; dropped by a primary.
    pub fn handle_verified(&mut self, now: Time, token: Token, differing: Vec<u8>) {
        if let Machine::Secondary(s) = self {
            s.handle_verified(now, token, differing);
        }
    }
}
