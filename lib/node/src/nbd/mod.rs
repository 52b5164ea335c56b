//! The NBD front end hosts connect to.
//!
//! `proto` and `handshake` are pure byte-level code (fuzzed); `server` is the async shell
//! that accepts connections, bounds them, and hands requests to a volume; `budget` bounds the
//! bytes requests hold over all connections.

pub mod budget;
pub mod handshake;
pub mod proto;
pub mod server;

#[cfg(test)]
mod robustness;
#[cfg(test)]
mod server_tests;
