//! What the state machines ask their shell to do.
//!
//! Owns: `Action`, the only way a state machine causes an effect, and the execution contract
//! the shells must honour:
//! - `Persist` batches become durable (synced) in the order emitted; the core learns of each
//!   through `handle_persisted`.
//! - Media actions (`LocalWrite`, `ApplyWrite`, `SaveAside`, `ReadExtent`, `SyncMedia`) run in
//!   the order emitted, so a `SyncMedia` covers every media write emitted before it.
//! - `Send` frames on one stream leave in the order emitted.
//! - `Ack` goes to the host at once. The core emits it only after every store, media write
//!   and peer answer that it depends on has been reported done.
//!
//! Must not: carry policy. Decisions are made before an action is emitted.

use crate::frame::{Frame, Role, Stream};
use crate::ids::{ExtentId, RequestId, Seq, Token};
use crate::op::WriteOp;
use crate::store::StoreWrite;
use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        stream: Stream,
        frame: Frame,
    },
    Persist {
        token: Token,
        batch: Vec<StoreWrite>,
    },
    /// Primary: write to local media; report with `handle_local_write_done`.
    LocalWrite {
        token: Token,
        seq: Seq,
        op: WriteOp,
    },
    /// Secondary: apply a shipped write to media (in order; no report needed).
    ApplyWrite {
        seq: Seq,
        op: WriteOp,
    },
    /// Secondary: durably copy the extent's current content aside before the next media action
    /// overwrites it (failback onto a site that may hold writes of its own). The first copy
    /// of an extent wins: a repeat (after a restart mid-failback) must not replace it.
    SaveAside {
        extent: ExtentId,
    },
    /// Secondary: read one extent after every media action emitted before this one, and
    /// compare its `block_digests` with `digests`; report the `differing_blocks` with
    /// `handle_verified`.
    VerifyExtent {
        token: Token,
        extent: ExtentId,
        digests: Vec<crate::digest::BlockDigest>,
    },
    /// Primary: read one extent for resync; report with `handle_read_done`.
    ReadExtent {
        token: Token,
        extent: ExtentId,
    },
    /// Make every media write emitted so far durable; report with `handle_media_synced`.
    SyncMedia {
        token: Token,
    },
    /// Answer a host request. `path` says how a completed write got its ack, for the shell's
    /// latency by path; it is None for flushes and for requests refused before dispatch.
    Ack {
        request: RequestId,
        result: Result<(), HostError>,
        path: Option<WritePath>,
    },
    /// Close the peer connection (refusal or protocol error); the shell reconnects with backoff.
    Disconnect {
        reason: String,
    },
    /// The site's persisted role changed; the shell rebuilds the state machine from the store.
    RoleChanged {
        role: Role,
    },
}

/// How a dispatched write came to be acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WritePath {
    /// Its extents were covered when it came: nothing remote (nor any store) was waited for.
    Hit,
    /// It waited for coverage: a record update (predictive), or a local dirty-map store.
    Miss,
}

impl WritePath {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            WritePath::Hit => "hit",
            WritePath::Miss => "miss",
        }
    }
}

/// Why a host request failed. The NBD shell maps these to NBD error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum HostError {
    #[error("request is outside the volume")]
    OutOfRange,
    #[error("the record could not be updated before the link-loss deadline")]
    LinkDown,
    #[error("this site is fenced: a newer epoch exists elsewhere")]
    Fenced,
    #[error("the local media reported an error")]
    Media,
    /// The write reached local media but the peer did not apply it in time (sync mode or a
    /// remote-flushed FUA, with the link down under the `block` policy).
    #[error("the write is on local media but the secondary did not apply it before the deadline")]
    ReplicationTimeout,
    #[error("this site is not serving writes now (starting, draining or demoting)")]
    NotServing,
}
