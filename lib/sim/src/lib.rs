//! Deterministic simulation of two geomirror sites around the sans-IO core.
//!
//! Owns: the simulated shells (in-memory store and media that lose unsynced state on a
//! crash, a network with per-stream ordering, delay, cuts and mid-frame loss), the host and
//! its workloads, operator scenarios (promotion, failback, split brain, switchover) and the
//! oracles O1-O9 (docs/architecture.md), checked after every event. A seed fixes everything: the same
//! seed gives the same trace hash.
//! Must not: use wall-clock time, threads or unseeded randomness.

pub mod media;
pub mod replay;
pub mod seeds;
pub mod workload;
pub mod world;

pub use seeds::{describe_failure, run_parallel, SeedTotals};
pub use workload::{read_trace, write_trace, Generator, HostOp, OpKind, Synthetic, SyntheticSpec, TraceFormat, Workload};
pub use world::{run, run_seed, Faults, Initial, Scenario, SimConfig, SimReport, Violation, World};
