//! The NBD front end hosts connect to.
//!
//! `proto` and `handshake` are pure byte-level code (fuzzed); `server` is the async shell
//! that accepts connections, bounds them, and hands requests to a volume; `replies` writes
//! each reply from the thread that completed its request; `budget` bounds the bytes requests
//! hold over all connections.

pub mod budget;
pub mod handshake;
pub mod proto;
mod replies;
pub mod server;

#[cfg(test)]
mod robustness;
#[cfg(test)]
mod server_tests;
