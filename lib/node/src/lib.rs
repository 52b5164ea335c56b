//! geomirror's shells: everything that touches the outside world around the sans-IO core.
//!
//! Owns: the NBD server (`nbd`), local media (`media`), the site configuration (`config`)
//! and the names it holds (`names`), the checks of a site's files before it starts
//! (`preflight`), the store behind the core's `Persist` actions (`store`), the per-volume
//! driver that runs a core state machine and executes its actions (`volume`), the
//! replication link (`transport`), the admin API (`admin`), Prometheus metrics (`metrics`,
//! the names and the recorder; `refresher`, what reads the rest into them), and the
//! wiring of a whole site (`site`).
//!
//! Must not: make replication decisions. Whether a write may be acknowledged, what is
//! recorded, shipped or evicted is decided by `geomirror-core`; the shells only carry out
//! its actions in the order and with the durability its contract requires.

pub mod admin;
pub mod admin_client;
pub mod adopt;
pub mod aside;
pub mod certs;
pub mod config;
pub mod media;
pub mod metrics;
pub mod names;
pub mod nbd;
pub mod preflight;
pub mod refresher;
pub mod site;
pub mod store;
pub mod transport;
pub mod volume;
pub mod wan;

#[cfg(test)]
mod volume_pair_tests;
