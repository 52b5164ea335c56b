//! One volume's driver: a thread that owns the core's state machine and carries out its
//! actions.
//!
//! Owns: the `Primary` or `Secondary` of one volume (rebuilt from the store when the core
//! says the role changed), the order in which its actions are executed, the map from the
//! core's request ids to the hosts waiting for an answer, the frames it hands to the link,
//! and the volume's failure state.
//!
//! Must not: decide when a write may be acknowledged; it answers a host only when the core
//! emits `Ack`. The core's execution contract (see `geomirror_core::action`) holds here by
//! construction:
//! - media writes run inline on this thread, one after another, in the order emitted, so
//!   overlapping writes reach the media in sequence order and a `SyncMedia` (run on the sync
//!   thread, after it is emitted) covers every write emitted before it;
//! - `Persist` batches are written in order and reported only once durable;
//! - a secondary's `ApplyWrite`s run inline in order, and a `SaveAside` copy is durable
//!   before the next media action runs;
//! - `Send` frames go to the link's outbox in order.
//!
//! Why a thread and not a task: local media calls block (page-cache writeback can stall a
//! `pwrite` for a long time), and the core must see its actions done in order. A thread per
//! volume keeps the async NBD connections free and the ordering trivially true.
//!
//! The rooms: `handle` (the `Volume` every connection and the admin API hold, and its
//! start), `driver` (the thread that runs the core's `Machine` and executes its actions),
//! `store_thread` (durable batches off the driver's thread, group-committed) and `status`
//! (the snapshot operators and metrics read).

mod driver;
mod handle;
mod refused;
mod status;
mod store_thread;

pub use handle::{Volume, VolumeCounters};
pub use refused::{PeerAlive, RefusalKind, Refused};
pub use status::{VolumePhase, VolumeStatus};

use geomirror_core::{Epoch, Frame, HostError, Stream, Token, WriteOp};
use std::io;
use std::time::{Duration, Instant};

/// Called once with the result of a host request.
pub type Completion = Box<dyn FnOnce(Result<(), HostError>) + Send>;

/// Called once with the result of an operator's request.
pub type OperatorReply<T> = Box<dyn FnOnce(Result<T, Refused>) + Send>;

/// A primary drained for a switchover: its peer holds every write. `record` lists the
/// extents of the record, which a switchover compares on both sites before swapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drained {
    pub epoch: Epoch,
    pub record: Vec<u64>,
}

/// What a promotion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromoteOutcome {
    /// This request promoted the volume; durable before this is reported.
    Promoted(geomirror_core::PromoteReport),
    /// The volume was already primary (of this epoch), or a concurrent request promoted it.
    AlreadyPrimary { epoch: Epoch },
}

/// What a primary does once drained: a drain and a planned demotion are the same wait for
/// the peer, and differ only in this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterDrain {
    /// Stay drained (writes wait) until `Resume` or a demotion.
    Hold,
    /// Become a secondary of the same epoch.
    Demote,
}

/// What the driver thread is handed: host requests, completions of its threads, link
/// events and operators' requests.
enum ToDriver {
    Write {
        op: WriteOp,
        fua: bool,
        done: Completion,
        /// When the host's write reached the volume: its latency runs from here.
        at: Instant,
    },
    Flush {
        done: Completion,
    },
    Synced {
        token: Token,
        result: io::Result<()>,
    },
    /// Store batches made durable together, each with the `Driver::role_changes` of the
    /// machine that asked for it.
    Persisted {
        done: Vec<(u64, Token)>,
        result: io::Result<()>,
    },
    Link(LinkEvent),
    Status(Box<dyn FnOnce(VolumeStatus) + Send>),
    /// Call this once the primary is drained (now, if it is).
    WhenDrained(Box<dyn FnOnce() + Send>),
    Promote {
        force: bool,
        reply: OperatorReply<PromoteOutcome>,
    },
    Drain {
        deadline: Duration,
        then: AfterDrain,
        reply: OperatorReply<Drained>,
    },
    Resume,
    /// Keep this primary's data after a split brain: the peer saves its own aside and is
    /// resynced from here.
    ResolveSplitBrain {
        reply: OperatorReply<()>,
    },
    /// Start an online verify of extents `[start, end)` (the primary only).
    Verify {
        extents: std::ops::Range<u64>,
        repair: bool,
        reply: OperatorReply<()>,
    },
    /// Stop the running verify where it is; true if one was running.
    CancelVerify {
        reply: OperatorReply<bool>,
    },
    /// An operator approves the full sync onto the peer store `store` (a rebuilt site).
    ApproveRebuild {
        store: geomirror_core::StoreId,
        reply: OperatorReply<()>,
    },
    /// Finish what was accepted, sync, and end the thread.
    Stop,
}

/// A link session: one connection (or pair of connections) between the sites, named in
/// every stream's preamble, every link event and every frame a volume sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// What a volume stamps on what it asks while it has no session: no route has it.
    pub const NONE: SessionId = SessionId(0);
}

/// What the link tells a volume. Each event names the link session it belongs to; the
/// volume ignores events of any session but its current one, so nothing of a dead
/// connection reaches the core after the next one started.
#[derive(Debug)]
pub enum LinkEvent {
    /// An authenticated connection to the peer exists (its certificate was checked).
    Connected(SessionId),
    Disconnected(SessionId),
    Frame(SessionId, Frame),
    /// The peer was last heard from `at`, and is declared lost after `silence` without a
    /// word: what a refused promotion tells the operator.
    Heard {
        session: SessionId,
        at: Instant,
        silence: Duration,
    },
}

/// What a volume asks of the link, in order, stamped with the session the volume was in
/// when it asked: the link drops anything stamped with another session.
#[derive(Debug, PartialEq)]
pub enum Outbound {
    Send {
        session: SessionId,
        stream: Stream,
        frame: Frame,
    },
    /// Close the connection (a refusal or a protocol error); the link reconnects later.
    Disconnect {
        session: SessionId,
        reason: String,
    },
}
