//! geomirror's replication core: the method of US 8,595,185 as a deterministic state machine.
//!
//! Owns: everything that decides. The record and its generations, prediction, eviction,
//! sequence numbers, ordered apply, epochs and fencing, resync and failback planning, and the
//! wire frames. Two state machines, [`Primary`] and [`Secondary`] (behind one dispatch,
//! [`Machine`]), take inputs through `handle_*(now, ..)` calls and emit [`Action`]s that a
//! shell drains with `poll_action`.
//!
//! Must not: perform I/O, read a clock, or draw randomness. No tokio, quinn, rocksdb, std::fs
//! or std::net here; `tests/core_purity.rs` checks the dependency list and the sources. This
//! is what lets `geomirror-sim` run thousands of seeded, replayable fault scenarios.

pub mod action;
pub mod config;
pub mod digest;
pub mod frame;
pub mod geometry;
pub mod ids;
pub mod machine;
#[cfg(feature = "mutations")]
pub mod mutations;

/// Whether this build has the deliberate bugs of the `mutations` feature compiled in; the
/// `geomirror` binary says so in its version, and an end-to-end test checks that the binary
/// it runs never has them.
pub const MUTATIONS_COMPILED_IN: bool = cfg!(feature = "mutations");
pub mod op;
pub mod predict;
pub mod primary;
pub mod record;
pub mod secondary;
pub mod stats;
pub mod store;
pub mod time;

pub use action::{Action, HostError, WritePath};
pub use config::{CoreConfig, FlushPolicy, LagPolicy, Mode, PredictorConfig, PredictorKind};
pub use digest::{block_digests, differing_blocks, BlockDigest, CHECK_BLOCK};
pub use frame::{Frame, LinkLossPolicy, Role, Stream};
pub use geometry::Geometry;
pub use ids::{Epoch, ExtentId, Generation, RequestId, Seq, StoreId, Token};
pub use machine::Machine;
pub use op::{WriteKind, WriteOp};
pub use primary::{ApproveRefused, FailbackPlan, LinkState, Phase, Primary, VerifyRefused, VerifyRequest, VerifyStatus, VerifyWait};
pub use record::Record;
pub use secondary::{PromoteError, PromoteReport, Secondary};
pub use store::{MemStore, Meta, PeerMemory, SiteState, StoreWrite, SyncCursor};
pub use time::Time;
